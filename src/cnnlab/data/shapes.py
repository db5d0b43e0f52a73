"""The embedded default dataset: coloured geometric shapes over textured backgrounds.

Nothing can be downloaded on many machines (CI, air-gapped clusters), so the default task is
generated. Each image holds one shape of a random colour at a random position, scale and
rotation, over a random texture (smooth noise, stripes or checks) with a random palette, plus
pixel noise. Some shapes differ only in corner count (pentagon / hexagon), so the task needs
real shape features, and the randomness makes augmentation matter when few images are given.

Images are rendered on a canvas of 2-4x the target size with OpenCV and area-downsampled (anti-aliasing),
from a seed per split, so the same settings always give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from ..errors import ConfigError


def _regular_polygon(corners: int, inner_ratio: float | None = None) -> np.ndarray:
    """Unit-radius polygon; with ``inner_ratio`` a star with alternating inner corners."""
    points = corners * (2 if inner_ratio else 1)
    angles = np.pi / 2 + 2 * np.pi * np.arange(points) / points
    radii = np.ones(points)
    if inner_ratio:
        radii[1::2] = inner_ratio
    return np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)


def _cross(arm: float = 0.33) -> np.ndarray:
    a = arm
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                     [-a, a], [-1, a], [-1, -a], [-a, -a]], dtype=float)


def _semicircle() -> np.ndarray:
    angles = np.linspace(0, np.pi, 24)
    return np.stack([np.cos(angles), 0.4 - np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1) / 17


def _arrow() -> np.ndarray:
    return np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.75], [1, 0], [0.2, 0.75], [0.2, 0.3],
                     [-1, 0.3]], dtype=float)


def _draw_polygon(points: np.ndarray) -> Callable:
    def draw(canvas, center, radius, angle, color):
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = (points @ rotation.T) * radius + center
        cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], color, cv2.LINE_AA, shift=4)
    return draw


def _draw_circle(canvas, center, radius, angle, color):
    cv2.circle(canvas, _fixed(center), int(radius * 16), color, -1, cv2.LINE_AA, shift=4)


def _draw_ring(canvas, center, radius, angle, color):
    thickness = max(2, int(radius * 0.35))
    cv2.circle(canvas, _fixed(center), int((radius - thickness / 2) * 16), color, thickness, cv2.LINE_AA, shift=4)


def _draw_crescent(canvas, center, radius, angle, color):
    """A disc minus an offset disc, drawn as a mask so the background shows through."""
    mask = np.zeros(canvas.shape[:2], np.uint8)
    cv2.circle(mask, _fixed(center), int(radius * 16), 255, -1, cv2.LINE_AA, shift=4)
    offset = np.array([math.cos(angle), math.sin(angle)]) * radius * 0.45
    cv2.circle(mask, _fixed(center + offset), int(radius * 0.85 * 16), 0, -1, cv2.LINE_AA, shift=4)
    alpha = mask[..., None].astype(np.float32) / 255.0
    canvas[:] = (canvas * (1 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)


def _fixed(point) -> tuple[int, int]:
    return int(round(point[0] * 16)), int(round(point[1] * 16))


# Every shape the generator can draw, by class name. A dataset lists the classes it uses
# (conf/data/shapes*.yaml); their order there fixes the label indices.
SHAPES: dict[str, Callable] = {
    "circle": _draw_circle,
    "triangle": _draw_polygon(_regular_polygon(3)),
    "square": _draw_polygon(_regular_polygon(4)),
    "pentagon": _draw_polygon(_regular_polygon(5)),
    "hexagon": _draw_polygon(_regular_polygon(6)),
    "star": _draw_polygon(_regular_polygon(5, inner_ratio=0.45)),
    "cross": _draw_polygon(_cross()),
    "ring": _draw_ring,
    "crescent": _draw_crescent,
    "arrow": _draw_polygon(_arrow()),
    # Shapes the default set leaves out, for a new target task (shapes_fewshot, transfer learning)
    "octagon": _draw_polygon(_regular_polygon(8)),
    "diamond": _draw_polygon(np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=float)),
    "semicircle": _draw_polygon(_semicircle()),
    "heart": _draw_polygon(_heart()),
    "tee": _draw_polygon(np.array([[-1, -0.9], [1, -0.9], [1, -0.45], [0.25, -0.45], [0.25, 1], [-0.25, 1],
                                   [-0.25, -0.45], [-1, -0.45]], dtype=float)),
    "chevron": _draw_polygon(np.array([[-0.9, -0.8], [0, 0.1], [0.9, -0.8], [0.9, -0.1], [0, 0.8], [-0.9, -0.1]],
                                      dtype=float)),
}


def _texture(rng: np.random.Generator, size: int, contrast: int = 70) -> np.ndarray:
    """A random RGB background: smooth noise, stripes or checks in a random two-colour palette."""
    kind = rng.integers(3)
    if kind == 0:
        cells = rng.integers(3, 9)
        field = cv2.resize(rng.random((cells, cells), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 8)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        if kind == 1:
            field = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
        else:
            v = -xx * math.sin(angle) + yy * math.cos(angle)
            field = ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    # A muted palette (two colours close together) keeps the texture a distraction, not a camouflage.
    low = rng.integers(0, 256, size=3).astype(np.float32)
    high = np.clip(low + rng.integers(-contrast, contrast + 1, size=3), 0, 255)
    field = np.clip(field, 0, 1)[..., None]
    return (low * (1 - field) + high * field).astype(np.uint8)


def _luminance(rgb) -> float:
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def _shape_color(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour, lighter or darker than the background by a clear luminance step.

    Edges that differ only in hue are hard for a small CNN to pick up in a few epochs, so the
    shape always stands out in brightness; its hue and the polarity stay random.
    """
    background_luminance = _luminance(background.reshape(-1, 3).mean(axis=0))
    for _ in range(50):
        color = rng.integers(0, 256, size=3)
        if abs(_luminance(color) - background_luminance) > 80:
            break
    return tuple(int(c) for c in color)


