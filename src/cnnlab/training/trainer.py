"""The Lightning Trainer a ``trainer=`` preset describes (cpu, gpu, ddp, ddp_cpu), with the two speed-ups
Lightning leaves to the model: channels-last memory and ``torch.compile``."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from ..errors import ConfigError, RunFailed
from ..files import written_whole


class ChannelsLastAndCompile(pl.Callback):
    """Puts the model in channels-last memory and compiles its network, before fit and test alike.

    Channels-last (NHWC) is the layout cuDNN's and oneDNN's fastest convolution kernels want under
    bf16; the network is compiled in place (``nn.Module.compile``), so its checkpoints keep the
    parameter names of an uncompiled one and load anywhere.
    """

    def __init__(self, channels_last: bool, compile: bool):
        self.channels_last, self.compile = channels_last, compile

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile and getattr(pl_module.net, "_compiled_call_impl", None) is None:
            pl_module.net.compile()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden temporary file beside it, then renames it into place.

    A kill at any moment (SIGKILL, a pre-empted job, a full disk) leaves the previous last.ckpt or
    the new one, never half of one: a rename within a folder is atomic.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        with written_whole(path) as partial:
            try:
                super().save_checkpoint(checkpoint, partial, storage_options)
            except (OSError, RuntimeError) as error:
                free = shutil.disk_usage(path.parent).free  # before the partial file is removed
                if free < DISK_NEARLY_FULL or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                    raise RunFailed(f"no space left on the disk of {path.parent} ({free / 2**20:.1f} MiB free) "
                                    f"while writing {path.name}; the run's last whole checkpoint is kept. Free some "
                                    "space (or set paths.output_dir to another disk) and continue the run") from error
                raise


# torch reports a full disk as "unexpected pos 576 vs 534", no errno: a failed write that leaves
# less than this free is taken for a full disk
DISK_NEARLY_FULL = 16 * 2**20


def build_trainer(*, channels_last: bool = False, compile: bool = False, sync_batchnorm: bool = False,
                  callbacks: Sequence[pl.Callback] = (), **options) -> pl.Trainer:
    """A ``pl.Trainer`` with ``options``, and the speed-ups the preset turns on.

    Checkpoints are written atomically (``AtomicCheckpointIO``). The data module shards every split itself (each validation and test image exactly once; the
    training order drawn from the seed and the epoch alone), so Lightning's DistributedSampler,
    which pads the last batch with repeated images, stays out.
    """
    accelerator = options.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA GPU is visible here "
                          "(torch.cuda.is_available() is False); use trainer=cpu, or trainer=ddp_cpu for several processes")
    extra = [ChannelsLastAndCompile(channels_last, compile)] if channels_last or compile else []
    return pl.Trainer(callbacks=[*callbacks, *extra], sync_batchnorm=sync_batchnorm, use_distributed_sampler=False,
                      plugins=[AtomicCheckpointIO()], **options)


def launches_own_processes(trainer: pl.Trainer) -> bool:
    """Whether Lightning itself will start this run's other processes by re-running the script.

    (torchrun and SLURM start every process themselves; then Lightning starts none.)
    """
    launcher = trainer.strategy.launcher
    return (isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally)
