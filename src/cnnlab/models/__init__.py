from . import scaling  # noqa: F401  (registers the ``compound`` resolver used by conf/scaling/custom.yaml)
from .builder import build_net, make_divisible
from .net import ClassifierHead, Net, count_parameters

__all__ = ["ClassifierHead", "Net", "build_net", "count_parameters", "make_divisible"]
