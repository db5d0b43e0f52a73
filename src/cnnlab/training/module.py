"""The LightningModule: a cnnlab Net, its loss, optimizer, schedule and metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..models import count_parameters

log = logging.getLogger(__name__)


def parameter_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on weights only, not on biases and normalisation parameters (no empty groups)."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def classification_metrics(num_classes: int) -> MetricCollection:
    # validate_args=False: the labels come from our own caches, and checking them (torch.unique on the
    # accelerator) made every step wait for the GPU, which then idled while the next step was queued
    metrics = {
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False),
        "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
    # compute_groups=False: torchmetrics would otherwise merge metrics whose states happen to be equal
    # after the first update (a first batch that is all correct makes top-1 and top-5 agree) into one
    # state, and then compute F1 and top-1 from the top-5 statistics for the rest of the epoch.
    return MetricCollection(metrics, compute_groups=False)


class ImageCount(Metric):
    """How many images a split's metrics cover, summed over every process (each evaluation image once)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("images", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: int) -> None:
        self.images += images  # a Python number: no copy to the GPU, so no wait for it

    def compute(self) -> torch.Tensor:
        return self.images.float()


class MeanLoss(ImageCount):
    """A split's mean loss per image over every process's share. (torchmetrics' MeanMetric checks each
    value for NaN, which makes every step wait for the GPU, and with the check off ignores the weights.)"""

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, images: int) -> None:
        self.total += loss.detach() * images
        super().update(images)

    def compute(self) -> torch.Tensor:
        return self.total / self.images


class ImageClassifier(pl.LightningModule):
    """Trains a model built from its config on uint8 image batches.

    Everything the module needs is plain config (saved in every checkpoint), so
    ``ImageClassifier.load_from_checkpoint(path)`` rebuilds it without Hydra.
    Images arrive as uint8 (N, 3, H, W), pixels 0-255, and are normalised here, on the accelerator,
    which keeps the DataLoader workers and the host-to-device copies four times lighter than
    float32. So ``module(images)`` takes uint8 images and refuses floats; ``module.net`` is the bare
    network on normalised float images. ``image_size`` and ``stored_size`` record how its images were
    made (decoded to ``stored_size`` squares, then resized and centre-cropped to ``image_size``), so that
    prediction and export prepare a user's images the same way.
    """

    def __init__(self, model: Mapping, classes: Sequence[str], optimizer: Mapping, scheduler: Mapping | None = None,
                 label_smoothing: float = 0.0, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25), image_size: int | None = None,
                 stored_size: int | None = None):
        super().__init__()
        # The run logs its whole config itself; logging these again would only duplicate params.
        self.save_hyperparameters(logger=False)
        self.classes = list(classes)
        self.net = instantiate(model, num_classes=len(self.classes))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.register_buffer("mean", 255 * torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        metrics = classification_metrics(len(self.classes))
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # torchmetrics, not self.log's per-process means: under DDP they gather every process's share,
        # weighted by its images (a loss mean of the processes' means is not the split's mean)
        self.train_loss, self.val_loss, self.test_loss = MeanLoss(), MeanLoss(), MeanLoss()
        self.val_images, self.test_images = ImageCount(), ImageCount()
        self.trains_on_features = False  # set by training/features.py for a frozen trunk's cached features

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The checkpoint holds the weights now: rebuilding from it must not read (or need) the
        # file the run started from. The run's MLflow params still say where that was.
        model = checkpoint["hyper_parameters"]["model"]
        checkpoint["hyper_parameters"]["model"] = {**model, "pretrained": None}
        # which tracked run made it, so evaluations and ensembles can point back to it
        checkpoint["mlflow_run_id"] = getattr(self.logger, "run_id", None)

    def on_train_start(self) -> None:
        counts = self.parameter_counts()  # counted now, after the freeze callback has frozen what it freezes
        if self.trainer.is_global_zero:
            total, trainable = counts["params_total"], counts["params_trainable"]
            log.info(f"{self.net.name}: {total:,} parameters, {trainable:,} trainable")
        if self.logger is not None:
            self.logger.log_hyperparams(counts)
            # also as metrics: the UI charts and sorts metrics, so the size sits beside the accuracy it buys
            self.logger.log_metrics({name: float(count) for name, count in counts.items()}, step=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._normalise(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """What the softmax layer reads for these images: the features a frozen trunk's cache holds."""
        return self.net.head.embed(self.net.forward_features(self._normalise(images)))

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # floats in [0, 1] would pass silently and give garbage
            raise TypeError(f"ImageClassifier takes uint8 images (N, 3, H, W), pixels 0-255, as cnnlab's loaders "
                            f"give them; got {images.dtype}. Convert with (x * 255).round().to(torch.uint8), "
                            "or call module.net on images already normalised with module.mean and module.std")
        return (images.float() - self.mean) / self.std

    def _step(self, batch, split: str) -> torch.Tensor:
        images, labels = batch
        if self.trains_on_features:  # batches of cached embeddings: only the softmax layer runs
            logits = self.net.head.classify(images)
            loss = self.criterion(logits, labels)
        elif self.training and self.net.aux_heads:
            # GoogLeNet's side classifiers add to the training loss only; metrics use the main logits
            logits, aux = self.net.forward_with_aux(self._normalise(images))
            loss = self.criterion(logits, labels) + self.net.aux_weight * sum(self.criterion(a, labels) for a in aux)
        else:
            logits = self(images)
            loss = self.criterion(logits, labels)
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(logits, labels)
        mean_loss = getattr(self, f"{split}_loss")
        mean_loss.update(loss, len(labels))
        self.log(f"{split}/loss", mean_loss, on_step=False, on_epoch=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")
        if split != "train":
            images = getattr(self, f"{split}_images")
            images.update(len(labels))
            self.log(f"{split}/images", images, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.log("loss", loss, prog_bar=True, logger=False)  # running loss in the progress bar only
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer_cfg = dict(self.hparams.optimizer)
        trainable = [p for p in self.parameters() if p.requires_grad]  # frozen parameters stay out
        groups = parameter_groups(trainable, optimizer_cfg.pop("weight_decay", 0.0))
        optimizer = instantiate(optimizer_cfg, groups)
        if not self.hparams.scheduler:
            return optimizer
        make_scheduler = instantiate(self.hparams.scheduler)  # a partial: the step count is known only now
        scheduler = make_scheduler(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_counts(self) -> dict[str, int]:
        return {"params_total": count_parameters(self.net), "params_trainable": count_parameters(self.net, trainable_only=True)}
