"""Data augmentation, one distortion at a time and as policies, against training on the images as they are.

The notes: "Data augmentation improves performance of cv systems", with six distortions: mirroring,
random cropping, rotation, shearing, local warping and colour shifting. Every trial trains the same
net on the same small training set; what differs is ``augment``: nothing (``none``), one distortion
alone (a policy of conf/augment/ with its other distortions switched off), or a whole policy
(``light``, ``standard``, ``heavy``). A trial's key names what it trained with; ``<name>_s<seed>``
is the same training with another seed.

An effect must be larger than seed noise to count: the noise is the spread (highest minus lowest test
accuracy) of the ``none`` trials over their seeds, and never less than ``min_effect``. A trial group
(its seeds together) helps when its mean test accuracy beats ``none``'s mean by more than the noise,
hurts when it falls below by more, and is within the noise otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import mean

from .summary import Claim, Summary, Trial, figure, markdown_table, pct, points

POLICIES = ("light", "standard", "heavy")
SEED_SUFFIX = re.compile(r"_s\d+$")


@dataclass
class Group:
    """The trials of one augmentation setting (``none``, a distortion or a policy), one per seed."""
    name: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def accuracies(self) -> list[float]:
        return [float(t.metrics["test/acc"]) for t in self.trials]

    @property
    def accuracy(self) -> float:
        return mean(self.accuracies)

    @property
    def spread(self) -> float:
        return max(self.accuracies) - min(self.accuracies)

    @property
    def is_policy(self) -> bool:
        return self.name in POLICIES


def group_name(trial: Trial) -> str:
    """What a trial trained with: its key without the seed suffix (``none_s1`` -> ``none``)."""
    return SEED_SUFFIX.sub("", trial.key)


def grouped(trials: list[Trial]) -> dict[str, Group]:
    groups: dict[str, Group] = {}
    for trial in trials:
        name = group_name(trial)
        groups.setdefault(name, Group(name)).trials.append(trial)
    return groups


def noise(baseline: Group, min_effect: float) -> float:
    """The smallest difference from ``none`` that counts: the baseline's seed spread, at least ``min_effect``."""
    return max(baseline.spread, min_effect)


def effect(group: Group, baseline: Group, threshold: float) -> str:
    difference = group.accuracy - baseline.accuracy
    return "helps" if difference > threshold else "hurts" if difference < -threshold else "within noise"


def measure(params: dict, trials: list[Trial], distortions: Mapping[str, list[str]],
            min_effect: float = 0.01) -> Summary:
    """``distortions``: each distortion of the notes, and the trial groups (conf/augment entries) that are it."""
    groups = grouped(trials)
    if "none" not in groups:
        raise ValueError("augmentation needs a trial without augmentation (key 'none')")
    baseline = groups.pop("none")
    threshold = noise(baseline, min_effect)
    effects = {name: effect(group, baseline, threshold) for name, group in groups.items()}

    claims = [overall_claim(groups, baseline, effects)] if any(g.is_policy for g in groups.values()) else []
    claims += [distortion_claim(notes_name, [groups[n] for n in names if n in groups], baseline, effects)
               for notes_name, names in distortions.items() if any(n in groups for n in names)]
    notes = [f"{len(baseline.trials)} seed(s) without augmentation: test accuracy "
             f"{', '.join(pct(a) for a in baseline.accuracies)}; a difference counts when larger than "
             f"{points(threshold)} (their spread, at least {points(min_effect)}).",
             overfitting(baseline),
             "Train accuracy is the last epoch's, on the training images as the training saw them (distorted); "
             "best val is the highest validation accuracy over the epochs (the checkpoint tested)."]
    return Summary("Data augmentation, one distortion at a time", claims,
                   table(baseline, groups, effects), plot(baseline, groups, threshold),
                   metrics(baseline, groups, threshold), notes)


def overfitting(baseline: Group) -> str:
    """Whether the setting is one where augmentation can pay: without it, the net fits its images better than new ones."""
    train = mean(float(t.last_epoch.get("train_acc", "nan")) for t in baseline.trials)
    return (f"Without augmentation the net ends at {pct(train)} training accuracy and {pct(baseline.accuracy)} test "
            f"accuracy: a gap of {points(train - baseline.accuracy)}, what augmentation is meant to close.")


