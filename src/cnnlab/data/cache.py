"""The prepared-data cache: decoded uint8 images per split, memory-mapped at training time.

Every data source (the generated shapes, later image folders and CIFAR-10) writes this one
format, so the data module and the DataLoader workers never decode an image file again:

    <cache_dir>/meta.json            classes, image size, source settings
    <cache_dir>/<split>_images.npy   (N, H, W, 3) uint8
    <cache_dir>/<split>_labels.npy   (N,) int64

A cache is written into a temporary folder and renamed into place, so a crash (or two
processes of a distributed run preparing at once) never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

META_FILE = "meta.json"
SPLITS = ("train", "val", "test")


def settings_hash(settings: dict) -> str:
    """A short, stable hash of the settings that determine a cache's content."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def is_prepared(cache_dir: Path) -> bool:
    """Whether a complete cache is there: the meta file is the last thing a cache gets."""
    return (Path(cache_dir) / META_FILE).is_file()


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A new temporary folder beside ``folder`` to write a cache into, renamed to ``folder`` when the
    block ends without an error and removed in any case (see the module docstring). Write the meta
    file last: it is what marks a cache complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_prepared(folder):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``<name>.npy`` per array and the meta file, all or nothing (see the module docstring)."""
    with staged(folder) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return Path(folder)


def write_cache(cache_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> Path:
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays |= {f"{split}_images": images, f"{split}_labels": labels}
    return write_arrays(cache_dir, arrays, meta)


@dataclass(frozen=True)
class CachedSplit:
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64


class ImageCache:
    """Read access to a prepared cache."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        meta_path = self.dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no prepared data at {self.dir} (missing {META_FILE})")
        self.meta = json.loads(meta_path.read_text())

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def split(self, name: str) -> CachedSplit:
        return CachedSplit(
            images=np.load(self.dir / f"{name}_images.npy", mmap_mode="r"),
            labels=np.load(self.dir / f"{name}_labels.npy"),
        )
