"""``python src/predict.py``: the top classes of a user's own images, by a checkpoint or an exported model.

Each file is prepared as the test split's images were: decoded by the data layer's loader to the
model's stored size, then resized and centre-cropped to its image size (and, with ``tta=``, the
test-time views averaged as evaluation averages them). Files that cannot be read are listed at the
end; the others are predicted all the same.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import tracking
from ..data.augment import tta_views
from ..data.datamodule import default_num_workers, to_tensor
from ..data.imagefolder import EXTENSIONS, image_files, read_image
from ..errors import ConfigError
from ..evaluation.tta import average_probabilities
from ..files import write_text
from .classifier import Classifier, load_classifier

log = logging.getLogger(__name__)


class ImageFileViews(Dataset):
    """Files as (index, their views (V, 3, H, W) uint8 or None, why not): decoding runs in the loader's workers."""

    def __init__(self, paths: Sequence[Path], stored_size: int, views: Sequence):
        self.paths, self.stored_size, self.views = list(paths), stored_size, list(views)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image, error = read_image(self.paths[index], self.stored_size)
        return (index, None, error) if image is None else (index, views_of(image, self.views), "")


def views_of(image: np.ndarray, views: Sequence) -> torch.Tensor:
    """A decoded image (H, W, 3) as its stack of views (V, 3, S, S), uint8."""
    return torch.stack([to_tensor(view(image=image)["image"]) for view in views])


def mean_probabilities(classifier: Classifier, batch: torch.Tensor) -> torch.Tensor:
    """(images, views, 3, S, S) uint8 -> (images, classes): every view through the model at once, their
    probabilities averaged as evaluation averages them."""
    images, per_image = batch.shape[:2]
    return average_probabilities(classifier(batch.flatten(0, 1)).view(images, per_image, -1))


def collate(items):
    """A batch of the readable files' views, their indices, and the unreadable ones' errors by index."""
    readable = [(index, views) for index, views, _ in items if views is not None]
    errors = {index: error for index, views, error in items if views is None}
    views = torch.stack([v for _, v in readable]) if readable else None
    return [index for index, _ in readable], views, errors


def find_images(images: str | Path) -> list[Path]:
    """An image file, or every image file in a folder and its sub-folders (sorted)."""
    path = Path(images).expanduser()
    if path.is_dir():
        found = image_files(path)
        if not found:
            raise ConfigError(f"no image files ({', '.join(sorted(EXTENSIONS))}) in {path}")
        return found
    return [path]


def predict_files(classifier: Classifier, paths: Sequence[Path], views: Sequence, batch_size: int,
                  num_workers: int) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Mean probabilities over ``views`` per readable file, and the errors of the others, by index."""
    loader = DataLoader(ImageFileViews(paths, classifier.stored_size, views), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate)
    probabilities, errors = {}, {}
    for indices, batch, failed in tqdm(loader, desc="Predicting", unit="batch", disable=len(paths) <= batch_size):
        errors.update(failed)
        if batch is not None:
            probabilities.update(zip(indices, mean_probabilities(classifier, batch)))
    return probabilities, errors


def top_classes(probabilities: torch.Tensor, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    values, indices = probabilities.topk(min(k, len(classes)))
    return [(classes[i], round(float(v), 6)) for v, i in zip(values, indices)]


def predict(cfg: DictConfig) -> dict:
    """Predict ``cfg.images`` with ``cfg.ckpt``; print the results and write predictions.csv and .json."""
    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)  # where runs:/ references resolve
    classifier = load_classifier(str(cfg.ckpt), "cuda" if torch.cuda.is_available() else "cpu")
    paths = find_images(cfg.images)
    tta = OmegaConf.to_container(cfg.tta, resolve=True)
    views = tta_views(classifier.image_size, **tta)
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    log.info(f"Predicting {len(paths)} image{'s' * (len(paths) != 1)} with {classifier.source} "
             f"({classifier.image_size} px, {len(views)} view{'s' * (len(views) != 1)} each)")
    probabilities, errors = predict_files(classifier, paths, views, cfg.batch_size, min(workers, len(paths)))
    if not probabilities:
        raise ConfigError(f"none of the {len(paths)} files could be read as an image; the first: "
                          f"{paths[min(errors)]}: {errors[min(errors)]}")
    results = {
        "model": classifier.source, "train_run_id": classifier.train_run_id, "classes": classifier.classes,
        "image_size": classifier.image_size, "tta": OmegaConf.select(cfg, "hydra:runtime.choices.tta", default=None),
        "predictions": [{"path": str(paths[i]), "top_k": [{"class": c, "probability": p} for c, p in
                                                          top_classes(probabilities[i], classifier.classes, cfg.top_k)]}
                        for i in sorted(probabilities)],
        "unreadable": [{"path": str(paths[i]), "error": errors[i]} for i in sorted(errors)],
    }
    write_results(Path(cfg.output_dir), results)
    report(results, cfg.shown, Path(cfg.output_dir))
    return results


def write_results(directory: Path, results: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "predictions.json", json.dumps(results, indent=2))
    k = max(len(row["top_k"]) for row in results["predictions"])
    with open(directory / "predictions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", *[f"{name}_{rank}" for rank in range(1, k + 1) for name in ("class", "probability")]])
        for row in results["predictions"]:
            ranked = [value for top in row["top_k"] for value in (top["class"], top["probability"])]
            writer.writerow([row["path"], *ranked])


def report(results: dict, shown: int, directory: Path) -> None:
    rows = results["predictions"]
    for row in rows[:shown]:
        log.info(f"{row['path']}: " + ", ".join(f"{top['class']} {top['probability']:.3f}" for top in row["top_k"]))
    if len(rows) > shown:
        log.info(f"... and {len(rows) - shown} more (all in predictions.csv)")
    if results["unreadable"]:
        log.warning(f"{len(results['unreadable'])} file{'s' * (len(results['unreadable']) != 1)} could not be read:")
        for row in results["unreadable"]:
            log.warning(f"  {row['path']}: {row['error']}")
    log.info(f"Outputs: {directory.resolve()}")
