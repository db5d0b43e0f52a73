"""Which parts of a Net stay frozen while the rest trains (the ``freeze`` config group)."""

from __future__ import annotations

from pytorch_lightning.callbacks import BaseFinetuning

from ..errors import ConfigError


class FreezeStages(BaseFinetuning):
    """Freeze the stem and the first ``depth`` stages; ``depth=None`` freezes all but the head.

    depth=0 trains everything; depth=None is the course's "train only the softmax layer".
    """

    def __init__(self, depth: int | None = 0):
        super().__init__()
        self.depth = depth

    def freeze_before_training(self, pl_module) -> None:
        net = pl_module.net
        depth = len(net.stages) if self.depth is None else self.depth
        if not 0 <= depth <= len(net.stages):
            raise ConfigError(f"freeze.depth must be between 0 and {len(net.stages)} (the model's stages), got {depth}")
        if depth > 0:
            self.freeze([net.stem, *net.stages[:depth]], train_bn=False)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        """Nothing unfreezes during training for a fixed depth."""
