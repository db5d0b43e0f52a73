"""One LightningDataModule for every data source: cache -> augmenting workers -> batches."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .augment import eval_transform, train_transform
from .cache import CachedSplit, ImageCache


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An HWC uint8 image as the CHW uint8 tensor the model module normalises."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class CachedImageDataset(Dataset):
    """Images of one cached split through an albumentations transform, as uint8 CHW tensors."""

    def __init__(self, split: CachedSplit, transform):
        self.images = split.images
        self.labels = split.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.transform(image=np.asarray(self.images[index]))["image"]
        return to_tensor(image), int(self.labels[index])


def batches(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0) -> DataLoader:
    """The project's DataLoader: every sample, in order unless shuffled, workers reseeded.

    Every image is kept (few-shot sets are small), except a last training batch of one image,
    which BatchNorm cannot normalise.
    """
    lone_last = shuffle and len(dataset) % batch_size == 1
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=lone_last,
        num_workers=num_workers, persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker_transform if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


def seed_worker_transform(worker_id: int) -> None:
    """Give each worker's albumentations pipeline its own reproducible stream.

    Albumentations keeps its own RNG (global seeding does not reach it), so without this every
    worker would repeat the same distortions. torch seeds each worker from the main process's
    generator, so ``seed_everything`` makes this deterministic.
    """
    info = get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def default_num_workers() -> int:
    """Leave one core to the training process; never more than 8 per process."""
    return max(0, min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) - 1))


class ImageDataModule(pl.LightningDataModule):
    def __init__(self, source, image_size: int, batch_size: int = 128, num_workers: int | None = None,
                 augment: Mapping | None = None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 eval_batch_size: int | None = None):
        super().__init__()
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment = dict(augment or {})
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.cache: ImageCache | None = None

    def prepare_data(self) -> None:
        self.cache = self.source.prepare()

    @property
    def classes(self) -> list[str]:
        if self.cache is None:
            self.prepare_data()
        return self.cache.classes

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = self.source.prepare()  # other processes of a distributed run
        augmenting = train_transform(self.augment, self.image_size)
        augmenting.set_random_seed(torch.initial_seed() % 2**32)  # reproducible without workers too
        self.datasets = {
            "train": CachedImageDataset(self.cache.split("train"), augmenting),
            **{s: CachedImageDataset(self.cache.split(s), eval_transform(self.image_size)) for s in ("val", "test")},
        }

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return batches(self.datasets[split], batch_size, shuffle, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)
