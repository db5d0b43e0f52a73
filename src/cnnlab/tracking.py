"""MLflow tracking: the store, the run's params and tags, and how to open it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from pytorch_lightning.loggers import Logger, MLFlowLogger

from .errors import ConfigError
from .launch import is_first_process

log = logging.getLogger(__name__)


def sqlite_uri(db_path: str | Path) -> str:
    return f"sqlite:///{Path(db_path).resolve()}"


def use_store(tracking_uri: str | None, default_db: str | Path) -> str:
    """Point MLflow's client at ``tracking_uri`` (a server) or the project's SQLite store; returns the URI.

    ``runs:/<id>`` references (pretrained weights, checkpoints to evaluate) resolve against it.
    """
    uri = tracking_uri or sqlite_uri(default_db)
    chosen = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI as MLFLOW_TRACKING_URI (for subprocesses). The config reads that variable
    # as "a server was chosen", so later resolutions (the logger's, a sweep's next job) would treat the
    # SQLite store as a server and put its artifacts under ./mlruns: leave the variable as the user set it.
    if chosen is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = chosen
    return uri


def run_artifact(reference: str, default_path: str = "best/best.ckpt") -> Path:
    """A local copy of a run's artifact: ``runs:/<run id>`` (its best checkpoint) or ``runs:/<run id>/<path>``.

    Resolved against the store set by ``use_store`` (or ``MLFLOW_TRACKING_URI``).
    """
    run_id, _, path = reference.removeprefix("runs:/").strip("/").partition("/")
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{path or default_path}"))
    except MlflowException as error:
        raise ConfigError(f"cannot fetch {reference} from the MLflow store {mlflow.get_tracking_uri()}: "
                          f"{str(error).splitlines()[0]}") from None


def mlflow_logger(experiment_name: str, tracking_uri: str | None, default_db: str, artifact_dir: str,
                  run_name: str | None = None, tags: Mapping[str, str] | None = None,
                  log_model: bool = True, run_id: str | None = None) -> MLFlowLogger:
    """An MLflow logger on ``tracking_uri`` (e.g. ``http://host:5000``), or on the project's SQLite store.

    For a local store the artifacts go next to it (MLflow would otherwise put them under the
    directory the run starts in); a server manages its own artifact store. Only a run's first
    process has one (see ``OtherProcessLogger``). With ``run_id``, the logger continues that run (a
    resumed training), which is RUNNING again until it closes.
    """
    if not is_first_process():
        return OtherProcessLogger()
    local = not tracking_uri
    if local:  # before the logger's client opens the store: it would create the tables itself, racing others
        prepare_store(default_db, experiment_name, Path(artifact_dir).resolve().as_uri())
    logger = MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name,
        tracking_uri=sqlite_uri(default_db) if local else tracking_uri,
        artifact_location=Path(artifact_dir).resolve().as_uri() if local else None,
        tags={**git_tags(), **(tags or {})},
        log_model=log_model,
        run_id=run_id,
    )
    if run_id is not None:
        logger.experiment.update_run(run_id, status="RUNNING")
    return logger


def prepare_store(db_path: str | Path, experiment_name: str, artifact_location: str) -> None:
    """Create the SQLite store and the experiment once, however many processes start at once.

    Opening a store that does not exist yet creates its tables (MLflow runs all its migrations), and
    Lightning's logger creates a missing experiment: two processes doing either at the same moment (a
    parallel sweep's first jobs, several terminals) fail with ``table ... already exists`` or
    ``experiment ... already exists``. Both happen here under a lock file beside the store
    (``<store>.lock``), so the second process finds them made. Later runs take the lock only to
    read that the experiment exists.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = Path(db_path).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        client = MlflowClient(sqlite_uri(db))
        if client.get_experiment_by_name(experiment_name) is None:
            client.create_experiment(experiment_name, artifact_location=artifact_location)


class NoClient:
    """Takes any MlflowClient call and does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class OtherProcessLogger(Logger):
    """What the processes of a DDP run other than the first hold instead of an MLflow logger.

    Lightning's MLflow logger connects to the store as it is made (MLflow opens, and for a new
    SQLite file migrates, the database), in every process; only the first process writes the run,
    so the others must not touch the store at all. Callbacks that need a logger (the learning-rate
    monitor) still find one.
    """

    name, version, run_id, experiment_id = "mlflow", None, None, None

    @property
    def experiment(self) -> NoClient:
        return NoClient()

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def git_tags() -> dict[str, str]:
    """The git commit of the code that runs (and whether it had uncommitted changes)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "cnnlab.git_dirty": str(bool(dirty)).lower()}


