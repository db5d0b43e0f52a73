"""Data: sources that prepare an image cache, and the datamodule that serves it to a training.

The names import on first use: preparing data (src/prepare.py) needs neither torch nor Lightning,
whose imports are 3 s of a process's start."""

from importlib import import_module

_MODULES = {"Cifar10Source": "cifar10", "ImageDataModule": "datamodule", "ImageFolderSource": "imagefolder",
            "ShapesFirstPerClass": "subsets", "ShapesSource": "sources"}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_MODULES[name]}", __name__), name)
