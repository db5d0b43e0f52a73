from .cifar10 import Cifar10Source
from .datamodule import ImageDataModule
from .imagefolder import ImageFolderSource
from .sources import ShapesSource
from .subsets import ShapesFirstPerClass

__all__ = ["Cifar10Source", "ImageDataModule", "ImageFolderSource", "ShapesFirstPerClass", "ShapesSource"]
