"""One training run, from a composed Hydra config to a tracked, tested model."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_warn

from .. import tracking
from ..checkpoints import read_checkpoint
from ..data import ImageDataModule
from ..data.datamodule import per_process_batch
from ..errors import ConfigError
from ..files import write_text
from ..launch import is_first_process
from ..resolvers import published_weights
from ..tracking import relative
from .callbacks import NonFiniteLoss
from .features import train_on_cached_features
from .module import ImageClassifier
from .trainer import launches_own_processes

log = logging.getLogger(__name__)


def continue_command(folder: Path) -> str:
    """The command that continues this run, in ``folder``, from the end of its last completed epoch."""
    words = [word for word in tracking.command_words() if not word.startswith("resume=")]
    return shlex.join([*words, f"resume={relative(folder)}"])


def resume_point(resume: str | None, folder: Path | None) -> tuple[Path | None, str | None]:
    """The checkpoint a run in ``folder`` continues from, and the MLflow run it continues.

    The config's ``run_folder`` resolver has chosen ``folder`` (resolvers.resumed_folder): for a
    resumed run it is the checkpoint's own folder, and the run goes on in the checkpoint's MLflow
    run; a checkpoint from anywhere else starts a new run from its state.
    """
    if resume is None:
        return None, None
    resume = str(resume)
    if resume == "auto" or resume.startswith("runs:/"):
        checkpoint = folder / "checkpoints" / "last.ckpt"
        if resume.startswith("runs:/") and not checkpoint.is_file():
            restore_checkpoints(resume, checkpoint.parent)
        if not checkpoint.is_file():
            log.info("resume=auto: no unfinished run with this config; starting a new one")
            return None, None
    else:
        path = Path(resume).expanduser()
        checkpoint = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    run_id = read_checkpoint(checkpoint).get("mlflow_run_id")  # before Lightning reads it: one line, not a page
    if folder is None or checkpoint.resolve().parent.parent != folder.resolve():
        return checkpoint, None
    if is_first_process():
        log.info(f"Continuing the run in {relative(folder)} from {checkpoint.name}")
    return checkpoint, run_id


def restore_checkpoints(run: str, folder: Path) -> None:
    """The last and best checkpoints of a tracked ``run`` (``runs:/<id>``), from the store into ``folder``:
    its run folder is gone (another machine, a cleaned disk), the run goes on from the store's copies."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("last", "best"):  # the test after the last epoch wants the best one
        shutil.copyfile(tracking.run_artifact(run, f"{name}/{name}.ckpt"), folder / f"{name}.ckpt")


