"""Reading checkpoint files (.ckpt, .pt, .pth) without running code from them.

Such a file is a pickle: read with ``torch.load(weights_only=False)`` it can import and call any
function (``os.system``) while it is read. Every checkpoint is read here with ``weights_only=True``,
which rebuilds tensors and plain values (dicts, lists, strings, numbers) and refuses anything else
before it runs; our own checkpoints hold only those (tests/conftest.py checks every one the test
suite writes). Lightning (``load_from_checkpoint``, ``trainer.fit(ckpt_path=...)``) reads with
torch's default, also ``weights_only=True``, but fails with a page of advice: a file is read here
first, so the user gets one line instead.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError


def read_checkpoint(path: str | Path) -> Any:
    """What a checkpoint file holds, on the CPU, read without running anything from it.

    A file that asks to import anything beyond tensors and plain values is refused with a
    ``ConfigError`` naming the file and what it would import; one torch cannot read at all, with
    one naming the file and torch's reason. Zip checkpoints (what ``torch.save`` writes since
    PyTorch 1.6) are memory-mapped, so reading one for a key or two costs little.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
        unsafe = unsafe_globals(path, error)
        if unsafe:
            raise ConfigError(f"refused {path}: reading it would import {', '.join(unsafe)}, and a checkpoint "
                              "holds only tensors and plain values (nothing from the file was run)") from None
        raise ConfigError(f"cannot read {path} as a checkpoint: {_reason(error)}") from None


def unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The functions and classes a refused file would import: torch lists them all for a zip
    checkpoint; for the older format only its error message names one (the first)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError):  # not a zip checkpoint
        found = []
    return found or re.findall(r"GLOBAL (\S+)", str(error))[:1]


def _reason(error: Exception) -> str:
    """torch's own reason, not its first line: for weights_only refusals that is generic advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler error: Unsupported"))]
    return (specific or lines or [type(error).__name__])[0]
