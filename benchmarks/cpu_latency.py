"""CPU inference: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8, side by side in one run.

    python benchmarks/cpu_latency.py [--models mobilenet_v1 mobilenet_v2 efficientnet_b0 resnet50 vgg16]
                                     [--size 224] [--repeats 30] [--threads N]

For each model (ImageNet's 1000 classes, random weights: the time does not depend on them), the
exported graph as ``src/export.py`` writes it (uint8 images in, normalisation inside) runs in
onnxruntime, and its int8 version (static QDQ, calibrated on 64 random images: the ranges do not
change the time either); PyTorch runs the same ``ImageClassifier`` in inference mode. Reported:
batch-1 latency, median and 90th percentile over ``--repeats`` calls after warm-up, and images/s at
batch 32. Every engine uses the same number of threads (``--threads``, default all cores).
Accuracy is not measured here (random weights): src/export.py reports int8's test accuracy next to
fp32's for a trained model.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnnlab.inference.classifier import onnx_runner
from cnnlab.inference.export import export_onnx, quantize_int8
from cnnlab.models import model_config
from cnnlab.training.module import ImageClassifier


def timings(run, images_1: torch.Tensor, images_32: torch.Tensor, repeats: int) -> dict[str, float]:
    for _ in range(3):
        run(images_1)
    run(images_32)
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images_1)
        latencies.append(1000 * (time.perf_counter() - start))
    batches = max(2, repeats // 10)
    start = time.perf_counter()
    for _ in range(batches):
        run(images_32)
    throughput = batches * len(images_32) / (time.perf_counter() - start)
    return {"median": statistics.median(latencies), "p90": float(np.percentile(latencies, 90)), "img_s": throughput}


def engines(name: str, size: int, folder: Path, threads: int) -> dict:
    module = ImageClassifier(model=model_config(name), classes=[str(i) for i in range(1000)], optimizer={}).eval()
    fp32 = export_onnx(module, folder / f"{name}.onnx", size, {})
    calibration = np.random.default_rng(0).integers(0, 256, (64, 3, size, size), dtype=np.uint8)
    int8 = quantize_int8(fp32, folder / f"{name}.int8.onnx", calibration, {})

    @torch.inference_mode()
    def eager(images):
        return module(images)

    def session(path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return onnx_runner(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))

    return {"PyTorch eager": eager, "onnxruntime fp32": session(fp32), "onnxruntime int8": session(int8)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["mobilenet_v1", "mobilenet_v2", "efficientnet_b0", "resnet50", "vgg16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, {args.size} px, batch-1 over {args.repeats} calls\n")
    print("| model | engine | batch 1 median (ms) | batch 1 p90 (ms) | batch 32 (img/s) | vs eager (batch 1) |")
    print("|---|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    images_1 = torch.randint(0, 256, (1, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    images_32 = torch.randint(0, 256, (32, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results = {engine: timings(run, images_1, images_32, args.repeats)
                       for engine, run in engines(name, args.size, Path(folder), args.threads).items()}
            eager = results["PyTorch eager"]["median"]
            for engine, r in results.items():
                print(f"| {name} | {engine} | {r['median']:.1f} | {r['p90']:.1f} | {r['img_s']:.1f} | "
                      f"{eager / r['median']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
