"""Training images/s through the real training path: a ``trainer=`` preset, the data module, Lightning.

    python benchmarks/trainer_throughput.py --trainer gpu --models resnet50 efficientnet_b0 --size 224
    python benchmarks/trainer_throughput.py --trainer cpu --models resnet_small --size 32 --batch 64   # any machine

For each model and each compile setting (``--compile off on``), trains ``--steps`` steps twice, side
by side in this one run: on the prepared (cached) shapes data through the DataLoader workers and
their transforms, and on synthetic batches already in memory (no data path at all). Images/s
count the steps after ``--warmup``; if the cached run is slower than the synthetic one, the data
path is the bottleneck, by that ratio. On a GPU the mean utilisation over the timed steps is
sampled with NVML. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from cnnlab.training.run import build, quiet_lightning

CONF = Path(__file__).resolve().parents[1] / "conf"


class GpuUtilisation:
    """Mean GPU utilisation (%) between start() and stop(), sampled by NVML every 50 ms (None without NVML)."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (a CPU machine): nothing to sample
            self.nvml = None
        self.samples: list[int] = []

    def start(self) -> None:
        self.running, self.samples = True, []
        if self.nvml:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.05)

    def stop(self) -> float | None:
        self.running = False
        if self.nvml:
            self.thread.join()
        return statistics.mean(self.samples) if self.samples else None


class StepTimer(pl.Callback):
    """Wall time of the training steps after ``warmup`` (compilation, cuDNN's autotuning, worker start-up)."""

    def __init__(self, warmup: int):
        self.warmup, self.utilisation = warmup, GpuUtilisation()
        self.seconds = self.gpu_percent = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            synchronize()
            self.start = time.perf_counter()
            self.utilisation.start()

    def on_train_end(self, trainer, pl_module):
        synchronize()
        self.seconds = time.perf_counter() - self.start
        self.gpu_percent = self.utilisation.stop()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_loader(batch: int, size: int, classes: int) -> DataLoader:
    """Random uint8 batches already in memory (the same dtype and layout the cache's loader gives)."""
    images = torch.randint(0, 256, (batch * 4, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, classes, (batch * 4,))
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False, pin_memory=torch.cuda.is_available())


def images_per_second(root: Path, args, model: str, compiled: bool, synthetic: bool) -> tuple[float, float | None]:
    overrides = [f"paths.root_dir={root}", f"trainer={args.trainer}", f"model={model}",
                 f"data.source.image_size={args.size}", f"data.source.train_size={args.images}",
                 "data.source.val_size=16", "data.source.test_size=16", f"data.batch_size={args.batch}",
                 f"augment={args.augment}", "logger=none", f"trainer.compile={str(compiled).lower()}"]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    timer = StepTimer(args.warmup)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[timer], max_epochs=-1,
                          max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                          enable_checkpointing=False, enable_progress_bar=False)
    if synthetic:
        trainer.fit(module, train_dataloaders=synthetic_loader(args.batch, args.size, len(datamodule.classes)))
    else:
        trainer.fit(module, datamodule=datamodule)
    return args.steps * args.batch / timer.seconds, timer.gpu_percent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="gpu", help="a conf/trainer preset")
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="cached training images (generated once)")
    parser.add_argument("--augment", default="none", help="a conf/augment policy for the cached data")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--root", type=Path, default=None, help="where the data cache goes (default: a temporary folder)")
    args = parser.parse_args()
    quiet_lightning()
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        for model in args.models:
            for compiled in args.compile:
                cached = images_per_second(root, args, model, compiled == "on", synthetic=False)
                synthetic = images_per_second(root, args, model, compiled == "on", synthetic=True)
                rows.append((model, compiled, cached, synthetic))
                print(f"{model} compile {compiled}: cached {cached[0]:,.0f} img/s, synthetic {synthetic[0]:,.0f} img/s",
                      flush=True)
    print(f"\ntrainer={args.trainer}, {args.size} px, batch {args.batch}, augment={args.augment}, {args.steps} steps "
          f"after {args.warmup}; {device}; torch {torch.__version__}, Lightning {pl.__version__}\n")
    print("| model | compile | cached data, img/s | GPU util | synthetic, img/s | GPU util | cached / synthetic |")
    print("|---|---|---|---|---|---|---|")
    percent = lambda value: "-" if value is None else f"{value:.0f}%"  # noqa: E731
    for model, compiled, (cached, cached_gpu), (synthetic, synthetic_gpu) in rows:
        print(f"| {model} | {compiled} | {cached:,.0f} | {percent(cached_gpu)} | {synthetic:,.0f} | "
              f"{percent(synthetic_gpu)} | {cached / synthetic:.2f} |")


if __name__ == "__main__":
    main()