# Where a shape goes by default: a radius of 24-42% of the image side, anywhere it (nearly) fits.
RADIUS = (0.24, 0.42)


def render(rng: np.random.Generator, shape: str, size: int, radius_range=RADIUS,
           max_offset: float | None = None) -> np.ndarray:
    """One (size, size, 3) uint8 image of a shape.

    ``radius_range``: the shape's radius (its circumscribed circle) as a fraction of the image side.
    ``max_offset``: None puts the shape anywhere it fits; a number keeps its centre within that
    fraction of the side from the image's centre on each axis (objects that fill the centre, as in
    ImageNet's photos). Either way the random numbers are drawn in the same order and number, and the
    defaults draw exactly what the generator always drew: the same settings give the same bytes.
    """
    supersample = max(2, 128 // size)  # a canvas of about 128 px is plenty for smooth edges, and cheap
    big = size * supersample
    canvas = _texture(rng, big)
    radius = rng.uniform(*radius_range) * big
    if max_offset is None:
        center = rng.uniform(radius * 0.8, big - radius * 0.8, size=2)
    else:
        center = big / 2 + rng.uniform(-max_offset, max_offset, size=2) * big
    angle = rng.uniform(0, 2 * np.pi)
    draw = SHAPES[shape]
    draw(canvas, center, radius, angle, _shape_color(rng, canvas))
    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def check_classes(classes) -> None:
    unknown = [name for name in classes if name not in SHAPES]
    if unknown or len(set(classes)) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"data.source.classes must be two or more different shapes of {', '.join(SHAPES)}; "
                          f"got {list(classes)}")


def check_placement(radius_range, max_offset) -> None:
    low, high = radius_range
    if not 0 < low <= high <= 0.5:
        raise ConfigError(f"data.source.radius must be [low, high] with 0 < low <= high <= 0.5 (fractions of the "
                          f"image side); got {list(radius_range)}")
    if max_offset is not None and not 0 <= max_offset <= 0.5:
        raise ConfigError(f"data.source.max_offset must be null (anywhere) or from 0 to 0.5 (a fraction of the "
                          f"image side); got {max_offset}")


def generate_split(num_images: int, classes: list[str], size: int, seed: int, progress=None,
                   radius_range=RADIUS, max_offset: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Balanced, shuffled images and labels (indices into ``classes``) of one split, reproducible from ``seed``
    (``radius_range``, ``max_offset``: where the shapes go, see ``render``)."""
    check_classes(classes)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % len(classes)).astype(np.int64)
    images = np.empty((num_images, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        images[i] = render(rng, classes[label], size, radius_range, max_offset)
        if progress is not None:
            progress.update(1)
    return images, labels
