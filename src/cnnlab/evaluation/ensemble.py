"""Ensembles by output averaging: the test-set probabilities of independently trained members.

Each member is an evaluation folder (``src/evaluate.py``): ``predictions.csv`` with the columns
``index,label,predicted,<class>...`` (one row per test image, its probabilities), and optionally
``evaluation.json`` (the checkpoint and MLflow runs it came from). Members may differ in seed or
architecture, never in what they were tested on: a different test set or class list is refused,
because averaging rows that are not the same images, or columns that are not the same classes,
gives numbers that look fine and mean nothing. Weights are never averaged, only outputs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import tracking
from ..errors import ConfigError
from ..files import write_text, written_whole

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"
EVALUATION = "evaluation.json"
LEADING_COLUMNS = ("index", "label", "predicted")
AVERAGES = ("probabilities", "logits")
ENSEMBLE = "ensemble"  # the ensemble's own name in the outputs, so no member may take it
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # what an MLflow metric key test/<name>/acc can hold unchanged
# A 0 in a predictions file is a probability too small to be written (or a float32 softmax that
# underflowed): logit averaging takes its logarithm at the smallest normal float32, not -inf, which
# would veto the class whatever the other members say.
TINY = torch.finfo(torch.float32).tiny
SUM_TOLERANCE = 1e-3  # rows are written in decimal; 1000 rounded probabilities still sum to 1 within this


@dataclass(frozen=True)
class Member:
    """One member's test-set predictions, rows in test-set order."""
    name: str
    folder: Path
    classes: tuple[str, ...]
    index: tuple[int, ...]         # position of each row's image in the test split
    labels: tuple[str, ...]        # true class names
    probabilities: torch.Tensor    # (images, classes), float64, each row sums to 1
    evaluation: dict = field(default_factory=dict)  # evaluation.json; empty where there is none

    @property
    def targets(self) -> torch.Tensor:
        position = {name: i for i, name in enumerate(self.classes)}
        return torch.tensor([position[label] for label in self.labels])


def is_member_name(name: str) -> bool:
    """A name that is one MLflow key part and one folder name (the pipeline's results/evaluate/<name>):
    only dots ('.', '..') would be this folder or its parent, and MLflow refuses such keys."""
    return NAME.fullmatch(name) is not None and name.strip(".") != "" and name != ENSEMBLE


def read_member(name: str, folder: str | Path) -> Member:
    """Read and check one evaluation folder; every problem is a ConfigError naming the member."""
    if not is_member_name(name):
        raise ConfigError(f"member name {name!r}: use letters, digits, '_', '.' or '-' (not only dots), "
                          f"and not {ENSEMBLE!r}")
    folder = Path(folder)
    where = f"member {name!r} ({folder})"
    if not folder.is_dir():
        raise ConfigError(f"{where}: no such folder; give the folder src/evaluate.py wrote")
    if not (folder / PREDICTIONS).is_file():
        raise ConfigError(f"{where}: no {PREDICTIONS} in it; give the folder src/evaluate.py wrote")
    with open(folder / PREDICTIONS, newline="") as file:
        header, *rows = list(csv.reader(file)) or [[]]
    if tuple(header[:3]) != LEADING_COLUMNS or len(header) < 5:
        raise ConfigError(f"{where}: {PREDICTIONS} must have the columns {','.join(LEADING_COLUMNS)},<class>... "
                          f"with two classes or more; it has {','.join(header[:6])}{',...' if len(header) > 6 else ''}")
    classes = tuple(header[3:])
    if len(set(classes)) < len(classes):
        raise ConfigError(f"{where}: {PREDICTIONS} names a class twice")
    if not rows:
        raise ConfigError(f"{where}: {PREDICTIONS} has no rows")
    for number, row in enumerate(rows, 2):  # line numbers as an editor shows them, the header being line 1
        if len(row) != len(header):
            raise ConfigError(f"{where}: {PREDICTIONS} line {number} has {len(row)} values, the header {len(header)}")
        if row[1] not in classes:
            raise ConfigError(f"{where}: {PREDICTIONS} line {number}: label {row[1]!r} is none of its classes")
    try:
        index = tuple(int(row[0]) for row in rows)
        probabilities = torch.tensor(np.asarray([row[3:] for row in rows], dtype=np.float64))
    except ValueError as error:
        raise ConfigError(f"{where}: {PREDICTIONS} holds a value that is not a number ({error})") from None
    evaluation = _read_evaluation(folder, where, classes)
    return Member(name, folder, classes, index, tuple(row[1] for row in rows),
                  _checked_probabilities(probabilities, where), evaluation)


