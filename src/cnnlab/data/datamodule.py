"""One LightningDataModule for every data source: cache -> augmenting workers -> batches."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import eval_transform, train_transform
from .cache import CachedSplit, ImageCache


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An HWC uint8 image as the CHW uint8 tensor the model module normalises."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class CachedImageDataset(Dataset):
    """Images of one cached split through an albumentations transform, as uint8 CHW tensors.

    With ``augments`` (the transform draws random numbers) a key is ``(index, sample_seed)`` from
    ``EpochShuffle``, and the transform is reseeded for this image alone: its distortions depend on
    the run's seed, the epoch and the image, not on which worker process draws it after which others.
    """

    def __init__(self, split: CachedSplit, transform, augments: bool = False):
        self.images = split.images
        self.labels = split.labels
        self.transform = transform
        self.augments = augments

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]):
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        if sample_seed is not None:  # one shared pair of generators: 10x cheaper than set_random_seed's one per step
            self.transform.set_random_state(np.random.default_rng(sample_seed), random.Random(sample_seed))
        image = self.transform(image=np.asarray(self.images[index]))["image"]
        return to_tensor(image), int(self.labels[index])


class EpochShuffle(Sampler):
    """A new order every epoch drawn from ``(seed, epoch)`` alone, and with ``sample_seeds``, a seed per image.

    Neither touches the process's random state, so a run's batches, distortions and dropout masks
    are the same with 0, 1 or 8 DataLoader workers. Lightning calls ``set_epoch`` before every
    epoch (after a resume too); without it, each pass counts as the next epoch.
    """

    def __init__(self, size: int, seed: int, sample_seeds: bool = False):
        self.size, self.seed, self.sample_seeds, self.epoch = size, seed % 2**32, sample_seeds, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.size).tolist()
        if not self.sample_seeds:
            return iter(order)
        return zip(order, rng.integers(2**32, size=self.size).tolist())


def batches(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """The project's DataLoader: every sample, in order or shuffled by ``EpochShuffle``.

    Every image is kept (few-shot sets are small), except a last training batch of one image,
    which BatchNorm cannot normalise. The loader has its own generator, because torch otherwise
    draws the workers' base seed from the global one once per epoch without persistent workers
    and once per run with them, which shifted every later random number (dropout) by the worker count.
    """
    lone_last = shuffle and len(dataset) % batch_size == 1
    sampler = EpochShuffle(len(dataset), seed, sample_seeds=getattr(dataset, "augments", False)) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=lone_last,
        num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed % 2**32), pin_memory=torch.cuda.is_available(),
    )


def default_num_workers() -> int:
    """Leave one core to the training process; never more than 8 per process."""
    return max(0, min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) - 1))


class ImageDataModule(pl.LightningDataModule):
    def __init__(self, source, image_size: int, batch_size: int = 128, num_workers: int | None = None,
                 augment: Mapping | None = None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 eval_batch_size: int | None = None, seed: int | None = None):
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
        self.seed = torch.initial_seed() if seed is None else seed  # shuffling and augmentation (EpochShuffle)

    def prepare_data(self) -> None:
        self.cache = self.source.prepare()

    @property
    def distortions(self) -> list[str]:
        """The names of the augmentation policy's distortions that are on (``augment.<name>=null`` is off)."""
        return [name for name, transform in self.augment.items() if transform is not None]

    @property
    def classes(self) -> list[str]:
        if self.cache is None:
            self.prepare_data()
        return self.cache.classes

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = self.source.prepare()  # other processes of a distributed run
        self.datasets = {
            "train": CachedImageDataset(self.cache.split("train"), train_transform(self.augment, self.image_size),
                                        augments=bool(self.distortions)),
            **{s: CachedImageDataset(self.cache.split(s), eval_transform(self.image_size)) for s in ("val", "test")},
        }

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return batches(self.datasets[split], batch_size, shuffle, self.num_workers, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)
