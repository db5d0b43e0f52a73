"""The user's own images: ``root/<class>/*.jpg`` or ``root/{train,val,test}/<class>/*.jpg``.

Every image is decoded once, into the shared uint8 cache (cache.py): EXIF orientation applied,
any mode (grayscale, RGBA, palette, 16-bit, CMYK) converted to RGB, the short side resized to
``stored_size`` and centre-cropped. Unreadable files are all collected and reported together;
with ``skip_bad_images`` they are left out and listed in the cache's manifest instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..errors import ConfigError
from .cache import SPLITS, ImageCache, is_prepared, settings_hash, write_cache

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# What Pillow raises for empty, truncated, corrupt or non-image files (anything else is a bug and raises).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def find_images(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split or "all": {class: [files]}}, checked so that training can work at all."""
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}")
    has_splits = all((root / split).is_dir() for split in SPLITS)
    trees = {split: root / split for split in SPLITS} if has_splits else {"all": root}
    found = {}
    for split, tree in trees.items():
        class_dirs = sorted(d for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))
        if len(class_dirs) < 2:
            raise ConfigError(f"{tree} needs at least two class folders, found {len(class_dirs)}")
        found[split] = {}
        for class_dir in class_dirs:
            files = sorted(f for f in class_dir.rglob("*") if f.suffix.lower() in EXTENSIONS and f.is_file())
            if not files:
                raise ConfigError(f"no images ({', '.join(sorted(EXTENSIONS))}) in class folder {class_dir}")
            found[split][class_dir.name] = files
    if has_splits and len({tuple(classes) for classes in found.values()}) > 1:
        raise ConfigError(f"train/, val/ and test/ under {root} must hold the same class folders")
    return found


def load_rgb(path: Path, stored_size: int) -> np.ndarray:
    """Decode one file into a (stored_size, stored_size, 3) uint8 array."""
    with Image.open(path) as image:
        image.draft(image.mode, (2 * stored_size, 2 * stored_size))  # JPEG: decode large images at reduced scale
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((255 * array / max(array.max(), 1)).astype(np.uint8))
        image = image.convert("RGB")
        return np.asarray(ImageOps.fit(image, (stored_size, stored_size), Image.Resampling.BILINEAR))


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """A split name per image, the same fractions within every class, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(test_fraction * len(members)))
        n_val = int(round(val_fraction * len(members)))
        split[members[:n_test]] = "test"
        split[members[n_test:n_test + n_val]] = "val"
        split[members[n_test + n_val:]] = "train"
    return split


class ImageFolderSource:
    def __init__(self, root: str | Path, cache_root: str | Path, stored_size: int = 64, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, skip_bad_images: bool = False):
        if not 0 <= val_fraction + test_fraction < 1:
            raise ConfigError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
        self.root = Path(root).expanduser().resolve()
        self.cache_root = Path(cache_root)
        self.settings = {"source": "imagefolder-v1", "root": str(self.root), "stored_size": stored_size,
                         "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                         "skip_bad_images": skip_bad_images}

    def _listing(self) -> list[tuple[str, str, str, Path]]:
        """(split, class, relative path, path) for every image; split is "" when fractions decide."""
        rows = []
        for split, classes in find_images(self.root).items():
            for class_name, files in classes.items():
                rows += [("" if split == "all" else split, class_name, str(f.relative_to(self.root)), f) for f in files]
        return rows

    def prepare(self) -> ImageCache:
        rows = self._listing()
        # Any added, removed or rewritten file changes the key, and so gives a new cache.
        stats = [(rel, f.stat().st_size, f.stat().st_mtime_ns) for _, _, rel, f in rows]
        cache_dir = self.cache_root / f"imagefolder-{settings_hash({**self.settings, 'files': stats})}"
        if not is_prepared(cache_dir):
            self._ingest(rows, cache_dir)
        return ImageCache(cache_dir)

    def _ingest(self, rows, cache_dir: Path) -> None:
        classes = sorted({class_name for _, class_name, _, _ in rows})
        size = self.settings["stored_size"]
        images, kept, bad = [], [], []
        for row in tqdm(rows, desc=f"Decoding {self.root.name}", unit="img"):
            try:
                images.append(load_rgb(row[3], size))
                kept.append(row)
            except UNREADABLE as error:
                bad.append({"file": row[2], "error": f"{type(error).__name__}: {error}".splitlines()[0]})
        if bad and not self.settings["skip_bad_images"]:
            listing = "; ".join(f"{b['file']} ({b['error']})" for b in bad)
            raise ConfigError(f"{len(bad)} unreadable image(s) under {self.root}: {listing}. "
                              "Fix or remove them, or set data.source.skip_bad_images=true")
        labels = np.array([classes.index(class_name) for _, class_name, _, _ in kept], dtype=np.int64)
        splits = np.array([split for split, *_ in kept], dtype=object)
        if not all(splits):
            splits = stratified_split(labels, self.settings["val_fraction"], self.settings["test_fraction"],
                                      self.settings["seed"])
        stacked = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
        manifest = [{"file": rel, "class": class_name, "split": str(split), "sha256": _sha256(path)}
                    for (_, class_name, rel, path), split in zip(kept, splits)]
        write_cache(cache_dir, {s: (stacked[splits == s], labels[splits == s]) for s in SPLITS},
                    {"classes": classes, "source": self.settings, "files": manifest, "skipped": bad})


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
