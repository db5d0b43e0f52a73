"""MLflow tracking: the store, the run's params and tags, and how to open it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException

from .errors import ConfigError
from .launch import is_first_process

if TYPE_CHECKING:  # Lightning is imported where a Trainer needs its logger: it is 3 s of every script's start
    from pytorch_lightning.loggers import Logger, MLFlowLogger

log = logging.getLogger(__name__)


def sqlite_uri(db_path: str | Path) -> str:
    return f"sqlite:///{Path(db_path).resolve()}"


def use_store(tracking_uri: str | None, default_db: str | Path) -> str:
    """Point MLflow's client at ``tracking_uri`` (a server) or the project's SQLite store; returns the URI.

    ``runs:/<id>`` references (pretrained weights, checkpoints to evaluate) resolve against it.
    """
    uri = tracking_uri or sqlite_uri(default_db)
    check_server(uri)
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


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer within seconds, before any data is prepared or model trained.

    MLflow's client retries an unreachable server with growing pauses for minutes, and only once
    the run opens, after the data preparation; its error is pages long.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered (a proxy in front of it may not know /health)
    except (OSError, ValueError) as error:  # refused, no such host, timed out, a malformed URI
        reason = getattr(error, "reason", None) or error
        raise ConfigError(f"the MLflow tracking server {uri} does not answer ({reason}): start it, or leave "
                          "tracking_uri and MLFLOW_TRACKING_URI unset for the local SQLite store") from None


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
                  log_model: bool = True, run_id: str | None = None, trainer: bool = True) -> MLFlowLogger | StoreRun:
    """An MLflow logger on ``tracking_uri`` (e.g. ``http://host:5000``), or on the project's SQLite store.

    For a local store the artifacts go next to it (MLflow would otherwise put them under the
    directory the run starts in); a server manages its own artifact store. Only a run's first
    process has one (see ``OtherProcessLogger``). With ``run_id``, the logger continues that run (a
    resumed training), which is RUNNING again until it closes. ``trainer=False``: a script that
    trains nothing gets a ``StoreRun``, the same run without Lightning's logger around it.
    """
    if not is_first_process():
        from .training.loggers import OtherProcessLogger
        return OtherProcessLogger()
    local = not tracking_uri
    uri = sqlite_uri(default_db) if local else tracking_uri
    artifact_location = Path(artifact_dir).resolve().as_uri() if local else None
    if local:  # before the logger's client opens the store: it would create the tables itself, racing others
        experiment_id = prepare_store(default_db, experiment_name, artifact_location)
    else:  # before the logger looks the experiment up: it would create a missing one itself, racing others
        experiment_id = prepare_server(tracking_uri, experiment_name)
    tags = {**git_tags(), **(tags or {})}
    if not trainer:
        return StoreRun(uri, experiment_id, run_name, tags)
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                          artifact_location=artifact_location, tags=tags, log_model=log_model, run_id=run_id)
    if run_id is not None:
        logger.experiment.update_run(run_id, status="RUNNING")
    return logger


class StoreRun:
    """The MLflow run of a script that trains nothing (prepare, evaluate, ensemble, report, study), opened
    at once: what those scripts use of Lightning's MLflow logger (``experiment``, the client; ``run_id``,
    ``experiment_id``, ``log_hyperparams``, ``log_metrics``, ``finalize``), logged the way it logs."""

    def __init__(self, tracking_uri: str, experiment_id: str, run_name: str | None, tags: Mapping[str, str]):
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        mlflow.set_tracking_uri(tracking_uri)  # as Lightning's logger does: runs:/ references resolve on it
        self.experiment, self.experiment_id = MlflowClient(tracking_uri), experiment_id
        run = self.experiment.create_run(experiment_id, run_name=run_name, tags=resolve_tags(dict(tags)))
        self.run_id = run.info.run_id

    def log_hyperparams(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        # as Lightning's logger: values as text cut at 250 characters, at most 100 a call (MLflow's limit)
        items = [Param(key, str(value)[:250]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.experiment.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.experiment.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step or 0)
                                                        for key, value in metrics.items()])

    def finalize(self, status: str) -> None:
        self.experiment.set_terminated(self.run_id, status)


def prepare_store(db_path: str | Path, experiment_name: str, artifact_location: str) -> str:
    """Create the SQLite store and the experiment once, however many processes start at once; its id.

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
        return ensure_experiment(MlflowClient(sqlite_uri(db)), experiment_name, artifact_location)


def prepare_server(tracking_uri: str, experiment_name: str) -> str:
    """Create the experiment on a tracking server once, however many runs start at once; its id.

    What ``prepare_store`` does for the SQLite store, before the logger is made, without a lock (a
    server's clients share no file). Lightning's logger, finding no experiment, creates it itself, and
    every run that looked at the same moment but was not first fails with ``RESOURCE_ALREADY_EXISTS``
    (trainings started at once on a new server, a parallel sweep with a new ``experiment=``).
    """
    from mlflow.tracking import MlflowClient

    return ensure_experiment(MlflowClient(tracking_uri), experiment_name)


