"""One evaluation run: a checkpoint on the test split, plain and with test-time views, tracked in MLflow."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

from .. import tracking
from ..checkpoints import read_checkpoint
from ..data.augment import tta_views
from ..errors import ConfigError
from ..files import write_text
from ..training.module import ImageClassifier
from .reports import scores, write_reports
from .tta import predict, view_loader

log = logging.getLogger(__name__)

PLAIN = "none"  # the single view training's test step sees: the baseline every mode is compared with


def load_checkpoint(reference: str) -> tuple[ImageClassifier, str | None]:
    """The model of a checkpoint file or of ``runs:/<run id>``, and the MLflow run that trained it."""
    path = tracking.run_artifact(reference) if reference.startswith("runs:/") else Path(reference).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {reference!r} not found")
    # read safely first: Lightning's own read refuses pickled code too, but in a page of advice
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a checkpoint of a training run (it has no state_dict)")
    train_run_id = checkpoint.get("mlflow_run_id")
    return ImageClassifier.load_from_checkpoint(path, map_location="cpu"), train_run_id


def data_for(module: ImageClassifier, data: DictConfig, script: str):
    """The data module ``data`` describes, its cache prepared (its classes, its splits), refused in one line
    when its classes are not the checkpoint's (``script``: what the user runs, named in the advice)."""
    datamodule = instantiate(data)
    datamodule.prepare_data()
    if module.classes != datamodule.classes:
        raise ConfigError(f"the checkpoint's classes {module.classes} differ from the data's "
                          f"{datamodule.classes}: {script} with the data settings it was trained with")
    return datamodule


def view_groups(mode: str, tta: Mapping, image_size: int) -> tuple[list, dict[str, slice]]:
    """Each image's views and which of them each reported mode averages.

    The plain view comes first and is scored alone as ``none``, so every evaluation also says
    what the test-time views gain over it, from the same pass through the model.
    """
    plain = tta_views(image_size)
    if mode == PLAIN:
        if dict(tta) != {"crops": 1, "flip": False, "resize_ratio": 1.0, "scales": [1.0]}:
            raise ConfigError("tta=none is the plain view alone; choose tta=flip, five_crop or ten_crop "
                              f"to change the views (got {dict(tta)})")
        return plain, {PLAIN: slice(0, 1)}
    views = tta_views(image_size, **tta)
    return plain + views, {PLAIN: slice(0, 1), mode: slice(1, 1 + len(views))}


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Score ``cfg.ckpt`` on the test split with ``none`` and the selected ``tta``; write and track the results."""
    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)  # where runs:/ references resolve
    module, train_run_id = load_checkpoint(str(cfg.ckpt))
    with tracking.tracked_run(cfg, "evaluate", tags={"cnnlab.train_run_id": train_run_id} if train_run_id else {},
                              trainer=False) as logger:
        datamodule = data_for(module, cfg.data, "evaluate")
        mode = cfg.evaluate.mode
        views, groups = view_groups(mode, OmegaConf.to_container(cfg.tta, resolve=True), cfg.evaluate.image_size)
        loader = view_loader(datamodule.cache.split("test"), views, cfg.evaluate.batch_size,
                             datamodule.loader_workers)
        mode_views = groups[mode].stop - groups[mode].start
        extra = "" if mode == PLAIN else f" (and the plain view, {PLAIN})"
        log.info(f"Evaluating {cfg.ckpt} on {len(loader.dataset)} test images, "
                 f"tta={mode}: {mode_views} views per image{extra}")
        probabilities, labels = predict(module, loader, groups, "cuda" if torch.cuda.is_available() else "cpu")
        metrics = {name: scores(p, labels) for name, p in probabilities.items()}
        files = write_outputs(Path(cfg.evaluate.output_dir), cfg, metrics, probabilities[mode], labels,
                              module.classes, train_run_id, logger)
        if logger is not None:
            log_run(logger, cfg, metrics, files, mode_views)
        report(metrics, mode, mode_views, cfg.evaluate.output_dir)
    return metrics


def write_outputs(directory: Path, cfg: DictConfig, metrics: dict, probabilities: torch.Tensor, labels: torch.Tensor,
                  classes: list[str], train_run_id: str | None, logger: MLFlowLogger | None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    reference = str(cfg.ckpt)
    summary = {
        "checkpoint": reference if reference.startswith("runs:/") else str(Path(reference).expanduser().resolve()),
        "train_run_id": train_run_id,
        "mlflow_run_id": logger.run_id if logger is not None else None,
        "tta": cfg.evaluate.mode,
        "classes": classes,
    }
    write_text(directory / "evaluation.json", json.dumps(summary, indent=2))
    # the run folder's metrics, also what DVC reads as the stage's metrics
    write_text(directory / "metrics.json", json.dumps(metrics, indent=2))
    reports = write_reports(directory, probabilities, labels, classes, mode=cfg.evaluate.mode)
    return [directory / "metrics.json", directory / "evaluation.json", *reports]


def log_run(logger: MLFlowLogger, cfg: DictConfig, metrics: dict, files: list[Path], views: int) -> None:
    # The model comes from the checkpoint, not from cfg.model: only what this run used is logged.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    used = {key: resolved[key] for key in ("ckpt", "tta", "data", "evaluate")}
    logger.log_hyperparams({**tracking.flatten(used), "views": views})
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(used), "config.yaml")
    logger.log_metrics({f"test/{mode}/{name}": value
                        for mode, values in metrics.items() for name, value in values.items()})
    tracking.log_files(logger, files)


def report(metrics: dict, mode: str, views: int, output_dir: str) -> None:
    plain = metrics[PLAIN]["acc"]
    line = f"\nTest accuracy: {PLAIN} {plain:.4f}"
    if mode != PLAIN:
        gain = 100 * (metrics[mode]["acc"] - plain)
        line += f", {mode} {metrics[mode]['acc']:.4f} ({gain:+.2f} points with {views} views per image)"
    log.info(line)
    log.info(f"Outputs: {Path(output_dir).resolve()}")