def run_folder() -> Path | None:
    """This run's folder (Hydra's output folder), or None outside a Hydra run."""
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _plain(node):
    """A resolved config node as plain Python (what a checkpoint can store), or None."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build(cfg: DictConfig) -> tuple[ImageDataModule, ImageClassifier]:
    """The data module and the model module a config describes."""
    datamodule = instantiate(cfg.data, augment=instantiate(cfg.augment), seed=cfg.seed)
    warn_if_normalised_unlike_the_weights(cfg.model, datamodule)
    module = ImageClassifier(model=_plain(cfg.model), classes=datamodule.classes, optimizer=_plain(cfg.optimizer),
                             scheduler=_plain(cfg.scheduler), label_smoothing=cfg.label_smoothing,
                             mean=datamodule.mean, std=datamodule.std, image_size=datamodule.image_size,
                             stored_size=datamodule.stored_size)
    return datamodule, module


def warn_if_normalised_unlike_the_weights(model: DictConfig, datamodule: ImageDataModule) -> None:
    """The data's normalisation follows published weights (``from_weights`` in conf/data/); a user who set
    data.mean or data.std to something else is told, once: the pretrained layers then see inputs scaled
    unlike those they learnt from (GoogLeNet's learnt on [-1, 1], the others on ImageNet's statistics)."""
    entry = published_weights(model)
    if entry is None:
        return
    given, wanted = (datamodule.mean, datamodule.std), (tuple(entry["mean"]), tuple(entry["std"]))
    if any(abs(a - b) > 1e-6 for g, w in zip(given, wanted) for a, b in zip(g, w)):
        rank_zero_warn(f"data.mean={list(given[0])}, data.std={list(given[1])} differ from the normalisation the "
                       f"{model.pretrained} weights of {model.name} learnt on (mean {list(wanted[0])}, std "
                       f"{list(wanted[1])}); leave data.mean/std unset to use theirs")


def not_an_advertisement(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Leave out what Lightning prints on every run but says nothing about this one (once per process)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's own use of torch
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(not_an_advertisement)  # added once


def progress_bar(trainer_cfg: DictConfig) -> dict:
    """A progress bar in a terminal only, unless the config says otherwise.

    Written to a file (CI, DVC stages, nohup, a cluster job) a bar is one endless line that shows up
    at the end; there, EpochLog's line per epoch is the progress.
    """
    return {} if "enable_progress_bar" in trainer_cfg else {"enable_progress_bar": sys.stdout.isatty()}


def log_summary(cfg: DictConfig, datamodule: ImageDataModule) -> None:
    """What this run is, in one line at the top of its log."""
    cache = datamodule.cache
    sizes = ", ".join(f"{split} {len(cache.split(split).labels):,}" for split in ("train", "val", "test"))
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    where = f" in {HydraConfig.get().runtime.output_dir}" if HydraConfig.initialized() else ""
    policies = f"augment={choices.get('augment', '?')}, freeze={choices.get('freeze', '?')}"
    log.info(f"Training {cfg.model.name} on {cache.dir.name} ({len(cache.classes)} classes; {sizes} images; "
             f"{datamodule.image_size} px), {policies}, {cfg.trainer.max_epochs} epochs of batch "
             f"{datamodule.batch_size}, seed {cfg.seed}{where}")


def check_processes(trainer: pl.Trainer, datamodule: ImageDataModule) -> None:
    """Refuse, before any work, what several processes cannot do: an uneven batch, a sweep Lightning would re-run."""
    per_process_batch(datamodule.batch_size, trainer.world_size)
    if launches_own_processes(trainer) and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(f"-m with {trainer.num_devices} DDP processes: Lightning starts them by re-running the "
                          "command, which would re-run the whole sweep in each; run each job as its own command, or "
                          "sweep with hydra/launcher=slurm (each job's processes started by SLURM)")


def train(cfg: DictConfig) -> float:
    """Train, checkpoint, test and track one model; returns the test accuracy (a sweep's objective)."""
    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True)
    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)  # a server must answer before any work
    checkpoint, mlflow_run = resume_point(cfg.resume, run_folder())
    datamodule, module = build(cfg)
    freeze = instantiate(cfg.freeze)
    callbacks = [freeze, *(c for c in instantiate(cfg.callbacks).values() if c is not None)]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, **progress_bar(cfg.trainer))
    check_processes(trainer, datamodule)  # before the MLflow run: a refused run leaves none behind
    with tracking.tracked_run(cfg, "train", run_id=mlflow_run) as logger:
        trainer.logger = logger
        if is_first_process():
            log_summary(cfg, datamodule)
        if logger is not None and mlflow_run is None:  # a continued run has its params and config already
            logger.log_hyperparams(tracking.flatten(OmegaConf.to_container(cfg, resolve=True)))
            logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            tracking.log_data(logger, datamodule.cache, "training")
        fit_data = datamodule  # images; or, with the trunk frozen, its features computed once
        if freeze.cache_features:
            fit_data = train_on_cached_features(datamodule, module, Path(cfg.paths.data_dir) / "features")
        with said_how_to_continue(), requeued_by_slurm():
            trainer.fit(module, datamodule=fit_data, ckpt_path=checkpoint)
        results = trainer.test(module, datamodule=fit_data, ckpt_path="best", verbose=False)[0]
        if trainer.is_global_zero:  # one summary per run, however many processes train it
            if run_folder() is not None:  # the run's summary, also what DVC reads as the stage's metrics
                write_text(run_folder() / "metrics.json", json.dumps(results, indent=2, sort_keys=True))
            if run_folder() is not None:
                files = report_test_split(trainer.checkpoint_callback.best_model_path, datamodule,
                                          run_folder() / "test")
                if logger is not None:
                    tracking.log_files(logger, files, "test")
            if logger is not None and cfg.mlflow_model.log:
                log_mlflow_model(logger.run_id, trainer, datamodule, cfg.mlflow_model.registered_name)
            report(results, trainer)
    return results["test/acc"]


