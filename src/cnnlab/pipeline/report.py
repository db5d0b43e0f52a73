"""The main pipeline's report: what each stage wrote under results/, side by side, with the MLflow runs behind it.

Reads the pretraining (``results/pretrain``), each member's training and evaluation
(``results/train/<name>``, ``results/evaluate/<name>``; the members are those of the ensemble) and
the ensemble (``results/ensemble``); looks the runs up in the MLflow store; writes ``report.md``,
``report.html`` (the same page, for a browser) and two pictures, and logs them as one MLflow run
(``cnnlab.stage=report``) whose tags name every run it summarises.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from .. import tracking
from ..checkpoints import read_checkpoint
from ..errors import ConfigError
from ..files import write_text, written_whole
from ..evaluation.ensemble import is_member_name

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"  # the ensemble's own row in its metrics.json (cnnlab.evaluation.ensemble.ENSEMBLE)
PLAIN = "none"         # the plain view every evaluation also scores


@dataclass
class Member:
    name: str
    evaluation: dict       # evaluate's evaluation.json: tta, run ids, classes
    scores: dict           # evaluate's metrics.json: {"none": {...}, "<tta>": {...}}
    history: list[dict]    # train's history.csv, one row per epoch
    train_run: Run
    evaluate_run: Run

    @property
    def tta(self) -> str:
        return self.evaluation["tta"]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"report: {path} is missing; run the pipeline first (dvc repro)")
    return json.loads(path.read_text())


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []  # a run without the history callback: no curve, the rest of the report stands
    with open(path, newline="") as file:
        return [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(file)]


def checkpoint_run_id(path: Path) -> str:
    """The MLflow run that wrote a checkpoint (cnnlab checkpoints name it)."""
    if not path.is_file():
        raise ConfigError(f"report: {path} is missing; run the pipeline first (dvc repro)")
    run_id = read_checkpoint(path).get("mlflow_run_id")
    if not run_id:
        raise ConfigError(f"report: {path} names no MLflow run (was it trained with logger=none?)")
    return run_id


def get_run(client: MlflowClient, run_id: str, what: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"report: the {what} run {run_id} is not in the MLflow store {client.tracking_uri}; "
                          "report against the store the pipeline logged into (MLFLOW_TRACKING_URI)") from None


def find_ensemble_run(client: MlflowClient, experiment: str, members: list[Member]) -> Run:
    """The latest ensemble run over exactly these evaluation runs (its tags name each member's)."""
    found = client.get_experiment_by_name(experiment)
    conditions = ["tags.`cnnlab.stage` = 'ensemble'"]
    conditions += [f"tags.`cnnlab.member.{m.name}.run_id` = '{m.evaluate_run.info.run_id}'" for m in members]
    runs = client.search_runs([found.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"],
                              max_results=1) if found else []
    if not runs:
        raise ConfigError(f"report: no ensemble run over the evaluation runs of {', '.join(m.name for m in members)} "
                          f"in the MLflow experiment {experiment!r} of {client.tracking_uri}")
    return runs[0]


def read_members(results: Path, client: MlflowClient, names: list[str]) -> list[Member]:
    members = []
    for name in names:
        if not is_member_name(name):  # names from a file become folder names below: none may climb out
            raise ConfigError(f"report: {results / ENSEMBLE / 'metrics.json'} names a member {name!r}, which is no "
                              "member name (letters, digits, '_', '.' or '-', not only dots)")
        evaluation = read_json(results / "evaluate" / name / "evaluation.json")
        members.append(Member(
            name=name, evaluation=evaluation, scores=read_json(results / "evaluate" / name / "metrics.json"),
            history=read_history(results / "train" / name / "history.csv"),
            train_run=get_run(client, evaluation["train_run_id"], f"train@{name}"),
            evaluate_run=get_run(client, evaluation["mlflow_run_id"], f"evaluate@{name}")))
    return members


def describe_start(params: dict) -> str:
    weights = params.get("model.pretrained", "None")
    return "random weights" if weights in ("None", "False", "") else f"`{weights}`"


def override(run: Run, key: str) -> str:
    """The value the run's command line gave ``key`` (a config group's choice is logged nowhere else)."""
    for token in run.data.tags.get("cnnlab.command", "").split():
        if token.startswith(f"{key}="):
            return token.partition("=")[2]
    return "?"


def trainable(params: dict) -> str:
    try:
        return f"{int(params['params_trainable']):,} of {int(params['params_total']):,}"
    except (KeyError, ValueError):
        return ""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; columns of numbers (and blanks) align right."""
    def numeric(cell: str) -> bool:
        return re.fullmatch(r"\**[-+]?[\d,.]+( of [\d,]+| points)?\**|", cell) is not None

    align = ["---:" if all(numeric(row[i]) for row in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def members_table(members: list[Member], ensemble: dict) -> list[str]:
    modes = list(dict.fromkeys(m.tta for m in members))
    header = ["member", "model", "starts from", "freeze", "trainable at start", "epochs", f"acc ({PLAIN})",
              *(f"acc ({mode})" for mode in modes if mode != PLAIN), "gain"]
    rows = []
    for m in members:
        params = m.train_run.data.params
        plain, tta = m.scores[PLAIN]["acc"], m.scores[m.tta]["acc"]
        rows.append([m.name, f"`{params.get('model.name', '?')}`", describe_start(params),
                     f"`{override(m.train_run, 'freeze')}`", trainable(params),
                     params.get("trainer.max_epochs", "?"), f"{plain:.4f}",
                     *(f"{tta:.4f}" if mode == m.tta else "" for mode in modes if mode != PLAIN),
                     f"{100 * (tta - plain):+.2f} points"])
    blanks = [""] * (len(header) - 3)
    rows.append([f"**{ENSEMBLE}**", *blanks, f"**{ensemble[ENSEMBLE]['acc']:.4f}**", ""])
    return table(header, rows)


def accuracy_chart(path: Path, members: list[Member], ensemble: dict) -> Path:
    """Each member's accuracy with the plain view and with its test-time views, and the ensemble's."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    figure = Figure(figsize=(max(4.5, 1.3 * len(members) + 2), 3.6), layout="constrained")
    axes = figure.subplots()
    positions = range(len(members))
    for offset, (label, colour, values) in enumerate([
            (PLAIN, "tab:gray", [m.scores[PLAIN]["acc"] for m in members]),
            ("test-time views", "tab:orange", [m.scores[m.tta]["acc"] for m in members])]):
        bars = axes.bar([p + (offset - 0.5) * 0.38 for p in positions], values, width=0.38, color=colour, label=label)
        axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=7)
    bar = axes.bar([len(members)], [ensemble[ENSEMBLE]["acc"]], width=0.5, color="tab:blue", label=ENSEMBLE)
    axes.bar_label(bar, labels=[f"{ensemble[ENSEMBLE]['acc']:.3f}"], padding=2, fontsize=7)
    axes.set_xticks([*positions, len(members)], [*(m.name for m in members), ENSEMBLE])
    axes.set_ylim(0, 1.25)  # room above 1.0 for the values and the legend
    axes.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_ylabel("test top-1 accuracy")
    axes.legend(loc="upper left", fontsize=8, frameon=False, ncols=3)
    with written_whole(path) as partial:
        figure.savefig(partial, dpi=110)
    return path


def curves_chart(path: Path, pretrain: list[dict], members: list[Member]) -> Path:
    """Validation accuracy per epoch: the pretraining on the source task, the members on the target task."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    for axes, title, curves in [(left, "pretrain (source task)", {"pretrain": pretrain}),
                                (right, "members (target task)", {m.name: m.history for m in members})]:
        for name, rows in curves.items():
            rows = [row for row in rows if "val_acc" in row]
            axes.plot([row["epoch"] + 1 for row in rows], [row["val_acc"] for row in rows], marker=".", label=name)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch")
        axes.legend(fontsize=8, frameon=False)
    left.set_ylabel("validation accuracy")
    left.set_ylim(0, 1)
    with written_whole(path) as partial:
        figure.savefig(partial, dpi=110)
    return path


def link(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def task(params: dict) -> str:
    """"10 classes, 5,000 training images": the data a training run's logged params describe."""
    classes = sum(1 for key in params if key.startswith("data.source.classes."))
    return f"{classes} classes, {int(params.get('data.source.train_size', 0)):,} training images"


def plural(count, noun: str) -> str:
    return f"{count} {noun}{'' if str(count) == '1' else 's'}"


def markdown(experiment: str, pretrain: dict, pretrain_run: Run, members: list[Member], ensemble: dict,
             ensemble_run: Run, results: Path, out: Path) -> str:
    params = pretrain_run.data.params
    target = members[0].train_run.data.params
    lines = [
        f"# Pipeline report: `{experiment}`", "",
        f"Pretraining: `{params.get('model.name', '?')}` on the source task ({task(params)},"
        f" {plural(params.get('trainer.max_epochs', '?'), 'epoch')}) reaches **{pretrain['test/acc']:.4f}**"
        " test accuracy.",
        f"Fine-tuning: {plural(len(members), 'member')} on the target task ({task(target)}), each scored on its"
        f" {int(target.get('data.source.test_size', 0)):,} test images with the plain view and with"
        f" `tta={members[0].tta}`, averaged into an ensemble that reaches **{ensemble[ENSEMBLE]['acc']:.4f}**.", "",
        "## Target task: test accuracy", "",
        *members_table(members, ensemble), "",
        "![Test accuracy of each member, plain and with test-time views, and of the ensemble](accuracy.png)", "",
        "## Training curves", "",
        "![Validation accuracy per epoch](curves.png)", "",
        "## Ensemble", "",
        (results / ENSEMBLE / "members.md").read_text().strip(), "",
        f"![The ensemble and its members]({link(results / ENSEMBLE / 'accuracy.png', out)})", "",
        "## MLflow runs", "",
        *table(["stage", "run id"], [["pretrain", f"`{pretrain_run.info.run_id}`"],
                                     *([f"train@{m.name}", f"`{m.train_run.info.run_id}`"] for m in members),
                                     *([f"evaluate@{m.name}", f"`{m.evaluate_run.info.run_id}`"] for m in members),
                                     ["ensemble", f"`{ensemble_run.info.run_id}`"]]),
        "",
    ]
    return "\n".join(lines)


def html(text: str, title: str) -> str:
    """The Markdown as a standalone page; markdown-it-py comes with DVC (through rich)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(text)
    style = ("body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style>"
            f"</head><body>\n{body}</body></html>\n")


def report(cfg: DictConfig) -> Path:
    """``python src/report.py``: write and track the report of the pipeline's results; returns report.md."""
    results, out = Path(cfg.results_dir), Path(cfg.output_dir)
    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)
    client = MlflowClient()
    ensemble = read_json(results / ENSEMBLE / "metrics.json")
    pretrain = read_json(results / "pretrain" / "metrics.json")
    pretrain_run = get_run(client, checkpoint_run_id(results / "pretrain" / "checkpoints" / "best.ckpt"), "pretrain")
    members = read_members(results, client, [name for name in ensemble if name != ENSEMBLE])
    ensemble_run = find_ensemble_run(client, cfg.experiment, members)

    refs = {"cnnlab.pretrain.run_id": pretrain_run.info.run_id, "cnnlab.ensemble.run_id": ensemble_run.info.run_id}
    for m in members:
        refs[f"cnnlab.member.{m.name}.train_run_id"] = m.train_run.info.run_id
        refs[f"cnnlab.member.{m.name}.run_id"] = m.evaluate_run.info.run_id
    with tracking.tracked_run(cfg, "report", tags=refs, trainer=False) as logger:
        out.mkdir(parents=True, exist_ok=True)
        files = [accuracy_chart(out / "accuracy.png", members, ensemble),
                 curves_chart(out / "curves.png", read_history(results / "pretrain" / "history.csv"), members)]
        text = markdown(cfg.experiment, pretrain, pretrain_run, members, ensemble, ensemble_run, results, out)
        write_text(out / "report.md", text)
        write_text(out / "report.html", html(text, f"Pipeline report: {cfg.experiment}"))
        files += [out / "report.md", out / "report.html"]
        if logger is not None:
            log_run(logger, pretrain, members, ensemble, files)
        log.info(f"\n{text.splitlines()[2]}\n\nWrote {(out / 'report.md').resolve()} and report.html")
    return out / "report.md"


def log_run(logger, pretrain: dict, members: list[Member], ensemble: dict, files: list[Path]) -> None:
    metrics = {"pretrain/test/acc": pretrain["test/acc"], f"test/{ENSEMBLE}/acc": ensemble[ENSEMBLE]["acc"]}
    for m in members:
        metrics.update({f"test/{m.name}/{mode}/acc": values["acc"] for mode, values in m.scores.items()})
    logger.log_metrics(metrics)
    tracking.log_files(logger, files)
