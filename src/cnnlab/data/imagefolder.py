"""The user's own images: class folders, directly under the root or inside split folders.

Layouts (folder names matched case-insensitively; ``valid``/``validation`` mean val, ``training``
train and ``testing`` test, as downloaded datasets spell them):

    root/<class>/...                  val and test carved from each class by the fractions
    root/train/<class>/...            val and test carved from train, per class
    root/{train,test}/<class>/...     val carved from train (the usual Kaggle/CIFAR/MNIST export)
    root/{train,val}/<class>/...      val kept as validation; test carved from train, so that the
                                      test score comes from images that checkpoint selection never saw
    root/{train,val,test}/<class>/... all three as given

Files in sub-folders of a class folder belong to that class. A root that mixes split folders with
other folders is refused: a class named ``train`` beside ``cat`` and ``dog`` cannot be told from a
split folder, and reading split folders as classes teaches the model "which folder".

Every image is decoded once, into the shared uint8 cache (cache.py): EXIF orientation applied,
any mode (grayscale, RGBA, palette, 16-bit, CMYK) converted to RGB, the short side resized to
``stored_size`` and centre-cropped. Unreadable files are all collected and reported together;
with ``skip_bad_images`` they are left out, logged, and listed in the cache's manifest. Unreadable
includes a file whose header claims more than ``MAX_PIXELS`` (refused before it is decoded), one
this process may not read, and a link to nothing or a loop of links.

Decoding runs in ``workers`` processes (default: one per core, at most 16), each decoding chunks
of files with the one function ``decode``; the parent writes every image at its place, in file
order, straight into the cache's memory-mapped arrays, so the cache's bytes never depend on the
worker count and the decoded images are held once, on disk (plus a bounded number in flight).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..errors import ConfigError
from .cache import META_FILE, SPLITS, ImageCache, build_once, settings_hash, staged

log = logging.getLogger(__name__)

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# What Pillow raises for empty, truncated, corrupt or non-image files (anything else is a bug and raises).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# The most pixels a file may decode to: Pillow's own "could be a decompression bomb" threshold (89.5
# megapixels, a 9,459 px square). Pillow only warns up to twice that, and a 420 kB PNG of 12,000 x
# 12,000 px took 1.6 GB to decode (per decoding process). A JPEG is measured at the reduced scale
# ``draft`` decodes it at, so a large photo passes; its header may claim up to twice as many.
MAX_PIXELS = 89_478_485
# Split folder names as datasets ship them (lower case) and the split each one is.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
NAMED = 5  # how many folders or files a message names before "and N more"
MAX_DEFAULT_WORKERS = 16  # decoding processes when ``workers`` is null: one per core, at most this many
IN_PROCESS_BELOW = 64  # fewer files than this are decoded in this process: starting others costs more
CHUNK = 32  # files per task sent to a decoding process (fewer when there are few files)
AHEAD = 4  # tasks in flight per decoding process: bounds the decoded images waiting to be written
# fork (Linux) starts a decoding process in milliseconds, without importing torch again; elsewhere the
# platform's default (spawn): a task is a module-level function and plain arguments, so either works.
START_METHOD = "fork" if sys.platform == "linux" else None


def _names(items, limit: int = NAMED) -> str:
    """'a, b, c and 4 more': a message stays one readable line however many there are."""
    items = [str(item) for item in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# Folders that archives and tools leave beside the data: never a class, never a split.
NOT_DATA = {"__MACOSX", "__pycache__"}


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_DATA)


@dataclass(frozen=True)
class Layout:
    """Which folder holds each split's class folders; the splits not given are carved from ``pool``."""

    trees: dict[str, Path]  # split -> its folder, or {"all": root} for class folders directly under the root

    @property
    def pool(self) -> str:
        return "all" if "all" in self.trees else "train"

    @property
    def carved(self) -> tuple[str, ...]:
        return tuple(split for split in ("val", "test") if split not in self.trees)

    @property
    def name(self) -> str:
        if self.pool == "all":
            return "class folders"
        return "+".join(f"{self.trees[split].name}/" for split in SPLITS if split in self.trees)

    def describe(self, fractions: dict[str, float]) -> str:
        """The layout and what is carved from where, e.g. "train/+test/ (val 10% carved from train/, per class)"."""
        if not self.carved:
            return f"{self.name} (as given)"
        carved = " and ".join(f"{split} {100 * fractions[split]:g}%" for split in self.carved)
        source = "each class" if self.pool == "all" else f"{self.trees['train'].name}/, per class"
        return f"{self.name} ({carved} carved from {source})"