def report_test_split(checkpoint: str, datamodule: ImageDataModule, folder: Path) -> list[Path]:
    """The best model's predictions, confusion matrix and per-class scores on the test split, the files an
    evaluation writes (its plain view). The checkpoint is read again: a run on cached features trained
    the head alone, and its checkpoint holds the whole net."""
    from ..data.augment import tta_views
    from ..evaluation.reports import write_reports
    from ..evaluation.tta import predict, view_loader

    module = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    loader = view_loader(datamodule.cache.split("test"), tta_views(datamodule.image_size),
                         datamodule.eval_batch_size, datamodule.loader_workers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probabilities, labels = predict(module, loader, {"plain": slice(0, 1)}, device)
    return write_reports(folder, probabilities["plain"], labels, module.classes)


def log_mlflow_model(run_id: str, trainer: pl.Trainer, datamodule: ImageDataModule, registered_name: str | None):
    """The best checkpoint as the run's MLflow model (inference/mlflow_model.py), one of its images as the example."""
    from ..inference.mlflow_model import example_image, log_model

    example = example_image(np.asarray(datamodule.cache.split("test").images[0]))
    version = log_model(run_id, trainer.checkpoint_callback.best_model_path, datamodule.classes, example,
                        registered_name)
    registered = f", registered as models:/{registered_name}/{version}" if version else ""
    log.info(f"MLflow model: runs:/{run_id}/model{registered}")


@contextmanager
def said_how_to_continue():
    """When training stops early, the command that continues it (not after a non-finite loss: the same
    run would diverge again from the same state).

    After Ctrl-C or a stop signal Lightning shuts down gracefully and calls ``sys.exit(1)``; the stop
    itself goes on from here, so that train.py ends like every other script (one line, the shell's
    status for that signal; see errors.one_line_errors).
    """
    try:
        yield
    except NonFiniteLoss:
        raise
    except BaseException as stopped:
        say_how_to_continue()
        if isinstance(stopped, SystemExit) and isinstance(stopped.__context__, KeyboardInterrupt):
            raise stopped.__context__ from None
        raise


@contextmanager
def requeued_by_slurm():
    """A SLURM job about to reach its time limit is requeued, and stops as it would on Ctrl-C.

    With ``#SBATCH --signal=SIGUSR1@90`` SLURM sends SIGUSR1 90 s before the limit: the first process
    asks SLURM to requeue the job (``scontrol requeue``), then every process stops gracefully. The
    requeued job runs the same command, whose ``resume=auto`` continues this run from the end of its
    last completed epoch. (Lightning's own requeue saves a mid-epoch checkpoint in the working folder
    and marks the MLflow run FINISHED; a resume from the middle of an epoch would not draw the data an
    uninterrupted run draws.)
    """
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        yield
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"

    def requeue():
        if is_first_process():
            log.warning(f"SLURM's time limit is near: requeueing job {job} (scontrol requeue {job})")
            subprocess.run(["scontrol", "requeue", job], check=False)

    with tracking.stopping_on(signal.SIGUSR1, before_stopping=requeue):
        yield


def say_how_to_continue() -> None:
    """After a run stopped early: the command that continues it, if an epoch finished (its last.ckpt)."""
    if not (is_first_process() and HydraConfig.initialized()):
        return
    folder = run_folder()
    if (folder / "checkpoints" / "last.ckpt").is_file():
        log.error(f"The run stopped before its last epoch. Continue it, in the same folder and MLflow run, with:\n"
                  f"  {continue_command(folder)}")


def report(results: dict, trainer: pl.Trainer) -> None:
    summary = ", ".join(f"{name.removeprefix('test/')} {value:.4f}" for name, value in sorted(results.items())
                        if name != "test/images")
    log.info(f"\nTest accuracy: {results['test/acc']:.4f} on {results['test/images']:.0f} images  ({summary})")
    log.info(f"Best checkpoint: {trainer.checkpoint_callback.best_model_path}")
