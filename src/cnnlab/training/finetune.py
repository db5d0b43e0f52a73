"""Which parts of a Net stay frozen while the rest trains (the ``freeze`` config group)."""

from __future__ import annotations

from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from ..errors import ConfigError


class FreezeStages(BaseFinetuning):
    """Freeze the stem and the first ``depth`` stages; ``depth=None`` freezes all but the head.

    depth=0 trains everything; depth=None is the course's "train only the softmax layer"
    (for small training sets); in between, "freeze fewer layers for more data".

    Frozen BatchNorm layers keep normalising with their running statistics and never update
    them. Lightning's own ``freeze(train_bn=False)`` turns ``track_running_stats`` off instead,
    which makes those layers use batch statistics even in eval mode, and ``model.train()``
    (every epoch, and after every validation) puts them back in training mode; so the frozen
    norms are put in eval mode before every training batch.
    """

    def __init__(self, depth: int | None = 0):
        super().__init__()
        if depth is not None and depth < 0:
            raise ConfigError(f"freeze.depth must be 0 or more (or null for all stages), got {depth}")
        self.depth = depth
        self.frozen_norms: list[nn.Module] = []

    def freeze_before_training(self, pl_module) -> None:
        net = pl_module.net
        depth = len(net.stages) if self.depth is None else self.depth
        if depth > len(net.stages):
            raise ConfigError(f"freeze.depth must be between 0 and {len(net.stages)} (the model's stages), got {depth}")
        frozen = [net.stem, *net.stages[:depth]] if depth > 0 else []
        for module in frozen:
            module.requires_grad_(False)
        self.frozen_norms = [m for module in frozen for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if frozen and not pl_module.hparams.model.get("pretrained"):
            rank_zero_warn("freeze: the frozen stem and stages are randomly initialised (model.pretrained is not "
                           "set), so they will stay random; only the layers after them learn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for norm in self.frozen_norms:
            norm.eval()

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        """Nothing unfreezes during training for a fixed depth."""
