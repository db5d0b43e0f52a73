"""What a process learns from whatever launched it (Lightning, torchrun, SLURM) about the run it belongs to.

A multi-process run starts every process as its own ``python src/train.py``: Lightning re-runs the
command for each extra GPU of a node, torchrun and srun start them all. Each composes its own
config before any process group exists, so these answers come from the environment alone.
"""

from __future__ import annotations

import os

from .errors import ConfigError


def _environment(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def process_label() -> str | None:
    """None for a run's first process (global rank 0); otherwise a name for this one, unique in the run.

    torchrun sets RANK, srun SLURM_PROCID; the processes Lightning starts for a node's other
    devices have LOCAL_RANK, and a node other than the first has NODE_RANK.
    """
    for variable in ("RANK", "SLURM_PROCID"):
        rank = _environment(variable)
        if rank is not None:
            return None if rank == "0" else f"rank{rank}"
    node, local = _environment("NODE_RANK") or "0", _environment("LOCAL_RANK") or "0"
    return None if node == local == "0" else f"node{node}-local{local}"


def is_first_process() -> bool:
    """Whether this is the process that tracks the run (creates the MLflow run, writes the summary)."""
    return process_label() is None


def shared_run_name() -> str | None:
    """A run folder name every process of one torchrun or srun launch derives alike, or None if not launched so.

    Each process resolves its own config, so a name from the clock or a random draw would differ
    between them; the launcher's job id does not.
    """
    if int(_environment("SLURM_NTASKS") or 1) > 1 and _environment("SLURM_JOB_ID"):
        step = _environment("SLURM_STEP_ID")
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    if int(_environment("WORLD_SIZE") or 1) > 1 and _environment("TORCHELASTIC_RUN_ID"):
        run = os.environ["TORCHELASTIC_RUN_ID"]
        if run == "none":  # torchrun's default without --rdzv-id (--standalone draws one)
            raise ConfigError("torchrun started several processes without --rdzv-id, so they cannot agree on a run "
                              "folder: add --rdzv-id=<a name for this run> (e.g. --rdzv-id=$(date +%F_%H-%M-%S)), "
                              "or set CNNLAB_RUN_ID for every process")
        return f"torchrun-{run}"
    return None
