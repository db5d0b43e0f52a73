"""Test-time augmentation: every view of an image through the model at once, probabilities averaged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.cache import CachedSplit
from ..data.datamodule import CachedImageDataset, to_tensor


class ViewStackDataset(CachedImageDataset):
    """The images of a cached split, each as the stack of its views: (views, C, H, W) uint8."""

    def __init__(self, split: CachedSplit, views: Sequence):
        super().__init__(split, transform=None)
        self.views = list(views)

    def __getitem__(self, index: int):
        image = np.asarray(self.images[index])
        return torch.stack([to_tensor(view(image=image)["image"]) for view in self.views]), int(self.labels[index])


def view_loader(split: CachedSplit, views: Sequence, batch_size: int, num_workers: int) -> DataLoader:
    """Every image once, in order: a DistributedSampler would pad the split with repeated images."""
    return DataLoader(ViewStackDataset(split, views), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())


def average_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(images, views, classes) logits -> (images, classes): the mean of the views' softmax.

    Probabilities, not logits, are averaged: no single view can outvote the others with an
    unbounded logit, and the mean is itself a distribution (whose NLL is the reported loss).
    """
    return logits.float().softmax(dim=-1).mean(dim=1)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, groups: Mapping[str, slice],
            device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean probabilities per image for each group of views, ``{name: (images, classes)}``, and the labels.

    All views of a batch go through the model as one (batch x views) batch; ``groups`` says which
    of an image's views each result averages (e.g. the plain view alone, and the ten crops).
    """
    model.eval().to(device)
    probabilities: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    labels = []
    for images, batch_labels in tqdm(loader, desc="Evaluating", unit="batch"):
        batch, views = images.shape[:2]
        logits = model(images.flatten(0, 1).to(device, non_blocking=True)).view(batch, views, -1)
        for name, group in groups.items():
            probabilities[name].append(average_probabilities(logits[:, group]).cpu())
        labels.append(batch_labels)
    return {name: torch.cat(p) for name, p in probabilities.items()}, torch.cat(labels)
