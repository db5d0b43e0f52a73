"""Learning-rate schedules, stepped every optimizer step.

Each factory takes the optimizer and the run's total number of steps (known only once the
Trainer has seen the data), so configs give them as partials: ``_target_`` + ``_partial_: true``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from ..errors import ConfigError


def cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.0, final_lr_fraction: float = 0.0) -> LRScheduler:
    """Linear warm-up, then cosine decay from the optimizer's lr to ``final_lr_fraction`` of it."""
    warmup_steps = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, total_steps: int, pct_start: float = 0.25, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> LRScheduler:
    """Smith's one-cycle policy peaking at the optimizer's lr.

    torch divides by the warm-up's length, ``pct_start * total_steps - 1`` steps, so a short run
    (a few batches) gets the shortest warm-up that works instead of a ZeroDivisionError.
    """
    if total_steps < 3:
        raise ConfigError(f"scheduler=one_cycle needs 3 optimizer steps or more, this run has {total_steps}: "
                          "train for more epochs, use smaller batches, or choose scheduler=cosine")
    pct_start = min(max(pct_start, 2 / total_steps), 1 - 1 / total_steps)
    return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
                      pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor)