# MLflow 3 marks what an experiment is for with this tag; the UI shows a "custom model development"
# experiment as model training (runs with their metrics), not as a GenAI app (traces and an assistant).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment ``name``, created if there is none, marked as model training. Another
    process creating it at the same moment is no error: its ``RESOURCE_ALREADY_EXISTS`` means it is there."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except MlflowException as error:
            experiment = client.get_experiment_by_name(name) if error.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if experiment is None:
                raise
    if not EXPERIMENT_KIND.items() <= experiment.tags.items():  # made by an older cnnlab, or by MLflow itself
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


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
NOT_HASHED = ("paths", "tracking_uri", "logger", "experiment", "run_name", "tags", "resume", "mlflow_model")
# Set by DVC for each stage command: the stage, and for `dvc exp run` the experiment and its baseline commit.
DVC_TAGS = {"DVC_STAGE": "cnnlab.dvc.stage", "DVC_EXP_NAME": "cnnlab.dvc.exp_name",
            "DVC_EXP_BASELINE_REV": "cnnlab.dvc.baseline_rev"}


def run_tags(cfg, stage: str, command: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The MLflow tags of a run of train.py, evaluate.py, ensemble.py or report.py.

    ``cnnlab.stage`` (``stage``, unless the config's ``tags`` say otherwise, as the pipeline's
    pretraining does), ``cnnlab.command``, ``cnnlab.config_hash``, DVC's stage and experiment when
    DVC runs it, ``cnnlab.run_folder``, ``extra`` (e.g. the runs an ensemble averages) and the config's ``tags``
    (``+tags.cnnlab.member=a`` nests, and is tagged ``cnnlab.member``). The git commit comes with the logger.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    tags = {"cnnlab.stage": stage, "cnnlab.command": command, "cnnlab.config_hash": config_hash(cfg)}
    if HydraConfig.initialized():  # where its files are; resume=runs:/<id> continues a training there
        tags["cnnlab.run_folder"] = str(HydraConfig.get().runtime.output_dir)
    tags.update({tag: os.environ[name] for name, tag in DVC_TAGS.items() if os.environ.get(name)})
    tags.update(extra or {})
    configured = cfg.get("tags")
    if configured:
        flat = flatten(OmegaConf.to_container(configured, resolve=True))
        tags.update({key: str(value) for key, value in flat.items() if value is not None})
    return tags


def config_hash(cfg) -> str:
    """sha256 of the config, less where its results go and what it is called (``NOT_HASHED``).

    The same work has the same hash in any run folder and any copy of the project (a clone, DVC's
    experiment folders): the folders of ``paths`` and the run folder are hashed as placeholders,
    and the project folder is written as one. It needs nothing of Hydra's running state, so a
    config saved in a run folder (``.hydra/config.yaml``) hashes as it did in its run
    (``resume=auto`` compares them).
    """
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=False)
    kept = {key: value for key, value in config.items() if key == "paths" or key not in (*NOT_HASHED, "hydra")}
    kept["paths"] = {key: f"<paths.{key}>" for key in config.get("paths") or {}}
    kept = replace_in_strings(kept, "${hydra:runtime.output_dir}", "<run folder>")
    resolved = OmegaConf.to_container(OmegaConf.create(kept), resolve=True)
    text = json.dumps({k: v for k, v in resolved.items() if k != "paths"}, sort_keys=True, default=str)
    text = text.replace(str(Path.cwd().resolve()), "<project>")
    return hashlib.sha256(text.encode()).hexdigest()


