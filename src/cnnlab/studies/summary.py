"""A study's summarising stage: read the trials, let the study measure and judge, write and log the result.

Every study writes the same three files into its ``results/summary/`` folder: ``summary.md`` (claim,
claims and verdicts, table, picture), ``summary.png`` and ``summary.json`` (the figures DVC shows as
metrics), and logs them as the study's parent MLflow run, under which its trial runs are nested
(their ``mlflow.parentRunId`` tag), so the UI shows a study as one expandable row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import yaml
from omegaconf import DictConfig

from .. import tracking
from ..errors import ConfigError
from ..files import write_text, written_whole

log = logging.getLogger(__name__)


@dataclass
class Trial:
    """One training of a study: its entry in the study's params and what its run folder holds."""
    key: str
    params: dict                      # the trial's entry under ``trials:`` in the study's params.yaml
    folder: Path                      # its run folder (results/trials/<key>)
    metrics: dict                     # train.py's metrics.json (test scores)
    history: list[dict]               # history.csv: one row per epoch
    run: object | None = None         # its MLflow run (mlflow.entities.Run), when the store has it

    @property
    def last_epoch(self) -> dict:
        return self.history[-1] if self.history else {}

    def column(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.history if row.get(name) not in (None, "")]


VERDICTS = ("confirmed", "not reproduced at this budget", "refuted")


@dataclass
class Claim:
    """One claim of the course notes, what the study measured about it, and the verdict."""
    claim: str        # the notes' words
    measured: str     # the figures, in one sentence
    verdict: str      # one of VERDICTS

    def __post_init__(self):
        assert self.verdict in VERDICTS, self.verdict


@dataclass
class Summary:
    """What a study found: its verdicts, a table of the trials and a picture."""
    title: str
    claims: list[Claim]
    table: str                        # Markdown, one row per trial
    figure: object                    # a matplotlib Figure
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what else a reader should know, one sentence each


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study: {path} is missing; run a study from its folder (dvc repro pipelines/<study>/dvc.yaml)")
    return yaml.safe_load(path.read_text()) or {}


def read_trials(params: Mapping, trials_dir: Path) -> list[Trial]:
    """The trials params.yaml lists, in its order, each with what its training wrote."""
    trials = []
    for key, entry in (params.get("trials") or {}).items():
        folder = trials_dir / key
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            raise ConfigError(f"study: trial {key!r} has no {metrics_file}; run its stage first (dvc repro)")
        trials.append(Trial(key, dict(entry or {}), folder, json.loads(metrics_file.read_text()),
                            read_history(folder / "history.csv")))
    return trials


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def machine() -> str:
    """The machine the figures were measured on, for the summary's last line."""
    import torch

    processor, threads = platform.processor() or platform.machine(), torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return f"{device} ({processor}, torch {torch.__version__}, {threads} torch thread{'s' if threads > 1 else ''})"


def claims_table(claims: list[Claim]) -> str:
    """The claims as Markdown rows: the table docs/studies.md opens with is every study's rows."""
    lines = ["| claim of the notes | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.measured} | **{c.verdict}** |" for c in claims]
    return "\n".join(lines) + "\n"


def markdown(summary: Summary, picture: str, command: str) -> str:
    notes = "".join(f"- {line}\n" for line in summary.notes)
    return (f"# {summary.title}\n\n{claims_table(summary.claims)}\n{notes and notes + chr(10)}"
            f"{summary.table.rstrip()}\n\n![{summary.title}]({picture})\n\n"
            f"Reproduce: `{command}`. Measured on {machine()}.\n")


