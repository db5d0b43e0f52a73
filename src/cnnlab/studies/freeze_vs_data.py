"""How much of a pretrained network to freeze, against how much data the new task has.

The notes: with a small training set, freeze every layer between the input and the softmax layer and
train only the softmax layer; with a larger one, "freeze fewer layers, train more layers". Every
trial fine-tunes the same pretrained network (the study's pretrain stage) on the same new task, with
one freezing mode and one training-set size; the test images are the same for every trial.

The training sets are nested: the study prepares the largest one once, and a trial of ``n`` images per
class trains on the first ``n`` of each class (``FirstPerClass``, a data source), so a larger set is a
smaller one plus images, and the curves differ by the data added, not by a new draw of it.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.cache import CachedSplit, ImageCache
from ..data.sources import ShapesSource
from ..errors import ConfigError


# The training set of each size ------------------------------------------------------------------

def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The indices of the first ``per_class`` images of each class, in their order in the split."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if per_class < 1 or counts.min() < per_class:
        raise ConfigError(f"data.source.per_class={per_class}: the prepared training split has "
                          f"{counts.min()} images of its smallest class (train_size = per_class x classes at least)")
    rank = np.empty(len(labels), np.int64)  # each image's place among the images of its class
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    return np.flatnonzero(rank < per_class)


class TrainingSubset(ImageCache):
    """A prepared cache with its training split cut to the first ``per_class`` images of each class.

    It has a folder name of its own (never written), since what is derived from a cache is keyed on
    that name: the frozen trunk's cached features (training/features.py) and the run's ``data.cache``.
    """

    def __init__(self, cache: ImageCache, per_class: int):
        self.whole = cache
        self.per_class = per_class
        self.indices = first_per_class(cache.split("train").labels, per_class)
        self.dir = cache.dir.with_name(f"{cache.dir.name}-first{per_class}")
        self.meta = {**cache.meta, "train_per_class": per_class}

    def split(self, name: str) -> CachedSplit:
        split = self.whole.split(name)
        if name != "train":
            return split
        return CachedSplit(images=np.ascontiguousarray(split.images[self.indices]), labels=split.labels[self.indices])


class FirstPerClass(ShapesSource):
    """The shapes source (prepared as ``ShapesSource`` would) training on the first ``per_class`` images
    of each class: ``data.source._target_=cnnlab.studies.freeze_vs_data.FirstPerClass +data.source.per_class=5``."""

    def __init__(self, per_class: int, **shapes):
        super().__init__(**shapes)
        self.per_class = per_class

    def prepare(self) -> ImageCache:
        return TrainingSubset(super().prepare(), self.per_class)
