"""cnnlab: configuration-driven experiments with classic convolutional image classifiers."""

__version__ = "0.1.0"

from . import resolvers  # noqa: E402,F401  (config resolvers, e.g. compound scaling, needed to resolve conf/)