def write(summary: Summary, folder: Path, command: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    picture = folder / "summary.png"
    with written_whole(picture) as partial:
        summary.figure.savefig(partial, dpi=110)
    return [write_text(folder / "summary.md", markdown(summary, picture.name, command)),
            picture,
            write_text(folder / "summary.json", json.dumps(summary.metrics, indent=2, sort_keys=True) + "\n")]


def stage_runs(client, experiment_name: str, own_run_id: str) -> dict[tuple[str, str], object]:
    """The newest run of each of the study's DVC stages and run folders (their ``cnnlab.dvc.stage`` and
    ``cnnlab.run_folder`` tags; a stage that sweeps has a folder per job): the runs behind its current
    results. Runs made outside DVC have no stage and are left alone."""
    experiment = client.get_experiment_by_name(experiment_name)
    newest = {}
    if experiment is None:
        return newest
    for run in client.search_runs([experiment.experiment_id], "", order_by=["attributes.start_time DESC"]):
        key = (run.data.tags.get("cnnlab.dvc.stage"), run.data.tags.get("cnnlab.run_folder", ""))
        earlier_summary = run.data.tags.get("cnnlab.stage") == "study"  # a parent, not a stage under it
        if key[0] and run.info.run_id != own_run_id and not earlier_summary and key not in newest:
            newest[key] = run
    return newest


def nest(client, runs: dict[tuple[str, str], object], parent_id: str, trials: list[Trial]) -> None:
    """Each stage's run under the study's run in the UI (``mlflow.parentRunId``); each trial given its training's run."""
    for run in runs.values():
        client.set_tag(run.info.run_id, "mlflow.parentRunId", parent_id)
    for trial in trials:
        trial.run = next((run for (stage, _), run in runs.items() if stage.endswith(f"train@{trial.key}")), None)


def summarise(cfg: DictConfig, measure: Callable[[dict, list[Trial]], Summary]) -> Summary:
    """``python src/study.py study=<name>``: the study's summary, written and logged as its parent run."""
    params = read_params(cfg.params_file)
    trials = read_trials(params, Path(cfg.results_dir) / "trials")
    output = Path(cfg.output_dir)
    with tracking.tracked_run(cfg, "study", tags={"cnnlab.study": cfg.study.name}, trainer=False) as logger:
        runs = stage_runs(logger.experiment, cfg.experiment, logger.run_id) if logger is not None else {}
        if runs:
            nest(logger.experiment, runs, logger.run_id, trials)
        summary = measure(params, trials)
        files = write(summary, output, f"make study NAME={cfg.study.name}")
        if logger is not None:
            logger.log_hyperparams(tracking.flatten({k: v for k, v in params.items() if k != "trials"}))
            logger.log_metrics(summary.metrics)
            tracking.log_files(logger, files)
    for claim in summary.claims:
        print(f"{claim.verdict}: {claim.claim} ({claim.measured})")
    print(f"Wrote {', '.join(str(f) for f in files)}")
    return summary


def markdown_table(header: list[str], rows: list[list]) -> str:
    """Names left-aligned, numbers right-aligned."""
    def numeric(value) -> bool:
        return isinstance(value, (int, float)) or str(value).rstrip("%x ").replace(".", "", 1).lstrip("-").isdigit()
    align = ["---:" if rows and numeric(rows[0][i]) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(columns: int, width: float = 4.2, height: float = 3.4):
    """A matplotlib Figure and its axes, side by side (no pyplot: no GUI backend, nothing global)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, height), layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    return fig, list(axes)


def prepared_data(data_dir: str | Path):
    """The image cache the study's prepare stage made (DVC empties the folder before re-making it)."""
    from ..data.cache import ImageCache

    caches = sorted(Path(data_dir).glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    if not caches:
        raise ConfigError(f"study: no prepared data under {data_dir}; run the study's prepare stage first")
    return ImageCache(caches[-1].parent)


def pct(value: float) -> str:
    """A fraction as a percentage with one decimal: 0.869 -> 86.9%."""
    return f"{100 * value:.1f}%"


def significant(value: float, figures: int) -> str:
    """A measured value to ``figures`` significant figures, never in powers of ten as ``:g`` would write
    it: 130 (not 1.3e+02), 6.1, 0.0098, 1230."""
    return format(Decimal(f"{value:.{figures}g}").normalize(), "f")


def points(value: float, signed: bool = False) -> str:
    """A difference of two fractions in percentage points, one decimal: 0.032 -> "3.2 points"; ``signed``
    for a gain or a loss ("+3.2 points"), not for a size (a margin, a spread)."""
    return f"{100 * value:{'+' if signed else ''}.1f} points"