def find_layout(root: Path) -> Layout:
    """Split folders if the root has any (all its folders must then be split folders), else class folders."""
    folders = _subfolders(root)
    split_folders = [d for d in folders if d.name.lower() in SPLIT_FOLDERS]
    split_folders.sort(key=lambda d: SPLITS.index(SPLIT_FOLDERS[d.name.lower()]))  # train, val, test
    if not split_folders:
        return Layout({"all": root})
    others = [d for d in folders if d not in split_folders]
    if others:
        raise ConfigError(
            f"{root} mixes split folders ({_names(f'{d.name}/' for d in split_folders)}) with other folders "
            f"({_names(f'{d.name}/' for d in others)}): is {split_folders[0].name}/ a split or a class? "
            f"Put every class folder inside the split folders (train/<class>/...), "
            f"or rename a class folder that is named like a split")
    trees = {}
    for folder in split_folders:
        split = SPLIT_FOLDERS[folder.name.lower()]
        if split in trees:
            raise ConfigError(f"{root} has two {split} folders, {trees[split].name}/ and {folder.name}/: keep one")
        trees[split] = folder
    if "train" not in trees:
        raise ConfigError(f"{root} has split folders ({_names(f'{d.name}/' for d in split_folders)}) but no train/: "
                          "add train/<class>/... beside them")
    return Layout(trees)


def class_files(tree: Path) -> dict[str, list[Path]]:
    """{class: files} for the class folders in ``tree``; files in sub-folders belong to their class folder."""
    found = {}
    for class_dir in _subfolders(tree):
        files = image_files(class_dir)
        if not files:
            raise ConfigError(f"no images ({', '.join(sorted(EXTENSIONS))}) in class folder {class_dir}")
        found[class_dir.name] = files
    return found


def image_files(folder: Path) -> list[Path]:
    """The files with an image extension in ``folder`` and its sub-folders, sorted.

    Links to folders are not followed, so a link loop (a/b -> a) ends. A link to a file that is gone,
    or a loop of file links, is kept, to be reported as unreadable rather than dropped in silence;
    so is a sub-folder that cannot be listed (rglob skipped it and the images in it without a word).
    """
    def refuse(error: OSError):
        raise ConfigError(f"cannot list {error.filename} ({error.strerror}): "
                          "give this user read access to it, or move it out of the image folder")

    files = []
    for parent, _, names in os.walk(folder, onerror=refuse):  # followlinks=False
        files += [Path(parent, name) for name in names if Path(name).suffix.lower() in EXTENSIONS]
    return sorted(f for f in files if f.is_file() or _dangling(f))


def _dangling(path: Path) -> bool:
    """A link whose target is missing or is a loop of links."""
    return path.is_symlink() and not path.exists()


def check_same_classes(root: Path, layout: Layout, found: dict[str, dict[str, list[Path]]]) -> None:
    """Every split folder must hold every class: a class absent from one split is silently never tested."""
    every_class = set().union(*found.values())
    gaps = [f"{layout.trees[split].name}/ lacks {_names(sorted(every_class - set(classes)))}"
            for split, classes in found.items() if every_class - set(classes)]
    if gaps:
        raise ConfigError(f"the split folders under {root} hold different classes: {'; '.join(gaps)}. "
                          "Give every split folder the same class folders")


def find_images(root: Path) -> tuple[Layout, dict[str, dict[str, list[Path]]]]:
    """The layout and {split or "all": {class: [files]}}, checked so that training can work at all."""
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}")
    layout = find_layout(root)
    found = {split: class_files(tree) for split, tree in layout.trees.items()}
    pool = layout.trees[layout.pool]
    if len(found[layout.pool]) < 2:
        raise ConfigError(f"{pool} needs at least two class folders, found {len(found[layout.pool])} "
                          f"(one folder per class: {pool}/<class>/*.jpg)")
    check_same_classes(root, layout, found)
    return layout, found


def load_rgb(path: Path | BinaryIO, stored_size: int) -> np.ndarray:
    """Decode one file into a (stored_size, stored_size, 3) uint8 array."""
    with warnings.catch_warnings():  # Pillow's warning about a large image: the checks below decide
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)
    with opened as image:
        # Sizes known from the header, checked before anything is decoded. Pillow refuses twice its limit
        # itself, unless a library turned the limit off (Image.MAX_IMAGE_PIXELS = None): checked here too.
        _refuse_bombs(image, 2 * MAX_PIXELS)
        image.draft(image.mode, (2 * stored_size, 2 * stored_size))  # JPEG: decode large images at reduced scale
        _refuse_bombs(image, MAX_PIXELS)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
            array = np.clip(np.asarray(image, dtype=np.float64), 0, None)  # 32-bit may be negative: black
            image = Image.fromarray((255 * array / max(array.max(), 1)).astype(np.uint8))
        image = image.convert("RGB")
        return np.asarray(ImageOps.fit(image, (stored_size, stored_size), Image.Resampling.BILINEAR))


def _refuse_bombs(image: Image.Image, limit: int) -> None:
    if image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width} x {image.height} px is more than the {limit:,} pixels an image may have "
            "(a decompression bomb, or a scan to downscale first)")


