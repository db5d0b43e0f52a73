"""Per-epoch metrics as a CSV file, one row per epoch: what `dvc plots` draws as training curves.

MLflow keeps the same values, but DVC plots read files. The run's only logger is MLflow's, so
this is a callback: the pipeline adds it with ``+callbacks.history._target_=cnnlab.pipeline.history.EpochHistory``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytorch_lightning as pl

from ..files import written_whole

COLUMNS = ("train/loss", "train/acc", "val/loss", "val/acc")


class EpochHistory(pl.Callback):
    """Writes ``history.csv`` (epoch, train and validation loss and accuracy) into the run folder."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is None:  # the run folder: Hydra's, or Lightning's outside Hydra
            from hydra.core.hydra_config import HydraConfig

            folder = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else trainer.default_root_dir
            self.path = Path(folder) / "history.csv"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called after the epoch's validation, so both halves are in callback_metrics.
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        row.update({name.replace("/", "_"): f"{float(metrics[name]):.6g}" for name in COLUMNS if name in metrics})
        self.rows.append(row)
        # rewritten every epoch, so an interrupted run still shows its curve so far
        self.path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        with written_whole(self.path) as partial, open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
