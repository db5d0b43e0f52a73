"""Images per second of preparing an image folder (decode once into the cache), 1 vs N processes,
and the cache's size on disk per 1,000 images at each stored size.

    python benchmarks/prepare_throughput.py [--images 2000] [--sizes 32 128 224] [--workers 1 2] [--repeats 3]

Generates a photo-like folder first: ``--images`` JPEGs of about 500x375 px (a quarter of them
portrait, 375x500), random crops of the real photographs that scikit-learn and matplotlib install
(china.jpg, flower.jpg, grace_hopper.jpg), each crop resized to the target size and saved at a random
JPEG quality from 75 to 95, in 10 class folders; nothing is downloaded. Every file is read once before
timing, so the page cache holds them all (decoding is measured, not the disk). Then each
(stored size, worker count) runs ``ImageFolderSource(...).prepare()`` into a new cache ``--repeats``
times, interleaved, and the best run is reported: listing, hashing, decoding, writing, all of it.
"""

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch
from PIL import Image

from cnnlab.data import ImageFolderSource

IMAGENET_TRAIN = 1_281_167  # ImageNet-1k's training images


def photographs() -> list[Path]:
    import matplotlib
    import sklearn

    sample = Path(sklearn.__file__).parent / "datasets" / "images"
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [sample / "china.jpg", sample / "flower.jpg", hopper]


def make_photo_folder(root: Path, count: int, seed: int = 0) -> int:
    """``count`` JPEGs of 500x375 (or 375x500) px cut from the sample photos; returns their total bytes."""
    rng = random.Random(seed)
    photos = [Image.open(path).convert("RGB") for path in photographs()]
    total = 0
    for i in range(count):
        photo = rng.choice(photos)
        width, height = (375, 500) if i % 4 == 3 else (500, 375)
        scale = rng.uniform(0.45, 1.0)  # the crop: this share of the photo's largest box of the target's shape
        fit = min(photo.width / width, photo.height / height)
        crop_w, crop_h = int(width * fit * scale), int(height * fit * scale)
        x, y = rng.randint(0, photo.width - crop_w), rng.randint(0, photo.height - crop_h)
        image = photo.crop((x, y, x + crop_w, y + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / f"class_{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=rng.randint(75, 95))
        total += path.stat().st_size
    return total


def prepare_seconds(root: Path, cache_root: Path, size: int, workers: int):
    start = time.perf_counter()
    cache = ImageFolderSource(root, cache_root, stored_size=size, workers=workers).prepare()
    return time.perf_counter() - start, cache


def cache_bytes(cache) -> dict[str, int]:
    files = list(cache.dir.iterdir())
    return {"images": sum(f.stat().st_size for f in files if f.name.endswith("_images.npy")),
            "labels": sum(f.stat().st_size for f in files if f.name.endswith("_labels.npy")),
            "meta": sum(f.stat().st_size for f in files if f.suffix == ".json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()}, {cores} cores; python {platform.python_version()}, "
          f"torch {torch.__version__}, opencv {cv2.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        jpeg_bytes = make_photo_folder(root, args.images)
        for path in root.rglob("*.jpg"):
            path.read_bytes()  # into the page cache
        print(f"{args.images} JPEGs, {jpeg_bytes / args.images / 1e3:.0f} kB each on average "
              f"({jpeg_bytes / 1e6:.0f} MB)", file=sys.stderr)
        best, sizes = {}, {}
        for repeat in range(args.repeats):
            for size in args.sizes:
                for workers in args.workers:
                    cache_root = Path(tmp) / f"cache-{size}-{workers}-{repeat}"
                    seconds, cache = prepare_seconds(root, cache_root, size, workers)
                    best[size, workers] = min(seconds, best.get((size, workers), float("inf")))
                    sizes[size] = cache_bytes(cache)
                    print(f"  size {size}, {workers} worker(s), run {repeat + 1}: {seconds:.2f} s", file=sys.stderr)
                    for file in cache.dir.iterdir():  # keep the disk small; the sizes are read
                        file.unlink()
        header = "| stored size | " + " | ".join(f"{w} worker{'s' * (w > 1)}: images/s (per worker)"
                                                 for w in args.workers)  # the table: stdout; the rest: stderr
        print(header + f" | speed-up {args.workers[-1]} vs {args.workers[0]} | cache per 1,000 images "
              f"(images + labels + meta.json) | ImageNet-1k train ({IMAGENET_TRAIN:,} images) |")
        print("|---" * (len(args.workers) + 4) + "|")
        for size in args.sizes:
            rates = [args.images / best[size, w] for w in args.workers]
            cells = " | ".join(f"{rate:,.0f} ({rate / w:,.0f})" for rate, w in zip(rates, args.workers))
            used = sizes[size]
            per_image = sum(used.values()) / args.images
            print(f"| {size} px | {cells} | {rates[-1] / rates[0]:.2f}x | "
                  f"{per_image * 1000 / 1e6:,.1f} MB ({used['images']:,} + {used['labels']:,} + {used['meta']:,} bytes "
                  f"for {args.images:,}; {size}x{size}x3 = {size * size * 3:,} bytes an image) | "
                  f"{per_image * IMAGENET_TRAIN / 1e9:,.1f} GB |")


if __name__ == "__main__":
    main()