def decode(path: Path, stored_size: int) -> tuple[np.ndarray | None, str]:
    """One file, as every ingest decodes it: (its pixels, the SHA-256 of its bytes), or (None, the
    error in one line) when Pillow cannot read it."""
    image, error = read_image(path, stored_size)
    return (image, _sha256(path)) if image is not None else (None, error)


def read_image(path: Path | BinaryIO, stored_size: int) -> tuple[np.ndarray | None, str]:
    """(its pixels, "") or (None, why it cannot be read, in one line): ``load_rgb`` for files that may be bad
    (a path, or the bytes of a file: a served model's request)."""
    try:
        return load_rgb(path, stored_size), ""
    except UNREADABLE as error:
        return None, f"{type(error).__name__}: {error}".splitlines()[0]


def _decode_files(paths: Sequence[Path], stored_size: int) -> list[tuple[np.ndarray | None, str]]:
    """A decoding process's task: a chunk of files, in order."""
    return [decode(path, stored_size) for path in paths]


def default_workers() -> int:
    """One decoding process per core this process may run on, at most ``MAX_DEFAULT_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def decode_all(paths: Sequence[Path], stored_size: int, workers: int,
               desc: str = "Decoding") -> Iterator[tuple[np.ndarray | None, str]]:
    """``decode`` for every file, yielded in file order, by ``workers`` processes (1: this one)."""
    with tqdm(total=len(paths), desc=desc, unit="img") as progress:
        if workers <= 1 or len(paths) < IN_PROCESS_BELOW:
            for path in paths:
                yield decode(path, stored_size)
                progress.update()
            return
        chunk = max(1, min(CHUNK, len(paths) // (AHEAD * workers)))
        chunks = (paths[start:start + chunk] for start in range(0, len(paths), chunk))
        context = multiprocessing.get_context(START_METHOD)
        pool = ProcessPoolExecutor(workers, mp_context=context)
        try:
            first = zip(range(AHEAD * workers), chunks)
            pending = deque(pool.submit(_decode_files, part, stored_size) for _, part in first)
            while pending:  # the oldest task first: results come back in file order
                results = pending.popleft().result()
                following = next(chunks, None)
                if following is not None:
                    pending.append(pool.submit(_decode_files, following, stored_size))
                yield from results
                progress.update(len(results))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


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
                 test_fraction: float = 0.1, seed: int = 0, skip_bad_images: bool = False, workers: int | None = None):
        if not 0 <= val_fraction + test_fraction < 1:
            raise ConfigError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"workers must be an integer >= 1 (1: decode in this process), or null "
                              f"(one process per core, at most {MAX_DEFAULT_WORKERS}), got {workers!r}")
        # Not a setting: the cache is the same, byte for byte, whatever the number of decoding processes.
        self.workers = default_workers() if workers is None else workers
        self.root = Path(root).expanduser().resolve()
        self.cache_root = Path(cache_root)
        self.settings = {"source": "imagefolder-v1", "root": str(self.root), "stored_size": stored_size,
                         "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                         "skip_bad_images": skip_bad_images}
        self._reported: Path | None = None  # training prepares several times; say it once

    def _listing(self) -> tuple[Layout, list[tuple[str, str, str, Path]]]:
        """The layout, and (tree, class, relative path, path) for every image; tree is a split or "all"."""
        layout, found = find_images(self.root)
        rows = []
        for tree, classes in found.items():
            for class_name, files in classes.items():
                rows += [(tree, class_name, str(f.relative_to(self.root)), f) for f in files]
        return layout, rows

    def prepare(self) -> ImageCache:
        layout, rows = self._listing()
        # Any added, removed or rewritten file changes the key, and so gives a new cache; so does the
        # layout, which decides the splits (caches read before layouts were told apart are never reused).
        stats = [(rel, *_size_and_time(f)) for _, _, rel, f in rows]
        key = settings_hash({**self.settings, "layout": layout.name, "files": stats})
        cache_dir = self.cache_root / f"imagefolder-{key}"
        cache = ImageCache(build_once(cache_dir, lambda: self._ingest(layout, rows, cache_dir)))
        if self._reported != cache_dir:
            self._report(layout, cache)
            self._reported = cache_dir
        return cache

    def _report(self, layout: Layout, cache: ImageCache) -> None:
        """One line on the layout and split sizes, and one on skipped files: to the console and the run's log."""
        fractions = {"val": self.settings["val_fraction"], "test": self.settings["test_fraction"]}
        sizes = ", ".join(f"{split} {len(cache.split(split).labels):,}" for split in SPLITS)
        log.info("imagefolder %s: layout %s: %s images, %d classes", self.root, layout.describe(fractions), sizes,
                 len(cache.classes))
        skipped = cache.meta.get("skipped", [])
        if skipped:
            log.warning("imagefolder %s: skipped %d unreadable image(s) (data.source.skip_bad_images=true): %s; "
                        "all with their errors in %s", self.root, len(skipped), _names(b["file"] for b in skipped),
                        cache.dir / "meta.json")

    def _ingest(self, layout: Layout, rows, cache_dir: Path) -> None:
        """Decode every file straight into the cache's arrays, each at its place in file order.

        The split of each image is planned before decoding, as if every file were readable (the usual
        case), so that each one is written once, where it belongs. Unreadable files change the
        carved splits (they are drawn from the images kept): then the kept images are moved to their
        final places, through a second set of arrays, on disk.
        """
        classes = sorted({class_name for _, class_name, _, _ in rows})
        size = self.settings["stored_size"]
        labels = np.array([classes.index(class_name) for _, class_name, _, _ in rows], dtype=np.int64)
        trees = np.array([tree for tree, *_ in rows], dtype=object)
        planned = self._splits(layout, trees, labels)
        with staged(cache_dir) as tmp:
            images, place = _allocate(tmp, planned, size)
            digests, bad = [], []
            decoded = decode_all([row[3] for row in rows], size, self.workers, desc=f"Decoding {self.root.name}")
            with closing(decoded):  # an error here stops the decoding processes at once
                for row, split, index, (pixels, note) in zip(rows, planned, place, decoded, strict=True):
                    if pixels is None:
                        bad.append({"file": row[2], "error": note})
                    else:
                        images[split][index] = pixels
                    digests.append(None if pixels is None else note)
            if bad and not self.settings["skip_bad_images"]:
                listing = "; ".join(f"{b['file']} ({b['error']})" for b in bad)
                raise ConfigError(f"{len(bad)} unreadable image(s) under {self.root}: {listing}. "
                                  "Fix or remove them, or set data.source.skip_bad_images=true")
            kept = np.array([digest is not None for digest in digests], dtype=bool)
            splits = planned
            if bad:
                splits = np.full(len(rows), None, dtype=object)
                splits[kept] = self._splits(layout, trees[kept], labels[kept])
                images = _regroup(tmp, images, planned, place, splits, size)
            for split in SPLITS:
                if isinstance(images[split], np.memmap):
                    images[split].flush()
                np.save(tmp / f"{split}_labels.npy", labels[kept & (splits == split)])
            del images
            manifest = [{"file": rel, "class": class_name, "split": str(split), "sha256": digest}
                        for (_, class_name, rel, _), split, digest in zip(rows, splits, digests) if digest is not None]
            meta = {"classes": classes, "source": {**self.settings, "layout": layout.name}, "files": manifest,
                    "skipped": bad}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # last: it marks the cache complete

    def _splits(self, layout: Layout, trees: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each image's split: its split folder's, or carved per class from the pool (train/, or all)."""
        splits = trees.copy()
        if layout.carved:
            pool = trees == layout.pool
            fraction = {split: self.settings[f"{split}_fraction"] if split in layout.carved else 0.0
                        for split in ("val", "test")}
            splits[pool] = stratified_split(labels[pool], fraction["val"], fraction["test"], self.settings["seed"])
        return splits


def _allocate(folder: Path, splits: np.ndarray, size: int, suffix: str = "") -> tuple[dict, np.ndarray]:
    """``<split>_images<suffix>.npy`` for each split, memory-mapped and of its final size, and each
    image's index in its split's array (file order within a split)."""
    images, place = {}, np.zeros(len(splits), dtype=np.int64)
    for split in SPLITS:
        members = splits == split
        place[members] = np.arange(members.sum())
        images[split] = np.lib.format.open_memmap(folder / f"{split}_images{suffix}.npy", mode="w+", dtype=np.uint8,
                                                  shape=(int(members.sum()), size, size, 3))
    return images, place


def _regroup(folder: Path, images: dict, planned: np.ndarray, place: np.ndarray, splits: np.ndarray,
             size: int) -> dict:
    """Move the kept images (a split, not None) from their planned places to their final ones."""
    final, final_place = _allocate(folder, splits, size, suffix=".regrouped")
    for i in np.flatnonzero(splits != None):  # noqa: E711 (element-wise)
        final[splits[i]][final_place[i]] = images[planned[i]][place[i]]
    for split in SPLITS:
        final[split].flush()
        del images[split]
        (folder / f"{split}_images.regrouped.npy").replace(folder / f"{split}_images.npy")
    return final


def _size_and_time(path: Path) -> tuple[int, int]:
    """What tells a changed file: its target's size and time, or the link's own when it has no target."""
    try:
        stat = path.stat()
    except OSError:  # a dangling link or a loop of links: reported as unreadable when decoded
        stat = path.lstat()
    return stat.st_size, stat.st_mtime_ns


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
