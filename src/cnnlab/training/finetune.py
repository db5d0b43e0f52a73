"""Which parts of a Net stay frozen while the rest trains (the ``freeze`` config group)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError
from .module import parameter_groups



def trunk(net: nn.Module) -> list[nn.Module]:
    """Everything below the softmax layer, bottom to top: stem, each stage, the head's hidden layers."""
    hidden = getattr(net.head, "hidden", None)
    return [net.stem, *net.stages, *([hidden] if hidden is not None and len(hidden) else [])]


class FreezeStages(BaseFinetuning):
    """Freeze the stem and the first ``depth`` stages; ``depth=None`` freezes all but the softmax layer.

    depth=0 trains everything; depth=None is the course's "train only the softmax layer"
    (for small training sets): only ``head.fc`` trains, VGG's hidden FC layers and GoogLeNet's
    side classifiers stay frozen too. In between, "freeze fewer layers for more data".

    Frozen modules run in eval mode for the whole run: BatchNorm normalises with its running
    statistics and never updates them, and dropout / stochastic depth inside them stay off, so a
    frozen trunk is a fixed function of its input (which is what makes its features cacheable).
    Lightning's own ``freeze(train_bn=False)`` turns ``track_running_stats`` off instead, which
    makes BatchNorm use batch statistics even in eval mode, and ``model.train()`` (every epoch,
    and after every validation) puts modules back in training mode; so the frozen modules are
    put in eval mode before every training batch.
    """

    def __init__(self, depth: int | None = 0, cache_features: bool = False):
        super().__init__()
        if depth is not None and depth < 0:
            raise ConfigError(f"freeze.depth must be 0 or more (or null for all stages), got {depth}")
        if cache_features and depth is not None:
            raise ConfigError("freeze.cache_features needs the whole trunk frozen (freeze=all_but_head)")
        self.depth = depth
        self.cache_features = cache_features  # see training/features.py
        self.frozen: list[nn.Module] = []

    def modules_to_freeze(self, net: nn.Module) -> list[nn.Module]:
        if self.depth is None:  # GoogLeNet's side classifiers read from the frozen trunk: they stay as they are
            return trunk(net) + ([net.aux_heads] if net.aux_heads is not None else [])
        if self.depth > len(net.stages):
            raise ConfigError(f"freeze.depth must be between 0 and {len(net.stages)} (the model's stages), "
                              f"got {self.depth}")
        return [net.stem, *net.stages[:self.depth]] if self.depth > 0 else []

    def freeze_before_training(self, pl_module) -> None:
        self.frozen = self.modules_to_freeze(pl_module.net)
        for module in self.frozen:
            module.requires_grad_(False)
        if self.frozen and not pl_module.hparams.model.get("pretrained"):
            rank_zero_warn("freeze: the frozen stem and stages are randomly initialised (model.pretrained is not "
                           "set), so they will stay random; only the layers after them learn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in self.frozen:
            module.eval()

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        """Nothing unfreezes during training for a fixed depth."""


class GradualUnfreeze(FreezeStages):
    """Start with only the softmax layer training, then unfreeze the trunk from the top.

    At each epoch in ``unfreeze_at`` the next module from the top (VGG's hidden FC layers, then
    the last stage, the one before, ..., the stem) starts training, with ``backbone_lr_factor``
    times the head's learning rate, following the same schedule (GoogLeNet's side classifiers
    stay frozen; gradients still flow through them to the stages they read). Its parameters join the
    optimizer as new groups (with and without weight decay, like the head's) and the LR schedule;
    Lightning's ``BaseFinetuning`` saves those groups in checkpoints, and a resumed run unfreezes
    whatever was due by its epoch, so resuming continues where the run stopped.
    """

    def __init__(self, unfreeze_at: Sequence[int] = (2, 4, 6), backbone_lr_factor: float = 0.1):
        super().__init__(depth=None)
        if any(b <= a for a, b in zip(unfreeze_at, unfreeze_at[1:])) or any(e < 1 for e in unfreeze_at):
            raise ConfigError(f"freeze.unfreeze_at must be increasing epochs from 1, got {list(unfreeze_at)}")
        if not 0 < backbone_lr_factor <= 1:
            raise ConfigError(f"freeze.backbone_lr_factor must be in (0, 1], got {backbone_lr_factor}")
        self.unfreeze_at = list(unfreeze_at)
        self.backbone_lr_factor = backbone_lr_factor

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        top_down = trunk(pl_module.net)[::-1]
        due = top_down[:sum(epoch <= current_epoch for epoch in self.unfreeze_at)]
        for module in (m for m in due if m in self.frozen):
            self.frozen.remove(module)
            module.requires_grad_(True).train()
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            new = [p for p in module.parameters() if id(p) not in held]  # a resumed run has them already
            if new:
                add_groups(optimizer, new, self.backbone_lr_factor)
                join_schedules(pl_module.trainer, optimizer)
            rank_zero_info(f"freeze: epoch {current_epoch}: unfroze {module_name(pl_module.net, module)} "
                           f"({sum(p.numel() for p in module.parameters()):,} parameters)")

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)  # a resumed run gets its saved param groups back here
        for optimizer in trainer.optimizers:
            join_schedules(trainer, optimizer)


def module_name(net: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in net.named_modules() if m is module)


def add_groups(optimizer: Optimizer, params: Iterable[nn.Parameter], lr_factor: float) -> None:
    """New param groups that follow the first (head) group at ``lr_factor`` times its learning rates.

    Every schedule here multiplies each group's own base rate by one shared factor, so scaling the
    head's current and base rates (``initial_lr``, and OneCycle's ``max_lr``/``min_lr``) puts the
    new groups at the right point of the same schedule; momentum (cycled by OneCycle) is the head's.
    """
    head = optimizer.param_groups[0]
    rates = {key: head[key] * lr_factor for key in ("lr", "initial_lr", "max_lr", "min_lr") if key in head}
    momenta = {key: head[key] for key in ("betas", "momentum", "base_momentum", "max_momentum") if key in head}
    for group in parameter_groups(params, head["weight_decay"]):
        optimizer.add_param_group({**group, **momenta, **rates})


def join_schedules(trainer, optimizer: Optimizer) -> None:
    """Extend LambdaLR schedules to param groups added after they were made.

    LambdaLR keeps one factor function and one base rate per group from the moment it was built;
    OneCycleLR reads its rates from the groups themselves and needs nothing.
    """
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if scheduler.optimizer is optimizer and isinstance(scheduler, LambdaLR):
            for group in optimizer.param_groups[len(scheduler.lr_lambdas):]:
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
                scheduler.base_lrs.append(group["initial_lr"])
