from .builder import build_net, make_divisible
from .net import ClassifierHead, Net, count_parameters
from .zoo import create_model, list_models, model_config

__all__ = ["ClassifierHead", "Net", "build_net", "count_parameters", "create_model", "list_models", "make_divisible",
           "model_config"]
