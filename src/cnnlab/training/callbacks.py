"""Callbacks every run has: checkpoints whose last.ckpt is truly the last epoch, the random generators in
every checkpoint, a log line per epoch, and a stop at the first non-finite loss."""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ..errors import RunFailed

log = logging.getLogger(__name__)


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the end of the latest completed epoch.

    Lightning 2.6 rewrites ``last.ckpt`` only when it also saves a top-k checkpoint, so once the
    monitored metric stops improving ``last.ckpt`` stays at the best epoch, and a resume from it
    silently repeats epochs. Here the last checkpoint is also written whenever the top-k one was not.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        # skipped when a checkpoint was already saved at this step, during the sanity check, or outside fit
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RandomStates(pl.Callback):
    """Keeps the process's random generators (torch, numpy, Python's, CUDA's) in every checkpoint and
    restores them on resume, so that dropout and anything else drawn after a resume is what an
    uninterrupted run would have drawn. (The data's order and distortions come from the seed and
    the epoch alone; see data/datamodule.py.) Stored as tensors and plain numbers, which
    ``torch.load(weights_only=True)`` reads.
    """

    def state_dict(self) -> dict:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class EpochLog(pl.Callback):
    """One line per epoch (its metrics, learning rate and time) in the run's log and on the console.

    This is what a log file, a CI job, a DVC stage or ``nohup`` shows of a run's progress: a
    progress bar draws nothing readable when the output is not a terminal.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics  # the epoch's validation has run by now
        parts = [f"{split} " + " ".join(f"{name.split('/')[1]} {float(metrics[name]):.4f}" for name in sorted(metrics)
                                        if name.startswith(f"{split}/") and name != f"{split}/images")
                 for split in ("train", "val")]
        learning_rate = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        lr = f"lr {learning_rate:.3g}, " if learning_rate is not None else ""
        log.info(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {' | '.join(parts)} "
                 f"({lr}{time.perf_counter() - self.started:.1f} s)")


class LearningRates(pl.Callback):
    """The learning rate at each epoch's start as one metric, ``lr``: one chart in the MLflow UI.

    Lightning's LearningRateMonitor logs every param group, and the weight-decay split (biases and
    norms without decay) gives every run two identical ones. A rate that differs from the first
    group's (layers unfrozen at a lower rate, training/finetune.py) is ``lr/<k>``, k counting the
    distinct rates in group order.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is None or not trainer.optimizers:
            return
        rates = list(dict.fromkeys(group["lr"] for group in trainer.optimizers[0].param_groups))
        metrics = {"lr": rates[0], **{f"lr/{k}": rate for k, rate in enumerate(rates[1:], start=1)}}
        trainer.logger.log_metrics(metrics, step=trainer.global_step)


class NonFiniteLoss(RunFailed):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(pl.Callback):
    """Stops training at the first NaN or infinite training loss, before that epoch's checkpoints are
    written, so ``last.ckpt`` stays the last good epoch and the run ends FAILED with one line.

    Reading each step's loss at once would make every step wait for the GPU. Each step instead
    queues a copy of its loss to the host and goes on; copies are read once they have arrived, and
    all of them before the epoch's validation (after which the checkpoints are written).
    """

    def __init__(self):
        self.pending: list[tuple[int, int, int, torch.Tensor, torch.cuda.Event | None]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = loss.detach().float().to("cpu", non_blocking=True)
        arrived = None
        if loss.is_cuda:
            arrived = torch.cuda.Event()
            arrived.record()
        self.pending.append((trainer.current_epoch, trainer.global_step, batch_idx, value, arrived))
        self._check(trainer, wait=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, wait=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, wait=True)

    def _check(self, trainer: pl.Trainer, wait: bool) -> None:
        while self.pending:
            epoch, step, batch_idx, value, arrived = self.pending[0]
            if arrived is not None and not wait and not arrived.query():
                return  # not on the host yet: looked at again after a later step
            if arrived is not None:
                arrived.synchronize()
            self.pending.pop(0)
            if not math.isfinite(value.item()):
                self.pending.clear()
                raise NonFiniteLoss(f"the training loss became {value.item()} at epoch {epoch + 1}, step {step} "
                                    f"(batch {batch_idx + 1} of the epoch); training stopped. {last_good(trainer)} "
                                    "A lower optimizer.lr or gradient clipping (trainer.gradient_clip_val=1.0) "
                                    "usually helps")


def last_good(trainer: pl.Trainer) -> str:
    """Where the last good state is: the last checkpoint written, if an epoch ended before."""
    path = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    if not path:
        return "No epoch had finished, so there is no checkpoint."
    return f"The last good checkpoint is {path} (the end of epoch {trainer.current_epoch})."