def _read_evaluation(folder: Path, where: str, classes: tuple[str, ...]) -> dict:
    path = folder / EVALUATION
    if not path.is_file():
        return {}  # hand-made folders may have none: the predictions alone define the member
    try:
        evaluation = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: {EVALUATION} is not valid JSON ({error})") from None
    if "classes" in evaluation and tuple(evaluation["classes"]) != classes:
        raise ConfigError(f"{where}: {EVALUATION} lists other classes than the columns of {PREDICTIONS}")
    return evaluation


def _checked_probabilities(probabilities: torch.Tensor, where: str) -> torch.Tensor:
    """Refuse anything but probabilities (logits, percentages, NaN); return rows that sum to exactly 1."""
    bad = ~torch.isfinite(probabilities).all(1) | (probabilities < 0).any(1) | (probabilities > 1 + SUM_TOLERANCE).any(1)
    sums = probabilities.sum(1)
    bad |= (sums - 1).abs() > SUM_TOLERANCE
    if bad.any():
        row = int(bad.nonzero()[0])
        values = ", ".join(f"{v:.4g}" for v in probabilities[row, :4].tolist())
        raise ConfigError(f"{where}: {PREDICTIONS} line {row + 2} is not a row of probabilities (values in [0, 1] "
                          f"summing to 1): {values}{', ...' if probabilities.shape[1] > 4 else ''} "
                          f"sum to {sums[row]:.4g}")
    return probabilities / sums[:, None]  # the rounding of the decimal text, not a change of the prediction


def check_compatible(members: Sequence[Member]) -> None:
    """Every member must cover the same test images, in the same order, with the same classes."""
    first = members[0]
    for member in members[1:]:
        where = f"member {member.name!r} ({member.folder})"
        if member.classes != first.classes:
            raise ConfigError(f"{where}: its classes differ from member {first.name!r}'s "
                              f"({_first_difference(member.classes, first.classes)}); "
                              "an ensemble needs models of the same classes in the same order")
        if (member.index, member.labels) != (first.index, first.labels):
            raise ConfigError(f"{where}: its test set differs from member {first.name!r}'s "
                              f"({_test_set_difference(member, first)}); evaluate every member on the same data")


def _first_difference(ours: Sequence[str], theirs: Sequence[str]) -> str:
    for position, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"class {position}: {a!r} vs {b!r}"
    return f"{len(ours)} vs {len(theirs)} classes"


def _test_set_difference(member: Member, first: Member) -> str:
    if len(member.index) != len(first.index):
        return f"{len(member.index)} vs {len(first.index)} images"
    row = next(i for i, (a, b) in enumerate(zip(zip(member.index, member.labels), zip(first.index, first.labels)))
               if a != b)
    return (f"line {row + 2}: image {member.index[row]} labelled {member.labels[row]!r} "
            f"vs image {first.index[row]} labelled {first.labels[row]!r}")


def normalised_weights(names: Sequence[str], weights: Mapping[str, float] | None) -> list[float]:
    """One weight per member, summing to 1; ``None`` weighs every member the same."""
    if weights is None:
        return [1 / len(names)] * len(names)
    unknown = sorted(set(weights) - set(names))
    missing = [name for name in names if name not in weights]
    if unknown or missing:
        raise ConfigError("weights must name each member once: "
                          + "; ".join(filter(None, [unknown and f"no member named {', '.join(unknown)}",
                                                    missing and f"no weight for {', '.join(missing)}"])))
    values = []
    for name in names:
        weight = weights[name]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"weights.{name}={weight!r}: a weight is a number >= 0")
        values.append(float(weight))
    total = sum(values)
    if total == 0:
        raise ConfigError("weights are all 0: give at least one member a positive weight")
    return [value / total for value in values]


def average(probabilities: Sequence[torch.Tensor], weights: Sequence[float], method: str = "probabilities"
            ) -> torch.Tensor:
    """The ensemble's probabilities: the weighted mean of the members' (``probabilities``), or the
    softmax of the weighted mean of their log-probabilities (``logits``: the same as averaging the
    logits, since a log-softmax is the logits less one constant per image, which softmax ignores)."""
    if method not in AVERAGES:
        raise ConfigError(f"average={method!r}: use {' or '.join(AVERAGES)}")
    stacked = torch.stack(list(probabilities))
    w = torch.tensor(weights, dtype=stacked.dtype)[:, None, None]
    if method == "probabilities":
        return (w * stacked).sum(0)
    return torch.softmax((w * stacked.clamp_min(TINY).log()).sum(0), dim=1)


