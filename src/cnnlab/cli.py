"""What every entry script does before Hydra reads its command line."""

from __future__ import annotations

import sys


def resolve_printed_config(argv: list[str] = sys.argv) -> None:
    """Make ``--cfg job`` print values, not ``${...}``: add Hydra's ``--resolve`` unless given.

    Users ask for the config to see what a run will use; interpolations such as
    ``${data.image_size}`` or ``${scaling.width}`` answer nothing.
    """
    if any(arg in ("--cfg", "-c") or arg.startswith("--cfg=") for arg in argv) and "--resolve" not in argv:
        argv.append("--resolve")
