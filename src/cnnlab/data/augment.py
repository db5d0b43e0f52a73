"""The one place that builds image transforms, for training and for evaluation.

A policy (conf/augment/*.yaml) is a mapping of named distortions, each an albumentations
transform instantiated from config, so any of them can be tuned or switched off from the
command line (``augment.mirror.p=0``). A ``null`` entry is skipped. Transforms run on uint8
HWC arrays in DataLoader workers; normalisation happens on the accelerator (see
training/module.py), which keeps the data path light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never reach the network on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

# DataLoader worker processes are the parallelism. OpenCV's own thread pool would only compete
# with them for the same cores, and a worker forked after the parent has used that pool hangs
# in its first OpenCV call that touches it, so OpenCV runs single-threaded in every process.
cv2.setNumThreads(0)


def _fit_to_size(image_size: int) -> list:
    """Resize the short side then centre-crop: a no-op for images already at ``image_size``."""
    return [A.SmallestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
            A.CenterCrop(image_size, image_size)]


def train_transform(distortions: Mapping[str, A.BasicTransform | None], image_size: int) -> A.Compose:
    enabled = [t for t in distortions.values() if t is not None]
    return A.Compose([*enabled, *_fit_to_size(image_size)])


def eval_transform(image_size: int) -> A.Compose:
    return A.Compose(_fit_to_size(image_size))
