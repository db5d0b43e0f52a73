"""Training on part of a prepared training split: the first ``per_class`` images of each class.

The cut is taken from the prepared cache, not drawn anew, so the subsets of one cache are nested: a
subset of 10 per class is the subset of 5 plus five more images of each class, and a study that
trains on each size compares the data added, not a new draw of it. Validation and test splits stay
whole, so every size is tested on the same images.

From the command line (the shapes data; nothing else changes)::

    python src/train.py data=shapes_fewshot data.source._target_=cnnlab.data.ShapesFirstPerClass \\
        +data.source.per_class=5
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .cache import CachedSplit, ImageCache
from .sources import ShapesSource


def first_per_class(labels: np.ndarray, per_class: int, classes: Sequence[str]) -> np.ndarray:
    """The indices of the first ``per_class`` images of each class, in their order in ``labels``
    (indices into ``classes``); refused when a class has fewer."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise ConfigError(f"data.source.per_class={per_class}: must be an integer >= 1")
    counts = np.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if counts[smallest] < per_class:
        raise ConfigError(f"data.source.per_class={per_class}: the training split has only {counts[smallest]} "
                          f"images of class {classes[smallest]}; take fewer, or prepare a larger training split")
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
        self.indices = first_per_class(cache.split("train").labels, per_class, cache.classes)
        self.dir = cache.dir.with_name(f"{cache.dir.name}-first{per_class}")
        self.meta = {**cache.meta, "train_per_class": per_class}

    def split(self, name: str) -> CachedSplit:
        split = self.whole.split(name)
        if name != "train":
            return split
        return CachedSplit(images=np.ascontiguousarray(split.images[self.indices]), labels=split.labels[self.indices])


class ShapesFirstPerClass(ShapesSource):
    """The shapes data, prepared whole as ``ShapesSource`` prepares it (the same cache), training on the
    first ``per_class`` images of each class (see the module docstring). Another source gains the
    same by a subclass whose ``prepare`` wraps its cache in ``TrainingSubset``."""

    def __init__(self, per_class: int, **shapes):
        super().__init__(**shapes)
        self.per_class = per_class

    def prepare(self) -> ImageCache:
        return TrainingSubset(super().prepare(), self.per_class)
