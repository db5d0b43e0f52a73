"""One LightningDataModule for every data source: cache -> augmenting workers -> batches."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
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

    With ``world`` processes (DDP), every process draws the same order and takes every world-th
    image of it, from its ``rank`` on: step k's per-process batches together are exactly one
    process's batch k of the whole batch size, with the same per-image seeds. The order is padded
    with its first images to a multiple of ``world``, since every process must take as many steps.
    """

    def __init__(self, size: int, seed: int, sample_seeds: bool = False, rank: int = 0, world: int = 1):
        self.size, self.seed, self.sample_seeds, self.epoch = size, seed % 2**32, sample_seeds, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.size).tolist()
        keys = list(zip(order, rng.integers(2**32, size=self.size).tolist())) if self.sample_seeds else order
        keys += keys[:len(self) * self.world - self.size]
        return iter(keys[self.rank::self.world])


class Shard(Sampler):
    """This process's share of an evaluation split: every world-th image from ``rank`` on, none twice.

    Lightning's DistributedSampler pads the last batch with repeated images, so a test set scored
    by several processes would count some images twice; here the shares differ by one at most.
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, size, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def batches(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
            rank: int = 0, world: int = 1) -> DataLoader:
    """The project's DataLoader: this process's share of every sample, in order or shuffled by ``EpochShuffle``.

    Every image is kept (few-shot sets are small), except a last training batch of one image,
    which BatchNorm cannot normalise. The loader has its own generator, because torch otherwise
    draws the workers' base seed from the global one once per epoch without persistent workers
    and once per run with them, which shifted every later random number (dropout) by the worker count.
    """
    if shuffle:
        sampler = EpochShuffle(len(dataset), seed, getattr(dataset, "augments", False), rank, world)
    else:
        sampler = Shard(len(dataset), rank, world)
    lone_last = shuffle and len(sampler) % batch_size == 1
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=lone_last, worker_init_fn=leave_stopping_to_the_parent,
        num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed % 2**32), pin_memory=torch.cuda.is_available(),
    )


def leave_stopping_to_the_parent(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM: SLURM and `kill` of a process group send it to every process, and a
    worker that died first turned the training process's graceful stop into a traceback. Workers still end
    with their parent (torch watches it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def process_loader(datamodule: pl.LightningDataModule, dataset: Dataset, shuffle: bool, batch_size: int,
                   num_workers: int = 0, seed: int = 0) -> DataLoader:
    """``batches`` of this process's share of ``dataset``, in the run ``datamodule`` is attached to.

    ``batch_size`` is the global batch: for training each process takes its share of it; an
    evaluation batch is split as evenly as it goes.
    """
    trainer = datamodule.trainer
    rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
    share = per_process_batch(batch_size, world) if shuffle else -(-batch_size // world)
    return batches(dataset, share, shuffle, num_workers, seed, rank, world)


def per_process_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the global ``data.batch_size``: DDP's step then averages the same batch as one process's."""
    if batch_size % processes:
        raise ConfigError(f"data.batch_size={batch_size} is the global batch and must divide evenly among the run's "
                          f"{processes} processes (devices x num_nodes); use a multiple of {processes}")
    return batch_size // processes


def default_num_workers(processes: int = 1) -> int:
    """Each of the machine's training processes gets an equal share of the cores, less one for itself (at most 16).

    On one H100 with 16 cores, 8 workers (the cap before) held compiled resnet50 to 3,406 images/s,
    against 3,897 with 15 (0.90 of what it trains on batches already in memory; docs/benchmarks.md).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores < os.cpu_count():  # bound to cores of its own (SLURM's --cpus-per-task): no one to share them with
        processes = 1
    return max(0, min(16, cores // processes - 1))


class ImageDataModule(pl.LightningDataModule):
    def __init__(self, source, image_size: int, batch_size: int = 128, num_workers: int | None = None,
                 augment: Mapping | None = None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 eval_batch_size: int | None = None, seed: int | None = None):
        super().__init__()
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers  # None: default_num_workers, once the trainer says how many processes share the cores
        self.augment = dict(augment or {})
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.cache: ImageCache | None = None
        self.seed = torch.initial_seed() if seed is None else seed  # shuffling and augmentation (EpochShuffle)

    @property
    def loader_workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return default_num_workers(self.trainer.num_devices if self.trainer else 1)

    def prepare_data(self) -> None:
        self.cache = self.source.prepare()

    @property
    def distortions(self) -> list[str]:
        """The names of the augmentation policy's distortions that are on (``augment.<name>=null`` is off)."""
        return [name for name, transform in self.augment.items() if transform is not None]

    @property
    def stored_size(self) -> int:
        """The side of the cached images: files are decoded to this square before the resize to ``image_size``."""
        if self.cache is None:
            self.prepare_data()
        return int(self.cache.split("train").images.shape[1])

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
        return process_loader(self, self.datasets[split], shuffle, batch_size, self.loader_workers, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)