def overall_claim(groups: dict[str, Group], baseline: Group, effects: dict[str, str]) -> Claim:
    """The notes' claim, judged on the policies (several distortions together, as augmentation is used)."""
    policies = [g for g in groups.values() if g.is_policy]
    helped = [g.name for g in policies if effects[g.name] == "helps"]
    hurt = [g.name for g in policies if effects[g.name] == "hurts"]
    verdict = ("confirmed" if len(helped) > len(policies) / 2 and not hurt else
               "refuted" if len(hurt) > len(policies) / 2 and not helped else "not reproduced at this budget")
    return Claim("Data augmentation improves the performance of computer vision systems.",
                 f"test accuracy without augmentation {pct(baseline.accuracy)}; "
                 + ", ".join(f"{g.name} {pct(g.accuracy)} ({versus(baseline, g)})" for g in policies)
                 + f": {len(helped)} of {len(policies)} policies help, {len(hurt)} hurt",
                 verdict)


def distortion_claim(notes_name: str, groups: list[Group], baseline: Group, effects: dict[str, str]) -> Claim:
    """One distortion of the notes: confirmed when it helps, refuted when it hurts, beyond the seed noise."""
    found = {effects[g.name] for g in groups}
    verdict = ("confirmed" if "helps" in found and "hurts" not in found else
               "refuted" if "hurts" in found and "helps" not in found else "not reproduced at this budget")
    return Claim(f"{notes_name.capitalize()} is a distortion that improves performance.",
                 "; ".join(f"{g.name} alone {pct(g.accuracy)} vs none {pct(baseline.accuracy)} "
                           f"({versus(baseline, g)}, {effects[g.name]})" for g in groups),
                 verdict)


def table(baseline: Group, groups: dict[str, Group], effects: dict[str, str]) -> str:
    rows = [row(baseline, baseline, "baseline")]
    rows += [row(group, baseline, effects[name]) for name, group in groups.items()]
    return markdown_table(["augment", "seeds", "test accuracy (± half the seed spread)", "vs none", "train accuracy",
                           "best val", "effect"], rows)


def row(group: Group, baseline: Group, effect_name: str) -> list:
    accuracy = pct(group.accuracy) + (f" ± {points(group.spread / 2)}" if len(group.trials) > 1 else "")
    train = mean(float(t.last_epoch.get("train_acc", "nan")) for t in group.trials)
    best_val = mean(max(t.column("val_acc"), default=float("nan")) for t in group.trials)
    return [group.name, len(group.trials), accuracy, versus(baseline, group) if group is not baseline else "",
            pct(train), pct(best_val), effect_name]


def versus(baseline: Group, group: Group) -> str:
    """What the group's augmentation gains (or loses) in test accuracy over none."""
    return points(group.accuracy - baseline.accuracy, signed=True)


def metrics(baseline: Group, groups: dict[str, Group], threshold: float) -> dict[str, float]:
    values = {"none_test_acc": baseline.accuracy, "none_seed_spread": baseline.spread, "noise_threshold": threshold}
    for name, group in groups.items():
        values[f"{name}_test_acc"] = group.accuracy
        values[f"{name}_vs_none"] = group.accuracy - baseline.accuracy
    return values


def plot(baseline: Group, groups: dict[str, Group], threshold: float):
    fig, (bars, curves) = figure(2, width=5.4)
    names = list(groups)
    colours = ["tab:purple" if groups[n].is_policy else "tab:blue" for n in names]
    bars.bar(range(len(names)), [100 * groups[n].accuracy for n in names], color=colours, alpha=0.8)
    for i, name in enumerate(names):  # every seed's result as a dot on its bar
        accuracies = groups[name].accuracies
        bars.plot([i] * len(accuracies), [100 * a for a in accuracies], "k.", markersize=4)
    level = 100 * baseline.accuracy
    bars.axhline(level, color="black", label=f"none ({len(baseline.trials)} seed(s))")
    bars.axhspan(level - 100 * threshold, level + 100 * threshold, color="grey", alpha=0.2, label="seed noise")
    bars.set_xticks(range(len(names)), names, rotation=40, ha="right")
    low = min([level - 100 * threshold] + [100 * a for g in groups.values() for a in g.accuracies])
    bars.set(ylabel="test accuracy (%)", title="one distortion (blue) or a policy (purple) vs none",
             ylim=(max(0, low - 5), None))

    for group, style in [(baseline, "k-")] + [(groups[n], "-" if groups[n].is_policy else ":") for n in names]:
        values = [100 * v for v in group.trials[0].column("val_acc")]
        curves.plot(range(1, len(values) + 1), values, style, label=group.name, linewidth=1.2)
    curves.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy per epoch (first seed)")
    for axes in (bars, curves):
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    return fig
