"""Pictures of what an augmentation policy does, for people who would rather look than read."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from .augment import eval_transform, train_transform


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST)


def _caption(width: int, text: str, height: int = 22) -> np.ndarray:
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _sheet(rows: list[list[np.ndarray]], row_labels: list[str], title: str, tile: int) -> np.ndarray:
    """Tiles in rows with a gap between them, each row with its label and the sheet with a title."""
    gap = 4
    width = max(len(r) for r in rows) * (tile + gap) + gap
    parts = [_caption(width, title, 26)]
    for label, row in zip(row_labels, rows):
        band = np.full((tile + 2 * gap, width, 3), 255, np.uint8)
        for i, image in enumerate(row):
            band[gap:gap + tile, gap + i * (tile + gap):gap + i * (tile + gap) + tile] = _tile(image, tile)
        parts += [_caption(width, label), band]
    return np.concatenate(parts, axis=0)


def policy_grid(images: list[np.ndarray], labels: list[str], distortions: Mapping, policy: str,
                image_size: int, versions: int = 8, tile: int = 96, seed: int = 0) -> np.ndarray:
    """One row per image: the image as evaluation sees it, then ``versions`` augmented copies."""
    augment, original = train_transform(distortions, image_size), eval_transform(image_size)
    augment.set_random_seed(seed)
    rows = [[original(image=img)["image"]] + [augment(image=img)["image"] for _ in range(versions)] for img in images]
    return _sheet(rows, [f"{label}: original, then {versions} draws" for label in labels],
                  f"augment={policy}", tile)


def distortion_sheet(image: np.ndarray, distortions: Mapping, image_size: int, versions: int = 8,
                     tile: int = 96, seed: int = 0) -> np.ndarray:
    """One row per distortion of the policy, applied alone (always, p=1) to the same image."""
    rows, labels = [], []
    for name, distortion in distortions.items():
        if distortion is None:
            continue
        always = copy.deepcopy(distortion)
        always.p = 1.0
        transform = train_transform({name: always}, image_size)
        transform.set_random_seed(seed)
        rows.append([transform(image=image)["image"] for _ in range(versions)])
        labels.append(f"{name}: {type(distortion).__name__}")
    if not rows:
        rows, labels = [[eval_transform(image_size)(image=image)["image"]]], ["no distortions"]
    return _sheet(rows, labels, "each distortion alone", tile)


def write_png(path: Path, sheet: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def write_previews(cfg) -> list[Path]:
    """The policy grid and the per-distortion sheet for a composed config; prints where they are."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    distortions = instantiate(cfg.augment)
    cache = instantiate(cfg.data.source).prepare()
    train = cache.split("train")
    # one image of each class first, so the rows show different classes
    picks = [int(np.flatnonzero(train.labels == label)[0]) for label in np.unique(train.labels)][: cfg.preview.images]
    images = [np.asarray(train.images[i]) for i in picks]
    labels = [cache.classes[train.labels[i]] for i in picks]
    policy = HydraConfig.get().runtime.choices.get("augment", "custom") if HydraConfig.initialized() else "custom"
    policy = policy.replace("/", "_")  # a choice from a nested or outside yaml (augment=../x) names a file here
    out = Path(cfg.preview.output_dir)
    size, p = cfg.data.image_size, cfg.preview
    paths = [
        write_png(out / f"augment_{policy}.png",
                  policy_grid(images, labels, distortions, policy, size, p.versions, p.tile, cfg.seed)),
        write_png(out / f"augment_{policy}_distortions.png",
                  distortion_sheet(images[p.distortion_row % len(images)], distortions, size, p.versions, p.tile, cfg.seed)),
    ]
    for path in paths:
        print(path)
    return paths
