"""The one place that builds image transforms, for training and for evaluation (test-time views too).

A policy (conf/augment/*.yaml) is a mapping of named distortions, each an albumentations
transform instantiated from config, so any of them can be tuned or switched off from the
command line (``augment.mirror.p=0``). A ``null`` entry is skipped. Transforms run on uint8
HWC arrays in DataLoader workers; normalisation happens on the accelerator (see
training/module.py), which keeps the data path light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never reach the network on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from ..errors import ConfigError  # noqa: E402

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


# Corner crops at fixed coordinates need the resized image's size, known only once it is square:
# every cache stores square images, so the square centre of the resize is the whole resized image.
_CORNERS = {"top_left": (0, 0), "top_right": (1, 0), "bottom_left": (0, 1), "bottom_right": (1, 1)}


def _crops(crops: int, resized: int, image_size: int) -> list[A.BasicTransform]:
    """The centre crop, then (for five) the four corners, of a ``resized`` x ``resized`` image."""
    if crops not in (1, 5):
        raise ConfigError(f"tta.crops={crops}: choose 1 (the centre) or 5 (four corners and the centre)")
    centre = [A.CenterCrop(image_size, image_size)]
    if crops == 1:
        return centre
    far = resized - image_size
    return centre + [A.Crop(x_min=far * right, y_min=far * bottom, x_max=far * right + image_size,
                            y_max=far * bottom + image_size) for right, bottom in _CORNERS.values()]


def tta_views(image_size: int, crops: int = 1, flip: bool = False, scales: Sequence[float] = (1.0,),
              resize_ratio: float = 1.0) -> list[A.Compose]:
    """The test-time views of an image (conf/tta/), each an eval transform to ``image_size``.

    Per scale, the short side is resized to ``round(image_size * resize_ratio * scale)``, then
    come the centre crop and, with ``crops=5``, the four corners (top left, top right, bottom left,
    bottom right); ``flip`` adds each crop's mirror after them. With the defaults the one view is
    exactly ``eval_transform`` (what training's test step sees). Resizing uses the same
    interpolation as training does, so that the views look like the images the model learnt from.
    """
    views = []
    for scale in scales:
        resized = round(image_size * resize_ratio * scale)
        if resized < image_size:
            raise ConfigError(f"tta: resize_ratio {resize_ratio} x scale {scale} resizes to {resized} px, "
                              f"smaller than the {image_size} px crops (ratio x scale must be at least 1)")
        crops_at_scale = [[*_fit_to_size(resized), crop] for crop in _crops(crops, resized, image_size)]
        mirrors = [[*steps, A.HorizontalFlip(p=1.0)] for steps in crops_at_scale] if flip else []
        views += [A.Compose(steps) for steps in crops_at_scale + mirrors]
    return views
