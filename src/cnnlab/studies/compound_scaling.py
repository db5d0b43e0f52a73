"""Scaling resolution, depth or width alone against compound scaling (Tan & Le 2019, figure 3 and section 3.3).

The notes: a network is scaled up or down to the resources by its resolution r, its depth d and its width w.
The paper: growing any one of them gains accuracy with diminishing returns, and growing all three together
by one coefficient phi (d = alpha^phi, w = beta^phi, r = gamma^phi) gains more for the same multiply-adds.
Each trial is ``scaling=custom`` on a small base; its direction follows from its coefficients (one of them
above 1: that dimension alone; several: compound; phi = 0: the base, the start of every line). Multiply-adds
are counted on the trial's trained network at its own resolution. Curves are compared at matched
multiply-adds by interpolating the compound line, linearly in log multiply-adds, at each single-dimension
trial's cost (no extrapolation: the compound line must reach that far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..analysis.cost import count_macs, human
from ..evaluation.evaluate import load_checkpoint
from ..resolvers import compound
from .summary import Claim, Summary, Trial, figure, markdown_table, pct, points

# each dimension and the coefficient of conf/scaling/custom.yaml that grows it
DIMENSIONS = {"resolution": "gamma", "depth": "alpha", "width": "beta"}
DIRECTIONS = (*DIMENSIONS, "compound")
COLOURS = {"resolution": "tab:green", "depth": "tab:orange", "width": "tab:blue", "compound": "tab:red"}


@dataclass
class Point:
    """One trained trial: how it was scaled, what it costs, how well it does."""
    trial: Trial
    direction: str        # "base", one of DIMENSIONS, or "compound"
    phi: float
    width: float          # the network's width and depth multipliers, as its checkpoint built it
    depth: float
    resolution: int       # px
    params: int
    macs: int             # multiply-adds per image at its resolution
    accuracy: float       # test accuracy


def direction(entry: dict) -> str:
    """Which way a trial scales the base: the dimensions whose coefficient grows them."""
    if float(entry["phi"]) == 0:
        return "base"
    grown = [name for name, coefficient in DIMENSIONS.items() if float(entry[coefficient]) != 1]
    return "compound" if len(grown) > 1 else grown[0] if grown else "base"


def resolution(base: dict, entry: dict) -> int:
    """The trial's image size, computed as its config did (conf/scaling/custom.yaml's compound resolver)."""
    return compound(int(base["resolution"]), float(entry["gamma"]), entry["phi"])


def measure_trial(trial: Trial, base: dict) -> Point:
    module, _ = load_checkpoint(str(trial.folder / "checkpoints" / "last.ckpt"))
    size = resolution(base, trial.params)
    model = module.hparams["model"]
    return Point(trial, direction(trial.params), float(trial.params["phi"]), float(model["width_mult"]),
                 float(model["depth_mult"]), size, sum(p.numel() for p in module.net.parameters()),
                 count_macs(module.net, (1, 3, size, size)), float(trial.metrics["test/acc"]))


def lines(points: list[Point]) -> dict[str, list[Point]]:
    """Each direction's points by cost, starting from the base (figure 3's curves)."""
    bases = [p for p in points if p.direction == "base"]
    if len(bases) != 1:
        raise ValueError(f"compound_scaling needs exactly one base trial (phi: 0), got {len(bases)}")
    return {name: sorted(bases + [p for p in points if p.direction == name], key=lambda p: p.macs)
            for name in DIRECTIONS if any(p.direction == name for p in points)}


def interpolate(line: list[Point], macs: float) -> float | None:
    """The line's accuracy at ``macs``, linear in log multiply-adds between its neighbours; None outside it."""
    for left, right in zip(line, line[1:]):
        if left.macs <= macs <= right.macs:
            if right.macs == left.macs:
                return max(left.accuracy, right.accuracy)
            t = math.log(macs / left.macs) / math.log(right.macs / left.macs)
            return left.accuracy + t * (right.accuracy - left.accuracy)
    return None


