"""The prepared-data cache: decoded uint8 images per split, memory-mapped at training time.

Every data source (the generated shapes, later image folders and CIFAR-10) writes this one
format, so the data module and the DataLoader workers never decode an image file again:

    <cache_dir>/meta.json            classes, image size, source settings
    <cache_dir>/<split>_images.npy   (N, H, W, 3) uint8
    <cache_dir>/<split>_labels.npy   (N,) int64

A cache is written into a temporary folder and renamed into place, so a crash never leaves a
half-written cache behind, and a reader sees a cache whole or not at all. Preparing takes a lock
beside the cache folder (``build_once``): of two processes preparing the same new cache at once (two
`prepare` commands, the processes of a distributed run), one writes it and the other waits, then
uses it, instead of decoding everything a second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

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
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(folder), dir=folder.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_prepared(folder):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staging_prefix(folder: Path) -> str:
    """The name of every temporary folder ``staged`` makes for ``folder``, but for a random tail."""
    return f".{Path(folder).name}.partial-"


def lock_path(path: Path) -> Path:
    """The lock file of a folder or file that is made once: hidden, beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold ``lock_path(path)``, saying so when another process holds it (a large data set takes minutes).

    The lock file is removed before the lock is released, so that nothing but the cache stays
    beside it. That is safe because the lock guards only "make it unless it is there": a process
    that was waiting on the removed file looks again once it has the lock, and finds the result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("waiting for another process to finish preparing %s", path)
        lock.acquire()
    try:
        yield
    finally:
        lock_path(path).unlink(missing_ok=True)
        lock.release()


def build_once(folder: Path, build: Callable[[], object]) -> Path:
    """Call ``build`` (which writes ``folder`` through ``staged``) unless a complete cache is there,
    one process at a time: a process that waited for the lock finds the cache another one wrote."""
    folder = Path(folder)
    if not is_prepared(folder):
        with exclusive(folder):
            if not is_prepared(folder):
                clear_leftovers(folder)
                build()
    return folder


def clear_leftovers(folder: Path) -> None:
    """Remove what a writer that was killed left (its temporary folders) and a folder without the meta
    file at the cache's place (a partial copy; it would block the rename). Call it holding the lock:
    then no other process is writing either."""
    for partial in folder.parent.glob(f"{staging_prefix(folder)}*"):
        shutil.rmtree(partial, ignore_errors=True)
    if folder.is_dir() and not is_prepared(folder):
        log.warning("removing %s: an incomplete cache (no %s)", folder, META_FILE)
        shutil.rmtree(folder)


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
