"""Faults the tests inject into real runs (``+callbacks.fault._target_=faults.InfiniteWeight``, with
``tests/`` on PYTHONPATH): what no config can make happen on cue."""

import pytorch_lightning as pl
import torch


class InfiniteWeight(pl.Callback):
    """At the start of epoch ``epoch`` (counted from 1), one weight of the network becomes infinite, as
    after an overflow: every loss from then on is NaN."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("inf")
