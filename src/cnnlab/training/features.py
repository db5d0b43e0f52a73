"""Cached features: with the whole trunk frozen, compute what the softmax layer reads once per image.

With ``freeze=all_but_head`` every epoch would push each image through a network that never
changes, to train one linear layer. Instead the embeddings (pooled features, after VGG's hidden
layers) are computed once, stored next to the data caches and the head trains on them:

    <data_dir>/features/<model name>-<key>/meta.json, <split>_features.npy (N, D) float32, <split>_labels.npy

The key hashes everything the embeddings depend on: the trunk's weights, the data cache (its
folder name is the hash of its settings) and the evaluation transform (image size and
normalisation). Augmentation is off in this mode, since it would change the features every epoch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..data.augment import eval_transform
from ..data.cache import SPLITS, ImageCache, build_once, write_arrays
from ..data.datamodule import CachedImageDataset, ImageDataModule, batches, process_loader
from .finetune import trunk
from .module import ImageClassifier



def features_key(module: ImageClassifier, datamodule: ImageDataModule) -> str:
    digest = hashlib.sha256()
    for part in trunk(module.net):
        for name, tensor in part.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    settings = {"data": datamodule.cache.dir.name, "image_size": datamodule.image_size,
                "mean": list(datamodule.mean), "std": list(datamodule.std), "transform": "eval"}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def extract(module: ImageClassifier, loader: DataLoader, description: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every image the loader gives, in order, in eval mode."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = module.training
    module.eval().to(device)
    features, labels = [], []
    try:
        for images, batch_labels in tqdm(loader, desc=description, unit="batch", leave=False):
            features.append(module.embed(images.to(device)).float().cpu())
            labels.append(batch_labels)
    finally:
        module.train(was_training).cpu()
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


class CachedFeatureDataModule(pl.LightningDataModule):
    """Batches of (embedding, label) for the head, from a frozen trunk's cached features."""

    def __init__(self, images: ImageDataModule, module: ImageClassifier, features_dir: Path):
        super().__init__()
        self.images = images
        self.module = module
        self.features_dir = features_dir
        self.dir = None

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def prepare_data(self) -> None:
        self.images.prepare_data()
        self.dir = self.features_dir / f"{self.module.net.name}-{features_key(self.module, self.images)}"
        extracted = []  # by this process (two trainings at once compute them once: build_once's lock)
        build_once(self.dir, lambda: extracted.append(self._extract_and_write()))
        rank_zero_info(f"freeze: cached the frozen trunk's features in {self.dir}" if extracted
                       else f"freeze: training the head on cached features from {self.dir}")

    def _extract_and_write(self) -> None:
        arrays = {}
        for split in SPLITS:
            images = CachedImageDataset(self.images.cache.split(split), eval_transform(self.images.image_size))
            loader = batches(images, self.images.eval_batch_size, shuffle=False, num_workers=self.images.loader_workers)
            arrays[f"{split}_features"], arrays[f"{split}_labels"] = extract(self.module, loader, f"Features ({split})")
        write_arrays(self.dir, arrays, {"classes": self.classes, "model": self.module.net.name,
                                        "data": self.images.cache.dir.name, "dim": int(arrays["train_features"].shape[1])})

    def setup(self, stage: str | None = None) -> None:
        if self.dir is None:
            self.prepare_data()  # other processes of a distributed run: the cache is there, only the key is computed
        cache = ImageCache(self.dir)  # the same meta file, so the same check that the cache is complete
        self.datasets = {split: TensorDataset(torch.from_numpy(np.load(cache.dir / f"{split}_features.npy")),
                                              torch.from_numpy(np.load(cache.dir / f"{split}_labels.npy")))
                         for split in SPLITS}

    def train_dataloader(self) -> DataLoader:
        return process_loader(self, self.datasets["train"], True, self.images.batch_size, seed=self.images.seed)

    def val_dataloader(self) -> DataLoader:
        return process_loader(self, self.datasets["val"], False, self.images.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return process_loader(self, self.datasets["test"], False, self.images.eval_batch_size)


def train_on_cached_features(datamodule: ImageDataModule, module: ImageClassifier, features_dir: Path):
    """The data module that trains ``module``'s head on cached features (the module switches to them)."""
    if datamodule.distortions:
        rank_zero_info(f"freeze: augmentation ({', '.join(datamodule.distortions)}) is off while the head trains on cached "
                       "features; set freeze.cache_features=false to train it on augmented images")
    module.trains_on_features = True
    return CachedFeatureDataModule(datamodule, module, features_dir)