def replace_in_strings(value, old: str, new: str):
    """``value`` (plain dicts, lists and scalars) with ``old`` replaced by ``new`` in every string."""
    if isinstance(value, dict):
        return {key: replace_in_strings(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_in_strings(item, old, new) for item in value]
    return value.replace(old, new) if isinstance(value, str) else value


def log_data(logger: MLFlowLogger | StoreRun, cache, context: str) -> None:
    """Which prepared data the run used, and the unreadable files that were left out of it; the data is
    also the run's MLflow dataset input (``context``: training, preparation), which the runs table's
    Dataset column shows: the cache's name and settings hash, its folder, classes and split sizes."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from .data.cache import SPLITS

    skipped = cache.meta.get("skipped", [])
    logger.log_hyperparams({"data.cache": cache.dir.name, "data.skipped_images": len(skipped)})
    if skipped:
        logger.experiment.log_dict(logger.run_id, skipped, "data/skipped_images.json")
    name, _, digest = cache.dir.name.rpartition("-")  # <source>-<settings hash>, as data/cache.py names it
    dataset = Dataset(name=name or cache.dir.name, digest=digest, source_type="local",
                      source=json.dumps({"path": str(cache.dir.resolve())}),
                      schema=json.dumps({"classes": cache.classes}),
                      profile=json.dumps({split: len(cache.split(split).labels) for split in SPLITS}))
    used = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    try:
        logger.experiment.log_inputs(logger.run_id, used)
    except MlflowException:  # another run stored the same dataset at the same moment (UNIQUE constraint
        logger.experiment.log_inputs(logger.run_id, used)  # failed): it is there now, and ours only links it


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
    """The exact shell command that opens the MLflow UI on this store, for this machine only (the UI
    has no login: whoever reaches its port can read and delete runs)."""
    if not tracking_uri.startswith("sqlite:"):
        return f"open {tracking_uri} in a browser"
    mlflow = Path(sys.executable).parent / "mlflow"
    executable = str(mlflow) if mlflow.exists() else (shutil.which("mlflow") or "mlflow")
    return f"{executable} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI's model-training view (``workflowType``; MLflow 3's UI opens in its GenAI
    view, without metric columns, unless the link or the user's toggle says otherwise)."""
    base = "http://127.0.0.1:5000" if tracking_uri.startswith("sqlite:") else tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def command_line() -> str:
    """The command that reproduces this job (for a sweep: this job's overrides, not the sweep's)."""
    return " ".join(command_words())


def command_words() -> list[str]:
    """``python``, this script relative to the project, and this job's overrides."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else sys.argv[1:]
    return ["python", str(relative(Path(sys.argv[0]))), *overrides]


def relative(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_absolute() and path.is_relative_to(Path.cwd()) else path


@contextmanager
def tracked_run(cfg, stage: str, *, tags: Mapping[str, str] | None = None,
                **logger_options) -> Iterator[MLFlowLogger | StoreRun | None]:
    """The MLflow run of one entry script (train, evaluate, ensemble, report, prepare), from open to close.

    Opened with the script's tags (``run_tags``), it ends FINISHED when the block ends, KILLED when
    the user stopped it (Ctrl-C, SIGTERM: Lightning turns either into ``SystemExit`` after its
    graceful shutdown), FAILED on any error; then it says how to open it. ``logger_options`` go to
    the logger (``run_id`` continues a run, ``trainer=False`` for scripts that train nothing).
    Yields None when the config has no logger (``logger=none``).
    """
    logger = instantiate_logger(cfg, stage, tags, logger_options)
    with stop_signals_as_ctrl_c():
        try:
            yield logger
        except (KeyboardInterrupt, SystemExit):
            close(logger, "KILLED")
            raise
        except BaseException:
            close(logger, "FAILED")
            raise
    close(logger, "FINISHED")
    log_how_to_open(logger)


def instantiate_logger(cfg, stage: str, tags: Mapping[str, str] | None,
                       options: Mapping) -> MLFlowLogger | StoreRun | None:
    from hydra.utils import instantiate

    if not cfg.get("logger"):
        return None
    logger = instantiate(cfg.logger, tags=run_tags(cfg, stage, command_line(), tags), **options)
    _ = logger.run_id  # the run exists from now on (Lightning makes it on first use): a stop mid-work is recorded
    return logger


def close(logger: Logger | StoreRun | None, status: str) -> None:
    """End the run as ``status`` (FINISHED, FAILED or KILLED); a training's checkpoints are logged first."""
    if logger is not None:
        logger.finalize(status)


def stop_signals_as_ctrl_c():
    """SIGTERM (what `timeout`, `docker stop`, SLURM's pre-emption and a closed terminal send) stops a script
    the way Ctrl-C does: a training shuts down gracefully and logs its checkpoints; the run is marked KILLED."""
    return stopping_on(signal.SIGTERM)


@contextmanager
def stopping_on(signum: int, before_stopping=None) -> Iterator[None]:
    """Within the block, the signal ``signum`` stops the script as Ctrl-C does (a ``KeyboardInterrupt``
    named after it), once ``before_stopping()`` has run; the previous handler is back afterwards."""
    def stop(received, frame):
        if before_stopping is not None:
            before_stopping()
        raise KeyboardInterrupt(signal.Signals(received).name)

    previous = signal.signal(signum, stop)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def log_files(logger: MLFlowLogger | StoreRun, files: Iterable[Path], artifact_path: str | None = None) -> None:
    for path in files:
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def log_how_to_open(logger: Logger | StoreRun | None) -> None:
    """The run's id, the command that opens the UI on its store and the run's address there."""
    if logger is not None and logger.run_id is not None:  # not in a DDP run's other processes (OtherProcessLogger)
        uri = logger.experiment.tracking_uri
        log.info(f"MLflow run {logger.run_id}. Open the UI with:\n  {ui_command(uri)}\n"
                 f"then {run_url(uri, logger.experiment_id, logger.run_id)}")

