"""Config resolvers: compound scaling, unique run folder names, the normalisation of published weights.
Importing ``cnnlab`` (any entry script does) registers them, before any config is resolved.

Compound scaling (EfficientNet): depth, width and resolution grow together with one knob, phi.

    depth d = alpha ** phi, width w = beta ** phi, resolution r = gamma ** phi
    (alpha=1.2, beta=1.1, gamma=1.15, chosen so that alpha * beta**2 * gamma**2 ~ 2: each step of
    phi about doubles the FLOPs)

conf/scaling/custom.yaml computes these with the ``compound`` resolver; OmegaConf has no
arithmetic of its own.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError
from .launch import is_first_process, process_label, shared_run_name


def compound(base: float, coefficient: float, phi: float) -> float | int:
    """``base * coefficient ** phi``; an int base (a resolution in px) gives an int."""
    if isinstance(phi, bool) or not isinstance(phi, (int, float)):
        raise ConfigError(f"scaling.phi={phi}: must be a number (compound scaling's exponent)")
    scaled = base * coefficient ** phi
    return round(scaled) if isinstance(base, int) else round(scaled, 6)  # 1.21, not 1.2100000000000002


OmegaConf.register_new_resolver("compound", compound, replace=True)


@functools.cache
def run_id() -> str:
    """This process's run folder name: the start time, then a random token (``2026-11-25_18-40-12_3fa9c1``).

    The time alone (Hydra's ``${now:}``) gave two runs started in the same second one folder, with
    each other's checkpoints and results. The token makes the name unique however many runs start
    at once; it is drawn once per process, so every part of the config that names the folder
    agrees. The processes of one torchrun or srun launch take the launcher's job id instead
    (launch.shared_run_name); ``CNNLAB_RUN_ID`` sets it for any processes that must share one folder.
    """
    name = os.environ.get("CNNLAB_RUN_ID") or shared_run_name()
    if name is not None and ("/" in name or name.strip(".") == ""):  # it names a folder under outputs/runs
        raise ConfigError(f"run folder name {name!r} (from CNNLAB_RUN_ID, torchrun's --rdzv-id or SLURM's job id) "
                          "would leave outputs/runs: give a plain name")
    return name or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def resumed_folder(resume, config) -> Path | None:
    """The run folder ``resume`` continues, or None: no resume, or a checkpoint from outside a run folder
    (a new run starts from its state).

    ``resume`` is a run folder; a checkpoint in a run folder's checkpoints/; ``runs:/<MLflow run id>``
    (the folder that run recorded; the training restores its checkpoints from the store if the
    folder is gone); or ``auto``: the latest unfinished run
    under the runs folder whose config hashes like ``config`` (none: a new run).
    """
    if resume is None:
        return None
    resume = str(resume)
    if resume == "auto":
        return latest_unfinished_run(Path(str(config.paths.output_dir)) / "runs", config)
    if resume.startswith("runs:/"):
        return recorded_run_folder(resume.removeprefix("runs:/").strip("/"), config)
    path = Path(resume).expanduser()
    if path.is_dir():
        return path
    return path.parent.parent if path.is_file() and path.parent.name == "checkpoints" else None


def latest_unfinished_run(runs: Path, config) -> Path | None:
    """The newest run folder under ``runs`` with an epoch to continue from (checkpoints/last.ckpt), no
    result yet (metrics.json, written when a training ends) and the config hash of ``config``."""
    from .tracking import config_hash

    wanted = config_hash(config)
    candidates = [folder for folder in runs.glob("*") if (folder / "checkpoints" / "last.ckpt").is_file()
                  and not (folder / "metrics.json").exists() and (folder / ".hydra" / "config.yaml").is_file()]
    for folder in sorted(candidates, key=lambda f: (f / "checkpoints" / "last.ckpt").stat().st_mtime, reverse=True):
        if config_hash(OmegaConf.load(folder / ".hydra" / "config.yaml")) == wanted:
            return folder
    return None


def recorded_run_folder(run_id: str, config) -> Path | None:
    """The run folder a training's MLflow run recorded (its ``cnnlab.run_folder`` tag), if it can be read.

    Otherwise None, and the run continues in a new folder: a run that cannot be found is then
    said in one line by the training (resolver errors would come with Hydra's traceback).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .tracking import sqlite_uri

    uri = config.tracking_uri or sqlite_uri(str(config.paths.mlflow_db))
    try:
        folder = MlflowClient(uri).get_run(run_id).data.tags.get("cnnlab.run_folder")
    except MlflowException:
        return None
    return Path(folder) if folder else None


_chosen: dict[tuple[str, str], str] = {}


def run_folder(resume, new: str, *, _root_) -> str:
    """The run's folder: the resumed run's own (``resumed_folder``), else ``new``.

    Decided once per process: Hydra resolves its run folder more than once, and ``resume=auto``
    must not find a different answer the second time (this run's own folder, say).
    """
    key = (str(resume), new)
    if key not in _chosen:
        folder = resumed_folder(resume, _root_)
        _chosen[key] = new if folder is None else str(folder)
    return _chosen[key]


def process_log(job_name: str) -> str:
    """The log file's name: ``train.log`` for the run's first process, ``train.rank1.log`` for the others.

    The processes of a torchrun or srun launch share one run folder and one job name; writing
    one file together would interleave their lines.
    """
    label = process_label()
    return f"{job_name}.log" if label is None else f"{job_name}.{label}.log"


def published_weights(model) -> Mapping | None:
    """The entry of ``model.weights`` (the model's published weights, conf/model/) that ``model.pretrained``
    names (``model.pretrained=imagenet``), or None: no pretrained weights, or a file, URL or run."""
    pretrained, weights = model.get("pretrained"), model.get("weights") or {}
    return weights.get(pretrained) if isinstance(pretrained, str) else None


def from_weights(key: str, default, *, _root_):
    """``${from_weights:mean,[0.5,0.5,0.5]}``: the published weights' ``key`` when ``model.pretrained`` names
    them, else ``default``. The data configs take their normalisation from it, so that it follows the
    weights (torchvision's GoogLeNet learnt on mean 0.5, std 0.5; the others on ImageNet's statistics)."""
    entry = published_weights(_root_.get("model") or {})
    value = default if entry is None else entry[key]
    return OmegaConf.create(list(value))  # a config node: `--cfg job --resolve` resolves in place, and refuses lists


def first_process_only(value):
    """``value`` in the run's first process, null in the others (Hydra writes no .hydra/ for null)."""
    return value if is_first_process() else None


OmegaConf.register_new_resolver("run_id", run_id, replace=True)
OmegaConf.register_new_resolver("run_folder", run_folder, replace=True)
OmegaConf.register_new_resolver("process_log", process_log, replace=True)
OmegaConf.register_new_resolver("first_process_only", first_process_only, replace=True)
OmegaConf.register_new_resolver("from_weights", from_weights, replace=True)
