from .datamodule import ImageDataModule
from .sources import ShapesSource

__all__ = ["ImageDataModule", "ShapesSource"]
