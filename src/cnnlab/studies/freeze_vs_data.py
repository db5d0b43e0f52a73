"""How much of a pretrained network to freeze, against how much data the new task has.

The notes: with a small training set, freeze every layer between the input and the softmax layer and
train only the softmax layer; with a larger one, "freeze fewer layers, train more layers". Every
trial fine-tunes the same pretrained network (the study's pretrain stage) on the same new task, with
one freezing mode and one training-set size; the test images are the same for every trial.

The training sets are nested: the study prepares the largest one once, and a trial of ``n`` images per
class trains on the first ``n`` of each class (the data source ``cnnlab.data.ShapesFirstPerClass``), so a
larger set is a smaller one plus images, and the curves differ by the data added, not by a new draw of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import read_checkpoint
from ..evaluation.evaluate import load_checkpoint
from ..models.net import count_parameters
from ..training.finetune import FreezeStages
from .summary import Claim, Summary, Trial, figure, markdown_table, pct, points


# Where two curves cross -------------------------------------------------------------------------

def crossings(sizes, first, second) -> list[tuple[float, int]]:
    """Where ``second - first`` changes sign along ``sizes`` (increasing), as ``(size, direction)``.

    Between two measured sizes the difference is taken as linear in log size (the plot's axis), so
    the crossing is where that line is zero; ``direction`` is +1 where ``second`` overtakes ``first``
    and -1 where it falls behind. A tie at measured sizes between a sign change puts the crossing in
    the tie's middle (on the log axis); a tie with the same sign on both sides is a touch, no crossing.
    """
    logs = [math.log(s) for s in sizes]
    differences = [b - a for a, b in zip(first, second)]
    signed = [i for i, d in enumerate(differences) if d != 0]
    found = []
    for i, j in zip(signed, signed[1:]):
        di, dj = differences[i], differences[j]
        if (di > 0) == (dj > 0):
            continue
        if j == i + 1:
            where = logs[i] + (logs[j] - logs[i]) * di / (di - dj)
        else:  # tied at sizes i+1 .. j-1
            where = (logs[i + 1] + logs[j - 1]) / 2
        found.append((math.exp(where), 1 if dj > 0 else -1))
    return found


# The measurement --------------------------------------------------------------------------------

HEAD = "all_but_head"


@dataclass
class Point:
    """One trial: a freezing mode at one training-set size."""
    mode: str          # all_but_head, stages2, stages1, none
    per_class: int     # training images per class
    trainable: int     # parameters that train
    steps: int         # optimizer steps taken
    acc: float         # test accuracy


def frozen_depth(params: dict) -> int | None:
    """freeze.depth as the trial passed it: params.yaml spells all_but_head's null as a string."""
    depth = params.get("depth")
    return None if depth in (None, "null") else int(depth)


def mode_name(params: dict) -> str:
    depth = frozen_depth(params)
    return params["freeze"] if params["freeze"] != "stages" else f"stages{depth}"


def trainable_parameters(net, depth: int | None) -> int:
    """What trains under ``FreezeStages(depth)``: the parameters outside the modules it freezes."""
    frozen = FreezeStages(depth).modules_to_freeze(net)
    return count_parameters(net) - sum(count_parameters(module) for module in frozen)


def point(trial: Trial) -> Point:
    checkpoints = trial.folder / "checkpoints"
    module, _ = load_checkpoint(str(checkpoints / "best.ckpt"))
    return Point(mode_name(trial.params), int(trial.params["per_class"]),
                 trainable_parameters(module.net, frozen_depth(trial.params)),
                 int(read_checkpoint(checkpoints / "last.ckpt")["global_step"]), float(trial.metrics["test/acc"]))


def noise_margin(accuracies: list[float], test_images: int) -> float:
    """Two standard errors of the difference of two accuracies measured on ``test_images`` images each:
    a smaller difference could be the draw of the test set alone (another training seed can move more)."""
    p = sum(accuracies) / len(accuracies)
    return 2 * math.sqrt(2 * p * (1 - p) / test_images)


def measure(params: dict, trials: list[Trial], pretrain_metrics: str = "results/pretrain/metrics.json") -> Summary:
    measured = [point(trial) for trial in trials]
    modes = sorted({p.mode for p in measured}, key=lambda m: min(p.trainable for p in measured if p.mode == m))
    if HEAD not in modes or len(modes) < 2:
        raise ValueError(f"freeze_vs_data needs {HEAD} trials and trials of another mode; got {modes}")
    curves = {m: {p.per_class: p for p in measured if p.mode == m} for m in modes}
    sizes = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    if len(sizes) < 2:
        raise ValueError("freeze_vs_data needs every mode at two training-set sizes or more")
    acc = {m: [curves[m][n].acc for n in sizes] for m in modes}
    margin = noise_margin([p.acc for p in measured], int(trials[0].metrics["test/images"]))
    # each pair of modes, the one that freezes more first: where the one that trains more overtakes it
    crossed = {(a, b): crossings(sizes, acc[a], acc[b]) for i, a in enumerate(modes) for b in modes[i + 1:]}

    pretrained = json.loads(Path(pretrain_metrics).read_text())["test/acc"]
    notes = [f"Every trial fine-tunes the pretrain stage's network (test accuracy {pct(pretrained)} on its own task) "
             f"for about {params.get('steps', '?')} optimizer steps, whatever its training-set size (epochs scaled "
             "to it), at its mode's learning rate "
             f"({learning_rates(trials)}); its best epoch on the validation images is tested.",
             f"Test accuracy on the same {int(trials[0].metrics['test/images'])} images in every trial; a difference "
             f"counts when larger than {points(margin)} (two standard errors of a difference of two accuracies there). "
             "One seed per trial: a second seed can move a small training set's accuracy by more.",
             "Crossings are interpolated linearly in log(images per class) between the measured sizes."]
    return Summary("Freezing vs training-set size", claims(modes, sizes, acc, crossed, margin),
                   tables(modes, sizes, curves, crossed), plot(modes, sizes, acc, crossed, margin),
                   metrics(modes, sizes, acc, crossed, margin), notes)


def learning_rates(trials: list[Trial]) -> str:
    rates = {}
    for trial in trials:
        rates.setdefault(mode_name(trial.params), trial.params.get("lr", "?"))
    return ", ".join(f"{mode} {rate}" for mode, rate in rates.items())


def claims(modes, sizes, acc, crossed, margin) -> list[Claim]:
    small, large = sizes[0], sizes[-1]
    others = [m for m in modes if m != HEAD]
    at_small = {m: acc[m][0] for m in modes}
    at_large = {m: acc[m][-1] for m in modes}

    rival = max(others, key=at_small.get)   # the best of the modes that train more, with the least data
    head_lead = at_small[HEAD] - at_small[rival]
    full = modes[-1]                         # the mode that trains the most
    freeze_small = Claim(
        "With a small training set, train only the softmax layer (freeze every layer below it).",
        f"at {small} images per class: {HEAD} {pct(at_small[HEAD])}, best other {rival} {pct(at_small[rival])}, "
        f"{full} {pct(at_small[full])}",
        "confirmed" if head_lead >= 0 and at_small[HEAD] - at_small[full] > margin
        else "refuted" if head_lead < -margin else "not reproduced at this budget")

    best_small = max(modes, key=at_small.get)
    best_large = max(modes, key=at_large.get)
    # what training more than the softmax layer buys, with the least and with the most data
    lead = {m: (at_small[m] - at_small[HEAD], at_large[m] - at_large[HEAD]) for m in others}
    winner = best_large if best_large != HEAD else max(others, key=at_large.get)
    overtakes = [f"{b} overtakes {a} at {n:.1f}" for (a, b), found in crossed.items() if a == HEAD
                 for n, direction in found if direction > 0]
    grows = lead[winner][1] > margin and lead[winner][1] - lead[winner][0] > margin
    # the claim's direction is that more data favours training more: refuted when it favours freezing instead;
    # a lead that grows but stays behind the softmax layer alone leaves the switch beyond the largest size
    shrinks = all(after - before < -margin for before, after in lead.values())
    fewer_large = Claim(
        "With a larger training set, freeze fewer layers and train more of them.",
        f"best at {small} images per class: {best_small} {pct(at_small[best_small])}; at {large}: {best_large} "
        f"{pct(at_large[best_large])}; {winner}'s lead over {HEAD} {points(lead[winner][0], signed=True)} at {small}, "
        f"{points(lead[winner][1], signed=True)} at {large}; "
        + ("; ".join(overtakes) + " images per class" if overtakes else f"no mode overtakes {HEAD} up to {large}"),
        "confirmed" if grows else "refuted" if shrinks else "not reproduced at this budget")
    return [freeze_small, fewer_large]


def tables(modes, sizes, curves, crossed) -> str:
    header = (["images per class", "steps"] + [f"{m} ({curves[m][sizes[0]].trainable:,} trainable)" for m in modes]
              + ["most accurate"])
    rows = []
    for n in sizes:
        steps = sorted({curves[m][n].steps for m in modes})
        rows.append([n, "/".join(str(s) for s in steps)] + [pct(curves[m][n].acc) for m in modes]
                    + [max(modes, key=lambda m: curves[m][n].acc)])
    crossing_rows = [[f"{b} vs {a}", ", ".join(f"{n:.1f} ({'overtakes' if d > 0 else 'falls behind'})"
                                               for n, d in found) or "none"]
                     for (a, b), found in crossed.items()]
    return ("Test accuracy by freezing mode (parameters that train):\n\n"
            + markdown_table(header, rows)
            + "\nWhere the curves cross (images per class, interpolated):\n\n"
            + markdown_table(["trains more vs freezes more", "crossings"], crossing_rows))


def metrics(modes, sizes, acc, crossed, margin) -> dict[str, float]:
    values = {"noise_margin": margin}
    for m in modes:
        for n, a in zip(sizes, acc[m]):
            values[f"{m}_{n}_acc"] = a
    for (a, b), found in crossed.items():
        upward = [n for n, direction in found if direction > 0]
        if upward:  # where the one that trains more first overtakes (no crossing, no figure)
            values[f"{b}_overtakes_{a}_at"] = upward[0]
    return values


COLOURS = {HEAD: "tab:blue", "stages2": "tab:green", "stages1": "tab:orange", "none": "tab:red"}


def plot(modes, sizes, acc, crossed, margin):
    fig, (curves, advantage) = figure(2, width=5.0)
    for m in modes:
        colour = COLOURS.get(m)
        curves.plot(sizes, [100 * a for a in acc[m]], "o-", color=colour, label=m)
        if m != HEAD:
            difference = [100 * (a - h) for a, h in zip(acc[m], acc[HEAD])]
            advantage.plot(sizes, difference, "o-", color=colour, label=f"{m} - {HEAD}")
            for n, _ in crossed[(HEAD, m)]:
                advantage.plot([n], [0], "x", color=colour, markersize=9, markeredgewidth=2)
    advantage.axhline(0, color="tab:blue", linewidth=1)
    advantage.axhspan(-100 * margin, 100 * margin, color="0.85", label="test-set noise (2 s.e.)")
    curves.set(ylabel="test accuracy (%)", title="test accuracy against training-set size")
    advantage.set(ylabel="accuracy minus all_but_head's (points)", title="lead over all_but_head (x: the curves cross)")
    for axes in (curves, advantage):
        axes.set_xscale("log")
        axes.set_xticks(sizes, [str(n) for n in sizes])
        axes.minorticks_off()
        axes.set_xlabel("training images per class (log scale)")
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    return fig
