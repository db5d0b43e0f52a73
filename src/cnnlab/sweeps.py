"""Sweeps (``python src/train.py -m ...``): one folder for the whole sweep, the search's objective, a summary.

``SweepSummary`` is a Hydra callback (registered in conf/config.yaml under ``hydra.callbacks``):

* when a sweep starts, it exports the sweep's run name as ``CNNLAB_RUN_ID``, so that launchers
  which run each job in another process (joblib, submitit) put every job's folder under the one
  sweep folder the sweep started, instead of each process drawing a name of its own; jobs that run
  side by side on this machine (joblib) share its cores (``OMP_NUM_THREADS``);
* when a job ends and the config names an ``optimized_metric`` (the ``hparams_search=`` configs
  do), it makes the job return that metric of its run, so that Optuna optimises it: the best
  validation accuracy (``val/acc_best``, from the run's best checkpoint) rather than the test
  accuracy that training returns;
* when the sweep ends, it prints one table (job, the overrides that differ between jobs, best
  validation and test accuracy, run folder, MLflow run id; the best job marked ``*``) and writes
  it to ``summary.txt`` and ``summary.json`` in the sweep folder.

Only standard-library modules and Hydra are imported at start: every run instantiates the callback.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

log = logging.getLogger(__name__)

BEST_VAL = "val/acc_best"  # the best validation accuracy of a run (its best checkpoint's score)
COLUMNS = (BEST_VAL, "test/acc")


def job_results(folder: str | Path) -> dict[str, Any]:
    """What a finished training job left in its folder: ``metrics.json`` (its test metrics), and from
    its best checkpoint the best value of the monitored metric (``val/acc_best``) and its MLflow run id.

    Empty for a job that did not get that far.
    """
    folder = Path(folder)
    results: dict[str, Any] = {}
    best = folder / "checkpoints" / "best.ckpt"
    if best.is_file():
        from .checkpoints import read_checkpoint  # only here: a sweep's parent process never needs torch otherwise

        checkpoint = read_checkpoint(best)
        results["mlflow_run_id"] = checkpoint.get("mlflow_run_id")
        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, Mapping) and state.get("best_model_score") is not None and state.get("monitor"):
                results[f"{state['monitor']}_best"] = float(state["best_model_score"])
    metrics = folder / "metrics.json"
    if metrics.is_file():
        results.update(json.loads(metrics.read_text()))
    return results


def varying(overrides: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each job's overrides less those every job has (a sweep's fixed settings): what tells them apart."""
    if len(overrides) < 2:
        return [list(o) for o in overrides]
    common = set(overrides[0]).intersection(*map(set, overrides[1:]))
    return [[o for o in job if o not in common] for job in overrides]


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _short(override: str) -> str:
    """``optimizer.lr=0.000587194737873281`` as ``optimizer.lr=0.0005872``: the table's width (the exact
    values are in the job's .hydra/overrides.yaml and in the Best line)."""
    key, equals, value = override.partition("=")
    if equals and re.fullmatch(r"-?\d*\.\d{5,}(e-?\d+)?", value):
        return f"{key}={float(value):.4g}"
    return override


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def sweep_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of the sweep folder, in job order: number, overrides, folder and results."""
    jobs = []
    for overrides_file in sweep_dir.glob("**/.hydra/overrides.yaml"):
        folder = overrides_file.parent.parent
        hydra_file = overrides_file.parent / "hydra.yaml"
        number = None
        if hydra_file.is_file():
            number = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num", default=None)
        jobs.append({"job": number if number is not None else len(jobs), "folder": folder,
                     "overrides": [str(o) for o in OmegaConf.load(overrides_file)],
                     "results": job_results(folder)})
    return sorted(jobs, key=lambda job: job["job"])


def best_job(jobs: list[dict[str, Any]], objective: str, maximize: bool,
             optuna_best: Mapping[str, Any] | None = None) -> int | None:
    """The job number of the best job: Optuna's best trial where it reported one, else the best objective."""
    if optuna_best:
        wanted = {f"{name}={value}" for name, value in optuna_best.items()}
        for job in jobs:
            if wanted <= set(job["overrides"]):
                return job["job"]
    scored = [job for job in jobs if isinstance(job["results"].get(objective), (int, float))]
    if not scored:
        return None
    pick = max if maximize else min
    return pick(scored, key=lambda job: job["results"][objective])["job"]


