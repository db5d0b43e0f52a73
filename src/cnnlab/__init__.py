"""cnnlab: configuration-driven experiments with classic convolutional image classifiers."""

__version__ = "0.1.0"

from . import resolvers  # noqa: E402,F401  (config resolvers, e.g. compound scaling, needed to resolve conf/)


def __getattr__(name: str):
    """``cnnlab.create_model`` and ``cnnlab.list_models`` (cnnlab/models/zoo.py), imported on first use:
    a script that never builds a model (prepare.py) does not import torch for them."""
    if name in ("create_model", "list_models"):
        from .models import zoo
        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
