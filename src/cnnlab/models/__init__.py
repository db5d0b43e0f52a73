from .builder import build_net, make_divisible
from .net import ClassifierHead, Net, count_parameters

__all__ = ["ClassifierHead", "Net", "build_net", "count_parameters", "make_divisible"]