def summary_table(sweep_dir: Path, objective: str = BEST_VAL, maximize: bool = True) -> tuple[str, list[dict]]:
    """The sweep's one-screen summary (text) and its rows (for summary.json)."""
    jobs = sweep_jobs(sweep_dir)
    optimization = sweep_dir / "optimization_results.yaml"  # written by the Optuna sweeper
    optuna_best = None
    if optimization.is_file():
        optuna_best = OmegaConf.to_container(OmegaConf.load(optimization)).get("best_params")
    best = best_job(jobs, objective, maximize, optuna_best)
    columns = list(dict.fromkeys([objective, *COLUMNS]))
    shown = varying([job["overrides"] for job in jobs])
    rows = []
    for job, overrides in zip(jobs, shown):
        results = job["results"]
        rows.append({"job": job["job"], "best": job["job"] == best, "overrides": overrides,
                     **{column: results.get(column) for column in columns},
                     "folder": _relative(job["folder"]), "mlflow_run_id": results.get("mlflow_run_id")})
    header = ["", "job", "overrides", *columns, "run folder", "MLflow run id"]
    lines = [[("*" if row["best"] else ""), str(row["job"]), " ".join(map(_short, row["overrides"])) or "(none)",
              *(_number(row[column]) for column in columns), row["folder"], row["mlflow_run_id"] or "-"]
             for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    numeric = {3 + k for k in range(len(columns))} | {1}
    render = lambda cells: "  ".join((c.rjust(w) if i in numeric else c.ljust(w))  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    direction = "highest" if maximize else "lowest"
    text = [f"Sweep of {len(rows)} job(s) in {_relative(sweep_dir)} (* = {direction} {objective}"
            f"{', Optuna best trial' if optuna_best else ''}):", render(header),
            render(["-" * w if k else " " for k, w in enumerate(widths)]), *map(render, lines)]
    if best is not None:
        job = next(j for j in jobs if j["job"] == best)
        text.append(f"Best: job {best}, {objective} {_number(job['results'].get(objective))}: "
                    f"python src/train.py {' '.join(job['overrides'])}")
    return "\n".join(text), rows


def share_the_cores(config: DictConfig) -> None:
    """Jobs that run side by side on this machine (joblib) split its cores between their torch threads.

    Each torch process otherwise starts one thread per core: four jobs on two cores ran 8 threads
    spinning against each other. Sets ``OMP_NUM_THREADS`` for the job processes (cores // jobs at
    once, at least 1) unless it is set already; the workers start after this, with this environment.
    """
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "joblib" not in target or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = int(OmegaConf.select(config, "hydra.launcher.n_jobs", default=-1) or -1)
    at_once = jobs if jobs > 0 else max(1, cores + 1 + jobs)  # joblib: -1 all cores, -2 all but one, ...
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // at_once))
    log.info(f"{at_once} jobs at once on {cores} cores: {os.environ['OMP_NUM_THREADS']} torch thread(s) each "
             "(OMP_NUM_THREADS)")


class SweepSummary(Callback):
    """See the module's docstring. ``objective``: the column that ranks jobs when the config names no
    ``optimized_metric``."""

    def __init__(self, objective: str = BEST_VAL) -> None:
        self.objective = objective

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .resolvers import run_id

        # the name this process resolved the sweep folder with; jobs in other processes resolve it again
        os.environ["CNNLAB_RUN_ID"] = run_id()
        share_the_cores(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        metric = config.get("optimized_metric")
        if not metric or job_return.status != JobStatus.COMPLETED:
            return
        folder = Path(config.hydra.runtime.output_dir)
        value = job_results(folder).get(metric)
        if isinstance(value, (int, float)):
            job_return.return_value = float(value)
        else:  # a failed trial for the sweeper, with the reason
            job_return.status = JobStatus.FAILED
            job_return.return_value = ConfigError(f"optimized_metric={metric}: not among the results in {folder} "
                                                  f"({', '.join(sorted(job_results(folder))) or 'none'})")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        objective = config.get("optimized_metric") or self.objective
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default="maximize")
        maximize = str(getattr(direction, "name", direction)).lower() != "minimize"
        text, rows = summary_table(sweep_dir, objective, maximize)
        (sweep_dir / "summary.txt").write_text(text + "\n")
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        print(f"\n{text}", flush=True)