def gains_per_doubling(line: list[Point]) -> list[float]:
    """Accuracy gained per doubling of multiply-adds, step by step along a line."""
    return [(b.accuracy - a.accuracy) / math.log2(b.macs / a.macs) for a, b in zip(line, line[1:]) if b.macs > a.macs]


def noise_margin(accuracy: float, images: int) -> float:
    """Two standard errors of the difference of two test accuracies near ``accuracy`` on ``images`` images each:
    differences smaller than this are test-set sampling noise (training-seed noise comes on top)."""
    return 2 * math.sqrt(2 * accuracy * (1 - accuracy) / images)


def measure(params: dict, trials: list[Trial]) -> Summary:
    base = params["base"]
    points = [measure_trial(trial, base) for trial in trials]
    by_direction = lines(points)
    start = by_direction[next(iter(by_direction))][0]  # the base: every line starts there
    margin = noise_margin(start.accuracy, int(start.trial.metrics["test/images"]))
    advantages = compound_advantages(by_direction)
    table = markdown_table(
        ["trial", "scales", "phi", "width", "depth", "resolution", "parameters", "multiply-adds", "x base", "test accuracy"],
        [[p.trial.key, p.direction, f"{p.phi:g}", f"{p.width:.3g}", f"{p.depth:.3g}", f"{p.resolution} px",
          f"{p.params:,}", human(p.macs), f"{p.macs / start.macs:.2f}", pct(p.accuracy)]
         for p in sorted(points, key=lambda p: (DIRECTIONS.index(p.direction) if p.direction in DIRECTIONS else -1, p.macs))])
    notes = [f"Margin: differences under {pct(margin)} (two standard errors of a difference of two test accuracies "
             f"near the base's, on {int(start.trial.metrics['test/images'])} images) count as no difference; one "
             "training seed per trial, so seed-to-seed noise is not in it.",
             "Matched multiply-adds: the compound line's accuracy interpolated (linear in log multiply-adds) at "
             "each single-dimension trial's cost, where the compound line reaches it; the advantage is that minus "
             "the trial's accuracy."]
    too_big = [p.trial.key for p in points if p.resolution > int(params["data"]["render_size"])]
    if too_big:
        notes.append(f"{', '.join(too_big)} train above data.render_size: their images are enlarged, not sharper.")
    return Summary("Scaling one dimension vs compound scaling", claims(by_direction, advantages, margin), table,
                   plot(by_direction, advantages, margin), metrics(points, start, advantages, margin), notes)


def compound_advantages(by_direction: dict[str, list[Point]]) -> dict[str, list[tuple[Point, float]]]:
    """For each single-dimension trial the compound line reaches: (trial, compound accuracy there - its own)."""
    curve = by_direction.get("compound", [])
    found = {}
    for name in DIMENSIONS:
        pairs = [(p, interpolate(curve, p.macs)) for p in by_direction.get(name, [])[1:]]
        found[name] = [(p, at - p.accuracy) for p, at in pairs if at is not None]
    return found


