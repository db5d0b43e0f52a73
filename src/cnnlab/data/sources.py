"""Data sources: each prepares one dataset into the shared cache format (see cache.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from . import shapes
from .cache import SPLITS, ImageCache, build_once, settings_hash, write_cache


class ShapesSource:
    """The generated shapes dataset (see shapes.py), prepared once per distinct setting."""

    def __init__(self, root: str | Path, classes: Sequence[str], image_size: int = 32,
                 train_size: int = 5000, val_size: int = 1000, test_size: int = 1000, seed: int = 0,
                 radius: Sequence[float] = shapes.RADIUS, max_offset: float | None = None):
        classes = list(classes)
        shapes.check_classes(classes)
        radius = tuple(float(r) for r in radius)
        shapes.check_placement(radius, max_offset)
        self.root = Path(root)
        self.placement = {"radius_range": radius, "max_offset": max_offset}
        self.settings = {"generator": "shapes-v1", "classes": classes, "image_size": image_size,
                         "sizes": {"train": train_size, "val": val_size, "test": test_size}, "seed": seed}
        # Only a placement other than the default enters the settings, so every cache made before these
        # options existed keeps its hash (its folder name) and its bytes.
        if (radius, max_offset) != (shapes.RADIUS, None):
            self.settings["placement"] = {"radius": list(radius), "max_offset": max_offset}

    @property
    def cache_dir(self) -> Path:
        return self.root / f"shapes-{settings_hash(self.settings)}"

    def prepare(self) -> ImageCache:
        return ImageCache(build_once(self.cache_dir, self._generate))

    def _generate(self) -> None:
        s = self.settings
        splits = {}
        with tqdm(total=sum(s["sizes"].values()), desc="Generating shapes", unit="img") as progress:
            # Each split has its own seed so that changing one split's size leaves the others as they were.
            for offset, (split, size) in enumerate(s["sizes"].items()):
                splits[split] = shapes.generate_split(size, s["classes"], s["image_size"],
                                                      seed=s["seed"] * 1000 + offset, progress=progress,
                                                      **self.placement)
        write_cache(self.cache_dir, splits, {"classes": s["classes"], "source": s})


def prepare(cfg) -> ImageCache:
    """``python src/prepare.py``: prepare the configured data's cache, as a tracked run (stage ``prepare``:
    which cache, how many images per split, the files left out)."""
    from hydra.utils import instantiate

    from .. import tracking

    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)  # a server must answer before any work
    with tracking.tracked_run(cfg, "prepare", trainer=False) as logger:
        cache = prepare_and_report(instantiate(cfg.data.source))
        if logger is not None:
            tracking.log_data(logger, cache, "preparation")
            logger.log_metrics({f"images/{split}": len(cache.split(split).labels) for split in SPLITS})
    return cache


def prepare_and_report(source) -> ImageCache:
    """Prepare a source's cache (a no-op when it is up to date) and say where it is and what it holds."""
    cache = source.prepare()
    sizes = ", ".join(f"{split} {len(cache.split(split).labels)}" for split in SPLITS)
    print(f"{cache.dir}: {len(cache.classes)} classes ({', '.join(cache.classes)}); {sizes} images")
    return cache
