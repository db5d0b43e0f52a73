"""CIFAR-10 from the official python-version tarball, into the shared uint8 cache.

The tarball is read from a local path. When it is absent and ``download`` is on, it is fetched
from the official address and its published MD5 is checked before anything is read from it.
The official validation split does not exist: ``val_size`` images are held out of the 50,000
training images, the same number per class, deterministically from ``seed``.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError
from .cache import ImageCache, build_once, exclusive, settings_hash, write_cache
from .imagefolder import stratified_split

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def md5sum(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def download(url: str, path: Path, md5: str) -> None:
    """Fetch ``url`` to ``path`` with a progress bar; keep it only if its MD5 is the published one.

    A machine that is offline (or a download cut short) is the user's to fix: say where the file goes.
    """
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            path.parent.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            with open(partial, "wb") as file:
                total = int(response.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {path.name}") as progress:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        file.write(block)
                        progress.update(len(block))
    except OSError as error:  # URLError, a timeout, a reset connection
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise ConfigError(f"cannot download {url} ({reason}): put {path.name} at {path} "
                          "(or set data.source.archive to where it is)") from None
    verify_md5(partial, md5)
    partial.rename(path)


def verify_md5(path: Path, md5: str) -> None:
    actual = md5sum(path)
    if actual != md5:
        path.unlink()
        raise ConfigError(f"{path} has MD5 {actual}, expected {md5}: the download is corrupt, so it was removed")


class BatchUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 batches (dicts of bytes, lists of ints, numpy arrays) and refuses to import
    anything else: a tarball put at ``data.source.archive`` by hand is not checked against the
    download's MD5, and an ordinary unpickler would run whatever code a crafted one names."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def read_archive(path: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and {"train": ..., "test": ...} as (N, 32, 32, 3) uint8 images and labels."""
    def load(archive: tarfile.TarFile, name: str) -> dict:
        member = next((m for m in archive.getmembers() if m.name.endswith(f"cifar-10-batches-py/{name}")), None)
        if member is None:
            raise ConfigError(f"{path} is not the CIFAR-10 python tarball: {name} is missing")
        try:  # the format is Python pickles: only what the batches hold may be built from them
            return BatchUnpickler(archive.extractfile(member), encoding="bytes").load()
        except pickle.UnpicklingError as error:
            raise ConfigError(f"{path} is not the CIFAR-10 python tarball: its {name} would import {error} "
                              "(refused; nothing from it was run)") from None

    def images_labels(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        data = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored as R, G, B planes
        return np.ascontiguousarray(images), np.concatenate([np.asarray(b[b"labels"], np.int64) for b in batches])

    with tarfile.open(path, "r:gz") as archive:
        classes = [name.decode() for name in load(archive, "batches.meta")[b"label_names"]]
        train = images_labels([load(archive, name) for name in TRAIN_BATCHES])
        test = images_labels([load(archive, "test_batch")])
    return classes, {"train": train, "test": test}


class Cifar10Source:
    def __init__(self, archive: str | Path, cache_root: str | Path, val_size: int = 5000, seed: int = 0,
                 download: bool = True, url: str = URL, md5: str = MD5):
        self.archive = Path(archive).expanduser()
        self.cache_root = Path(cache_root)
        self.download, self.url, self.md5 = download, url, md5
        self.settings = {"source": "cifar10-v1", "val_size": val_size, "seed": seed}

    def prepare(self) -> ImageCache:
        self._fetch()
        stat = self.archive.stat()
        key = settings_hash({**self.settings, "archive": [str(self.archive.resolve()), stat.st_size, stat.st_mtime_ns]})
        cache_dir = self.cache_root / f"cifar10-{key}"
        return ImageCache(build_once(cache_dir, lambda: self._write(cache_dir)))

    def _fetch(self) -> None:
        """Download the tarball unless it is there. Under a lock: two processes downloading at once wrote
        into one partial file, and the second to finish found it renamed away."""
        if self.archive.is_file():
            return
        if not self.download:
            raise ConfigError(f"CIFAR-10 tarball not found: {self.archive} (or set data.source.download=true)")
        with exclusive(self.archive):
            if not self.archive.is_file():  # not fetched by the process this one waited for
                download(self.url, self.archive, self.md5)

    def _write(self, cache_dir: Path) -> None:
        classes, splits = read_archive(self.archive)
        images, labels = splits["train"]
        split = stratified_split(labels, self.settings["val_size"] / len(labels), 0.0, self.settings["seed"])
        splits = {"train": (images[split == "train"], labels[split == "train"]),
                  "val": (images[split == "val"], labels[split == "val"]), "test": splits["test"]}
        write_cache(cache_dir, splits, {"classes": classes, "source": {**self.settings, "archive": str(self.archive)}})