def claims(by_direction: dict[str, list[Point]], advantages: dict, margin: float) -> list[Claim]:
    singles = {name: by_direction[name] for name in DIMENSIONS if len(by_direction.get(name, [])) > 1}
    gains = {name: line[-1].accuracy - line[0].accuracy for name, line in singles.items()}
    improves = bool(gains) and all(g > margin for g in gains.values())
    scaling_helps = Claim(
        "Scaling up any one dimension (resolution r, depth d or width w) improves accuracy.",
        "; ".join(f"{name}: {pct(line[0].accuracy)} -> {pct(line[-1].accuracy)} at {line[-1].macs / line[0].macs:.1f}x "
                  f"the multiply-adds" for name, line in singles.items()),
        "confirmed" if improves else "refuted" if gains and all(g < -margin for g in gains.values())
        else "not reproduced at this budget")

    steps = {name: gains_per_doubling(line) for name, line in singles.items() if len(line) > 2}
    shrinking = {name: s[-1] < s[0] for name, s in steps.items()}
    diminishing = Claim(
        "The gain from scaling one dimension diminishes as the network grows.",
        ("accuracy gained per doubling of multiply-adds, first step -> last step: "
         + "; ".join(f"{name} {points(s[0], signed=True)} -> {points(s[-1], signed=True)}"
                     for name, s in steps.items())) if steps
        else "no direction has two steps beyond the base",
        "confirmed" if improves and steps and all(shrinking.values())
        else "refuted" if improves and steps and not any(shrinking.values()) else "not reproduced at this budget")

    mean_advantage = {name: sum(a for _, a in found) / len(found) for name, found in advantages.items() if found}
    better = bool(mean_advantage) and len(mean_advantage) == len(singles) and all(a > margin for a in mean_advantage.values())
    worse = any(a < -margin for a in mean_advantage.values())
    compound_wins = Claim(
        "Compound scaling (r, d and w together) gives a higher accuracy than one dimension for the same multiply-adds.",
        ("compound minus one dimension at matched multiply-adds, mean over its trials: "
         + "; ".join(f"{name} {points(a, signed=True)}" for name, a in mean_advantage.items())) if mean_advantage
        else "the compound line does not reach any single-dimension trial's multiply-adds",
        "confirmed" if better else "refuted" if worse else "not reproduced at this budget")
    return [scaling_helps, diminishing, compound_wins]


def metrics(points: list[Point], start: Point, advantages: dict, margin: float) -> dict[str, float]:
    values = {"margin": margin, "base_macs": float(start.macs)}
    for p in points:
        values[f"{p.trial.key}_acc"] = p.accuracy
        values[f"{p.trial.key}_macs_ratio"] = p.macs / start.macs
    for name, found in advantages.items():
        if found:
            values[f"compound_advantage_over_{name}"] = sum(a for _, a in found) / len(found)
    return values


def plot(by_direction: dict[str, list[Point]], advantages: dict, margin: float):
    fig, (curves, matched) = figure(2, width=5.2, height=4.0)
    for name, line in by_direction.items():
        macs = [p.macs / 1e6 for p in line]
        curves.plot(macs, [100 * p.accuracy for p in line], "o-", color=COLOURS[name], label=f"scale {name}"
                    if name != "compound" else "compound scaling", linewidth=2.5 if name == "compound" else 1.5)
        for p, x in zip(line[1:], macs[1:]):
            curves.annotate(f"{p.phi:g}", (x, 100 * p.accuracy), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=COLOURS[name])
    curves.set(xlabel="multiply-adds per image (millions)", ylabel="test accuracy (%)",
               title="accuracy vs multiply-adds (labels: phi)")
    names = [name for name in DIMENSIONS if advantages.get(name)]
    for i, name in enumerate(names):
        for j, (p, advantage) in enumerate(advantages[name]):
            matched.bar(i + 0.35 * (j - (len(advantages[name]) - 1) / 2), 100 * advantage, width=0.3,
                        color=COLOURS[name], alpha=0.5 + 0.5 * j / max(1, len(advantages[name]) - 1))
            matched.annotate(p.trial.key, (i + 0.35 * (j - (len(advantages[name]) - 1) / 2), 100 * advantage),
                             ha="center", va="bottom" if advantage >= 0 else "top", fontsize=7)
    matched.axhline(0, color="black", linewidth=0.8)
    matched.axhspan(-100 * margin, 100 * margin, color="grey", alpha=0.15, label="within the noise margin")
    matched.legend(fontsize=8)
    matched.set_xticks(range(len(names)), names)
    matched.set(ylabel="compound minus trial (accuracy points)",
                title="compound scaling at each trial's multiply-adds")
    curves.legend(fontsize=8)
    for axes in (curves, matched):
        axes.grid(alpha=0.3)
    return fig
