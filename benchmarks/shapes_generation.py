"""How long the default shapes dataset takes to generate (goal: under 30 s on 2 CPU cores).

    python benchmarks/shapes_generation.py [--image-size 32 64]

Generates the default split sizes (5,000 / 1,000 / 1,000) into a temporary folder once per
image size and prints wall time and images per second.
"""

import argparse
import platform
import tempfile
import time

import torch

from cnnlab.data import ShapesSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}")
    print("| image size | images | seconds | images/s |\n|---|---|---|---|")
    for size in args.image_size:
        with tempfile.TemporaryDirectory() as root:
            source = ShapesSource(root, image_size=size)
            start = time.perf_counter()
            source.prepare()
            seconds = time.perf_counter() - start
        images = sum(source.settings["sizes"].values())
        print(f"| {size} | {images} | {seconds:.1f} | {images / seconds:.0f} |")


if __name__ == "__main__":
    main()