# Where a run's results go and what it is called, not what it computes: left out of its config hash.
NOT_HASHED = ("paths", "tracking_uri", "logger", "experiment", "run_name", "tags", "resume")
# Set by DVC for each stage command: the stage, and for `dvc exp run` the experiment and its baseline commit.
DVC_TAGS = {"DVC_STAGE": "cnnlab.dvc.stage", "DVC_EXP_NAME": "cnnlab.dvc.exp_name",
            "DVC_EXP_BASELINE_REV": "cnnlab.dvc.baseline_rev"}


def run_tags(cfg, stage: str, command: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The MLflow tags of a run of train.py, evaluate.py, ensemble.py or report.py.

    ``cnnlab.stage`` (``stage``, unless the config's ``tags`` say otherwise, as the pipeline's
    pretraining does), ``cnnlab.command``, ``cnnlab.config_hash``, DVC's stage and experiment when
    DVC runs it, ``extra`` (e.g. the runs an ensemble averages) and the config's ``tags``
    (``+tags.cnnlab.member=a`` nests, and is tagged ``cnnlab.member``). The git commit comes with the logger.
    """
    from omegaconf import OmegaConf

    tags = {"cnnlab.stage": stage, "cnnlab.command": command, "cnnlab.config_hash": config_hash(cfg)}
    tags.update({tag: os.environ[name] for name, tag in DVC_TAGS.items() if os.environ.get(name)})
    tags.update(extra or {})
    configured = cfg.get("tags")
    if configured:
        flat = flatten(OmegaConf.to_container(configured, resolve=True))
        tags.update({key: str(value) for key, value in flat.items() if value is not None})
    return tags


def config_hash(cfg) -> str:
    """sha256 of the resolved config, less where its results go and what it is called (``NOT_HASHED``).

    The folders of ``paths`` are resolved as placeholders (so a data root under them is too), and the
    run folder and the project folder are written as placeholders: the same work has the same hash in
    any run folder and any copy of the project (a clone, DVC's experiment folders).
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in config.get("paths") or {}:
        config.paths[key] = f"<paths.{key}>"
    resolved = OmegaConf.to_container(config, resolve=True)
    text = json.dumps({k: v for k, v in resolved.items() if k not in NOT_HASHED}, sort_keys=True, default=str)
    if HydraConfig.initialized():  # the folder as the config resolves it (absolute in a run)
        text = text.replace(str(HydraConfig.get().runtime.output_dir), "<run folder>")
    text = text.replace(str(Path.cwd().resolve()), "<project>")
    return hashlib.sha256(text.encode()).hexdigest()


def log_data(logger: MLFlowLogger, cache) -> None:
    """Which prepared data the run used, and the unreadable files that were left out of it."""
    skipped = cache.meta.get("skipped", [])
    logger.log_hyperparams({"data.cache": cache.dir.name, "data.skipped_images": len(skipped)})
    if skipped:
        logger.experiment.log_dict(logger.run_id, skipped, "data/skipped_images.json")


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1, "c": [2, 3]}} -> {"a.b": 1, "a.c.0": 2, "a.c.1": 3}: the keys users override."""
    flat: dict[str, object] = {}
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)) and len(value) > 0:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def ui_command(tracking_uri: str) -> str:
    """The exact shell command that opens the MLflow UI on this store."""
    if not tracking_uri.startswith("sqlite:"):
        return f"open {tracking_uri} in a browser"
    mlflow = Path(sys.executable).parent / "mlflow"
    executable = str(mlflow) if mlflow.exists() else (shutil.which("mlflow") or "mlflow")
    return f"{executable} ui --backend-store-uri {tracking_uri} --port 5000"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    base = "http://127.0.0.1:5000" if tracking_uri.startswith("sqlite:") else tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@contextmanager
def finished(logger: MLFlowLogger | None) -> Iterator[MLFlowLogger | None]:
    """Close the logger's run when the block ends: FAILED if it raised, FINISHED otherwise (None: nothing)."""
    try:
        yield logger
    except BaseException:
        if logger is not None:
            logger.finalize("failed")
        raise
    if logger is not None:
        logger.finalize("success")


def log_files(logger: MLFlowLogger, files: Iterable[Path]) -> None:
    for path in files:
        logger.experiment.log_artifact(logger.run_id, str(path))


def log_how_to_open(logger: MLFlowLogger | None) -> None:
    """The run's id, the command that opens the UI on its store and the run's address there."""
    if logger is not None:
        uri = logger.experiment.tracking_uri
        log.info(f"MLflow run {logger.run_id}. Open the UI with:\n  {ui_command(uri)}\n"
                 f"then {run_url(uri, logger.experiment_id, logger.run_id)}")
