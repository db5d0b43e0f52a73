"""Result files written whole or not at all.

A run killed while writing a file (SIGKILL, a pre-empted job, a full disk) must not leave half of
it: ``metrics.json`` marks a training as finished (``resume=auto`` passes finished runs by), and
DVC, the report and the user read the others. Each is written to a hidden temporary file in the
same folder and renamed over the old one, which a file system does atomically within a folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without an
    error, removed otherwise. It keeps ``path``'s suffix (matplotlib picks the format from it)."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with written_whole(path) as partial:
        partial.write_text(text)
    return Path(path)
