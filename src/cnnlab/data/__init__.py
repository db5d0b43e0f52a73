from .datamodule import ImageDataModule
from .imagefolder import ImageFolderSource
from .sources import ShapesSource

__all__ = ["ImageDataModule", "ImageFolderSource", "ShapesSource"]
