"""cnnlab: configuration-driven experiments with classic convolutional image classifiers."""

__version__ = "0.1.0"
