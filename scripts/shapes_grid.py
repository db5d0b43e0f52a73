"""Draw the README's picture of the shapes dataset: one row per class.

    python scripts/shapes_grid.py docs/images/shapes.jpg
"""

import sys

import cv2
import numpy as np

from cnnlab.data.shapes import SHAPES, render


def main(path: str, per_class: int = 10, size: int = 32, zoom: int = 2) -> None:
    rng = np.random.default_rng(0)
    rows = [np.concatenate([render(rng, shape, size) for _ in range(per_class)], axis=1) for shape in SHAPES]
    grid = np.concatenate(rows, axis=0)
    grid = cv2.resize(grid, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main(sys.argv[1])
