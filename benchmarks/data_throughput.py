"""Images per second of the training data path: decode-once cache vs decoding JPEG files.

    python benchmarks/data_throughput.py [--sizes 32 128 224] [--images 512]

For each image size, generates shape images, writes them as JPEG files (quality 90), ingests
them into the cache with the project's imagefolder source, then times whole epochs of a
DataLoader with each augmentation policy, reading (a) the cache and (b) the JPEG files, with
one worker process and with one per core, side by side in this one run. A last column times
one core alone: the transform in the main process, no worker processes.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import Dataset

from cnnlab.data import ImageFolderSource
from cnnlab.data.augment import train_transform
from cnnlab.data.datamodule import CachedImageDataset, batches
from cnnlab.data.imagefolder import load_rgb
from cnnlab.data.shapes import SHAPES, render

CONF = Path(__file__).resolve().parents[1] / "conf"
POLICIES = ["none", "light", "standard", "heavy"]


class JpegFiles(Dataset):
    """The baseline: decode every file in every epoch."""

    def __init__(self, files, labels, size, transform):
        self.files, self.labels, self.size, self.transform = files, labels, size, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = self.transform(image=load_rgb(self.files[index], self.size))["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), self.labels[index]


def images_per_second(dataset, workers: int, epochs: int = 2) -> float:
    loader = batches(dataset, batch_size=64, shuffle=True, num_workers=workers)
    for _ in loader:  # warm-up epoch: worker start-up and page cache
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def policy(name: str, size: int):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"augment={name}", f"data.source.image_size={size}"])
    return train_transform(instantiate(cfg.augment), size)


def make_jpegs(root: Path, count: int, size: int):
    rng, names = np.random.default_rng(0), list(SHAPES)[:10]
    files, labels = [], []
    for i in range(count):
        label = i % len(names)
        path = root / names[label] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(rng, names[label], size)).save(path, quality=90)
        files.append(path)
        labels.append(label)
    return files, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 224])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()}, {cores} cores; python {platform.python_version()}, "
          f"torch {torch.__version__}, opencv {cv2.__version__}; {args.images} images, batch 64", file=sys.stderr)
    print(f"| size | policy | cache, 1 worker | files, 1 worker | cache/files | cache, {cores} workers | "
          f"files, {cores} workers | one core, no workers |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            files, labels = make_jpegs(Path(tmp) / "jpegs", args.images, size)
            cache = ImageFolderSource(Path(tmp) / "jpegs", Path(tmp) / "cache", stored_size=size,
                                      val_fraction=0, test_fraction=0).prepare()
            for name in args.policies:
                cached = CachedImageDataset(cache.split("train"), policy(name, size), augments=name != "none")
                decoded = JpegFiles(files, labels, size, policy(name, size))
                cache_1, files_1 = images_per_second(cached, 1), images_per_second(decoded, 1)
                cache_n, files_n = images_per_second(cached, cores), images_per_second(decoded, cores)
                one_core = images_per_second(cached, 0)  # OpenCV is single-threaded (cnnlab.data.augment)
                print(f"| {size} | {name} | {cache_1:,.0f} | {files_1:,.0f} | {cache_1 / files_1:.1f}x | "
                      f"{cache_n:,.0f} | {files_n:,.0f} | {one_core:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