def metrics(probabilities: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """acc, acc_top5 (five classes or more), f1 and loss, computed as src/evaluate.py computes its own
    (in float32, as it does), so a member's row matches its evaluation's metrics."""
    from .reports import scores  # imported here: the averaging itself needs no Lightning

    return scores(probabilities.float(), targets)


def write_predictions(path: Path, template: Member, probabilities: torch.Tensor) -> Path:
    """The ensemble's predictions in its members' format, so the ensemble can itself be a member."""
    predicted = probabilities.argmax(1).tolist()
    with written_whole(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow([*LEADING_COLUMNS, *template.classes])
        for row, (index, label) in enumerate(zip(template.index, template.labels)):
            writer.writerow([index, label, template.classes[predicted[row]],
                             *(f"{p:.6g}" for p in probabilities[row].tolist())])
    return path


def gains(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The ensemble less the best member, metric by metric (best: the highest, the lowest loss)."""
    members = [values for name, values in results.items() if name != ENSEMBLE]
    best = {metric: (min if metric == "loss" else max)(values[metric] for values in members)
            for metric in results[ENSEMBLE]}
    return {metric: results[ENSEMBLE][metric] - best[metric] for metric in best}


def _cells(results: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> list[list[str]]:
    metrics_shown = list(results[ENSEMBLE])
    rows = [["member", "weight", *metrics_shown]]
    for name, values in results.items():
        weight = f"{weights[name]:.3f}" if name in weights else ""
        rows.append([name, weight, *(f"{values[m]:.4f}" for m in metrics_shown)])
    difference = gains(results)
    rows.append(["ensemble - best member", "", *(f"{difference[m]:+.4f}" for m in metrics_shown)])
    return rows


def markdown_table(results, weights, how: str) -> str:
    header, *rows = _cells(results, weights)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[:-2]]
    lines += ["| " + " | ".join(f"**{cell}**" if cell else "" for cell in rows[-2]) + " |",
              "| " + " | ".join(rows[-1]) + " |"]
    return f"{summary(results, how)}\n\n" + "\n".join(lines) + "\n"


def text_table(results, weights) -> str:
    cells = _cells(results, weights)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def line(row):  # names to the left, numbers to the right
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(cells[0]))
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:-2]), rule, *map(line, cells[-2:])]) + "\n"


def describe(method: str, weights: Mapping[str, float]) -> str:
    """How the members are combined, in words: "mean of the probabilities", "weighted mean of the logits"."""
    weighted = len(set(weights.values())) > 1
    return f"{'weighted ' if weighted else ''}mean of the {method}"


def summary(results, how: str) -> str:
    members = {name: values["acc"] for name, values in results.items() if name != ENSEMBLE}
    best = max(members, key=members.get)
    count = f"{len(members)} member{'s' if len(members) > 1 else ''}"
    return (f"Ensemble of {count} ({how}): top-1 accuracy {results[ENSEMBLE]['acc']:.4f}, "
            f"{100 * (results[ENSEMBLE]['acc'] - members[best]):+.2f} points over the best member, "
            f"{best} ({members[best]:.4f}).")


def write_csv(path: Path, results, weights, members: Sequence[Member]) -> Path:
    folders = {member.name: member.folder for member in members}
    columns = list(results[ENSEMBLE])
    with written_whole(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["member", "weight", *columns, "folder"])
        for name, values in results.items():
            writer.writerow([name, weights.get(name, ""), *(values[c] for c in columns), folders.get(name, "")])
    return path


def write_chart(path: Path, results, how: str) -> Path:
    """Top-1 accuracy per member and of the ensemble; bars from 0, values written on them, so a
    small gain is read from the numbers rather than from a cut axis."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    names = list(results)
    accuracy = [results[name]["acc"] for name in names]
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.6), layout="constrained")
    axes = figure.subplots()
    colours = ["tab:gray" if name != ENSEMBLE else "tab:blue" for name in names]
    bars = axes.bar(names, accuracy, color=colours)
    axes.bar_label(bars, labels=[f"{a:.4f}" for a in accuracy], padding=2, fontsize=8)
    axes.axhline(max(accuracy[:-1]), color="tab:gray", linestyle="--", linewidth=0.8, label="best member")
    axes.set_ylim(0, 1.22)  # room above 1.0 for the values and the legend
    axes.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_ylabel("test top-1 accuracy")
    axes.set_title(f"Ensemble ({how}) and its members", fontsize=10)
    axes.legend(loc="upper left", fontsize=8, frameon=False)
    axes.tick_params(axis="x", labelrotation=30 if len(names) > 5 else 0)
    with written_whole(path) as partial:
        figure.savefig(partial, dpi=120)
    return path


def ensemble(cfg) -> dict[str, dict[str, float]]:
    """``python src/ensemble.py``: average the members, write and print the comparison, track it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    folders = OmegaConf.to_container(cfg.members, resolve=True) if OmegaConf.is_config(cfg.members) else cfg.members
    if not isinstance(folders, dict) or not all(isinstance(f, str) for f in folders.values()):
        raise ConfigError("members maps a name to an evaluation folder: 'members={a: outputs/evaluate/x, b: ...}'")
    folders = {str(name): folder for name, folder in folders.items()}  # members={1: ..., 2: ...} names them "1", "2"
    if not folders:
        raise ConfigError("members is empty: name two evaluation folders or more")
    if len(folders) == 1:
        # Allowed, so a pipeline parametrised by its list of seeds also runs with one; the numbers are
        # those of the member itself, and the table shows a gain of 0.
        log.warning("an ensemble of one member is that member: nothing is averaged")
    if cfg.average not in AVERAGES:
        raise ConfigError(f"average={cfg.average!r}: use {' or '.join(AVERAGES)}")
    given = OmegaConf.to_container(cfg.weights, resolve=True) if OmegaConf.is_config(cfg.weights) else cfg.weights
    if given is not None and not isinstance(given, dict):
        raise ConfigError("weights maps each member's name to a number: 'weights={a: 2, b: 1}'")
    given = given and {str(name): weight for name, weight in given.items()}
    weights = dict(zip(folders, normalised_weights(list(folders), given)))  # checked before any file is read

    tracking.use_store(cfg.tracking_uri, cfg.paths.mlflow_db)  # a server must answer before any work
    members = [read_member(name, folder) for name, folder in folders.items()]
    check_compatible(members)
    with tracking.tracked_run(cfg, "ensemble", tags=member_tags(members), trainer=False) as logger:
        probabilities = average([m.probabilities for m in members], list(weights.values()), cfg.average)
        targets = members[0].targets
        results = {m.name: metrics(m.probabilities, targets) for m in members}
        results[ENSEMBLE] = metrics(probabilities, targets)

        how = describe(cfg.average, weights)
        out = Path(HydraConfig.get().runtime.output_dir)
        write_text(out / "metrics.json", json.dumps(results, indent=2))
        write_text(out / "members.md", markdown_table(results, weights, how))
        files = [out / "metrics.json", out / "members.md", write_csv(out / "members.csv", results, weights, members),
                 write_chart(out / "accuracy.png", results, how),
                 write_predictions(out / PREDICTIONS, members[0], probabilities)]
        if logger is not None:
            log_run(logger, cfg, members, weights, results, files)
        log.info(f"\n{summary(results, how)}\n\n{text_table(results, weights)}\nWrote {out}")
    return results


def member_tags(members: Sequence[Member]) -> dict[str, str]:
    """Each member's evaluation run and the training run behind it, to walk back from the ensemble."""
    tags = {}
    for member in members:
        for key, tag in (("mlflow_run_id", "run_id"), ("train_run_id", "train_run_id")):
            if member.evaluation.get(key):
                tags[f"cnnlab.member.{member.name}.{tag}"] = str(member.evaluation[key])
    return tags


def log_run(logger, cfg, members: Sequence[Member], weights: Mapping[str, float], results, files: Sequence[Path]):
    """The members and the ensemble side by side in one MLflow run."""
    logger.log_hyperparams({"average": cfg.average, **{f"members.{m.name}": str(m.folder) for m in members},
                            **{f"weights.{name}": weight for name, weight in weights.items()}})
    logger.log_metrics({f"test/{name}/{metric}": value
                        for name, values in results.items() for metric, value in values.items()})
    tracking.log_files(logger, files)
