"""Ensembles and multi-crop evaluation (the course notes' "Tips" for benchmarks and competitions).

The notes: "Ensembling: train several networks independently and average their outputs" (typically
1-2% better) and "Multi-crop at test time: run the classifier on multiple versions of test images and
average results", both for benchmarks and competitions rather than production, since they cost N times
and views times the compute at inference. N members (different seeds, some different architectures)
are trained on each task and scored with each test-time view mode (src/evaluate.py); the first k are
averaged for k = 2..N (src/ensemble.py). One task draws every shape large and near the centre, as the
objects of photographs are, so that crops keep the object (multi-crop's fair chance); the other is the
default shapes, anywhere in the image.

A verdict compares paired accuracies on the same test images: the ensemble against each of its members,
or each member with views against itself without. The claim is confirmed where the mean difference is
more than twice its standard error above 0 (over the members), refuted where it is as far below.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis.cost import count_macs
from ..data.augment import tta_views
from ..errors import ConfigError
from ..evaluation.ensemble import ENSEMBLE
from ..evaluation.evaluate import PLAIN, load_checkpoint
from .summary import Claim, Summary, figure, markdown_table, points, prepared_data, pct

MODE_COLOURS = {"none": "tab:gray", "flip": "tab:blue", "five_crop": "tab:orange", "ten_crop": "tab:red"}
TASK_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:cyan")


@dataclass
class Member:
    """One member's settings (params.yaml) and what it costs per image and view at inference."""
    name: str
    settings: dict
    macs: int            # multiply-adds per image, one view
    seconds: float       # measured inference time per image, one view

    @property
    def label(self) -> str:
        """The architecture and seed: "resnet_small, width x0.5, depth x2, seed 2"."""
        scaled = [f"{what} x{self.settings[what]}" for what in ("width", "depth") if what in self.settings]
        return ", ".join([self.settings["model"], *scaled, f"seed {self.settings['seed']}"])


@dataclass
class Task:
    """One task's accuracies: each member's and each ensemble's (the first k members), per mode."""
    name: str
    description: str
    single: dict[str, list[float]]       # mode -> accuracy of each member, in members order
    ensemble: dict[str, dict[int, float]]  # mode -> k -> accuracy of the first k members' average

    def curve(self, mode: str) -> list[float]:
        """Accuracy of the first k members, k = 1..N (k = 1: the first member alone)."""
        return [self.single[mode][0]] + [self.ensemble[mode][k] for k in sorted(self.ensemble[mode])]


def measure(params: dict, trials: list, results_dir: str = "results", data_dir: str = "results/data",
            multicrop_mode: str = "ten_crop", descriptions: dict | None = None, timing_images: int = 256,
            timing_repeats: int = 3) -> Summary:
    tasks, modes = names(params["tasks"]), names(params["modes"])
    if PLAIN not in modes or multicrop_mode not in modes:
        raise ConfigError(f"ensemble_multicrop: modes must include {PLAIN} and {multicrop_mode}; got {modes}")
    member_names = list(params["members"])
    if len(member_names) < 2:
        raise ConfigError("ensemble_multicrop: an ensemble needs two members or more")
    results = Path(results_dir)
    images = timing_batch(data_dir, timing_images)
    members = [member_cost(name, params["members"][name], results / "trials" / name / tasks[0], images,
                           timing_repeats) for name in member_names]
    views = {mode: view_count(mode, images.shape[-1]) for mode in modes}
    found = [read_task(results, task, (descriptions or {}).get(task, task), modes, member_names)
             for task in tasks]
    claims = [ensembling_claim(found, len(members))] + [multicrop_claim(task, multicrop_mode, views) for task in found]
    notes = [
        f"Each task: {len(members)} members, each trained once and tested on the same images with each mode: "
        + ", ".join(f"{mode} ({views[mode]} view{'s' * (views[mode] > 1)})" for mode in modes)
        + ". The first k members' probabilities are averaged (src/ensemble.py) for k = 2.."
        + f"{len(members)}, for every mode.",
        "Inference cost per image: a member's multiply-adds for one view (counted) and its time on a batch of "
        f"{len(images)} test images on this machine (measured); an ensemble costs the sum of its members', a "
        "mode its number of views times that. The notes keep both tips for benchmarks and competitions, "
        "not production, for this cost.",
        f"A verdict: the mean paired difference in accuracy over the members, confirmed where it is more than "
        f"twice its standard error above 0, refuted where it is as far below 0 (multi-crop: {multicrop_mode}).",
    ]
    return Summary("Ensembles and multi-crop evaluation", claims, table(found, members, modes, views),
                   plot(found, members, modes, views), metrics(found, members, modes), notes)


def names(text: str) -> list[str]:
    """A Hydra sweep's comma-separated options, as the params give them (tasks, modes)."""
    return [name.strip() for name in str(text).split(",") if name.strip()]


# ---- reading what the stages wrote ------------------------------------------------------------------

def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"ensemble_multicrop: {path} is missing; run the study's stages first (dvc repro)")
    return json.loads(path.read_text())


def read_task(results: Path, task: str, description: str, modes: list[str], members: list[str]) -> Task:
    single = {mode: [read_json(results / "evaluate" / m / task / mode / "metrics.json")[mode]["acc"]
                     for m in members] for mode in modes}
    ensemble = {mode: {} for mode in modes}
    for folder in sorted((results / "ensemble").glob(f"*/{task}")):
        for mode in modes:
            scores = read_json(folder / mode / "metrics.json")
            averaged = [name for name in scores if name != ENSEMBLE]
            if averaged != members[:len(averaged)]:
                raise ConfigError(f"ensemble_multicrop: {folder.parent.name} averages {averaged}, not the first "
                                  f"{len(averaged)} members {members[:len(averaged)]}; fix ensembles: in params.yaml")
            ensemble[mode][len(averaged)] = scores[ENSEMBLE]["acc"]
    missing = sorted(set(range(2, len(members) + 1)) - set(ensemble[PLAIN]))
    if missing:
        raise ConfigError(f"ensemble_multicrop: no ensemble of the first {missing} members for {task}; "
                          "ensembles: in params.yaml lists one per k = 2..N")
    return Task(task, description, single, ensemble)


def timing_batch(data_dir: str, count: int) -> torch.Tensor:
    """Test images as the model takes them: uint8 (N, 3, H, W)."""
    test = prepared_data(data_dir).split("test")
    return torch.from_numpy(test.images[:count].copy()).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def member_cost(name: str, settings: dict, run_folder: Path, images: torch.Tensor, repeats: int) -> Member:
    module, _ = load_checkpoint(str(run_folder / "checkpoints" / "best.ckpt"))
    module.eval()
    macs = count_macs(module.net, (1, *images.shape[1:]))
    module(images)  # the first pass allocates; time the later ones
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        module(images)
        best = min(best, time.perf_counter() - start)
    return Member(name, settings, macs, best / len(images))


def view_count(mode: str, image_size: int) -> int:
    """Views per image of a conf/tta option, from the same function evaluate.py builds them with."""
    import yaml

    options = yaml.safe_load((Path(__file__).parents[3] / "conf" / "tta" / f"{mode}.yaml").read_text())
    return len(tta_views(image_size, **options))


# ---- claims ---------------------------------------------------------------------------------------------

def paired(differences: list[float]) -> tuple[float, float]:
    """Mean and standard error of paired differences (0 error for a single pair)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return mean, math.sqrt(variance / n)


def verdict(differences: list[float]) -> str:
    mean, error = paired(differences)
    if mean - 2 * error > 0:
        return "confirmed"
    if mean + 2 * error < 0:
        return "refuted"
    return "not reproduced at this budget"


def ensembling_claim(tasks: list[Task], size: int) -> Claim:
    parts, verdicts = [], []
    for task in tasks:
        members, ensemble = task.single[PLAIN], task.ensemble[PLAIN][size]
        differences = [ensemble - accuracy for accuracy in members]
        verdicts.append(verdict(differences))
        mean, error = paired(differences)
        parts.append(f"{task.description}: {pct(ensemble)} for the ensemble of {size}, {pct(sum(members) / len(members))} "
                     f"for a member on average ({points(mean, signed=True)} ± {points(error)}), "
                     f"{points(ensemble - max(members), signed=True)} over the best member")
    return Claim("Ensembling: train several networks independently and average their outputs (typically 1-2% better).",
                 "; ".join(parts) + " (test accuracy, plain views)", combined(verdicts))


def multicrop_claim(task: Task, mode: str, views: dict[str, int]) -> Claim:
    differences = [with_views - plain for with_views, plain in zip(task.single[mode], task.single[PLAIN])]
    mean, error = paired(differences)
    gains = sum(d > 0 for d in differences)
    others = {m: paired([a - b for a, b in zip(task.single[m], task.single[PLAIN])])[0]  # their mean gain
              for m in task.single if m not in (PLAIN, mode)}
    also = ", ".join(f"{m} {points(gain, signed=True)}" for m, gain in others.items())
    return Claim(
        f"Multi-crop at test time: run the classifier on several crops of each test image and average ({task.description}).",
        f"{mode} ({views[mode]} views) against the plain view: {points(mean, signed=True)} ± {points(error)} on "
        f"average over the members ({gains} of {len(differences)} gain){'; ' + also if also else ''}",
        verdict(differences))


def combined(verdicts: list[str]) -> str:
    """One verdict for a claim measured on several tasks: where they agree, theirs; otherwise not reproduced."""
    return verdicts[0] if len(set(verdicts)) == 1 else "not reproduced at this budget"


# ---- table, metrics, picture -----------------------------------------------------------------------------

def table(tasks: list[Task], members: list[Member], modes: list[str], views: dict[str, int]) -> str:
    header = ["", "members", "multiply-adds per image", "ms per image",
              *(f"{mode} (x{views[mode]})" for mode in modes)]
    sections = []
    for task in tasks:
        rows = [[m.name, m.label, f"{m.macs / 1e6:.2f} M", f"{1000 * m.seconds:.3f}",
                 *(pct(task.single[mode][i]) for mode in modes)] for i, m in enumerate(members)]
        rows.append(["mean", "of the members", f"{mean([m.macs for m in members]) / 1e6:.2f} M",
                     f"{1000 * mean([m.seconds for m in members]):.3f}",
                     *(pct(mean(task.single[mode])) for mode in modes)])
        for k in sorted(task.ensemble[PLAIN]):
            rows.append([f"first {k}", f"ensemble of {', '.join(m.name for m in members[:k])}",
                         f"{sum(m.macs for m in members[:k]) / 1e6:.2f} M",
                         f"{1000 * sum(m.seconds for m in members[:k]):.3f}",
                         *(pct(task.ensemble[mode][k]) for mode in modes)])
        sections.append(f"**{task.description}** (`{task.name}`): test accuracy per mode; a mode's cost is "
                        f"its views (x) times the plain cost.\n\n" + markdown_table(header, rows))
    return "\n".join(sections)


def metrics(tasks: list[Task], members: list[Member], modes: list[str]) -> dict[str, float]:
    values = {f"{m.name}_macs": float(m.macs) for m in members}
    for task in tasks:
        for mode in modes:
            values[f"{task.name}_{mode}_member_mean_acc"] = mean(task.single[mode])
            for k, accuracy in task.ensemble[mode].items():
                values[f"{task.name}_{mode}_first_{k}_acc"] = accuracy
    return values


def plot(tasks: list[Task], members: list[Member], modes: list[str], views: dict[str, int]):
    fig, (by_members, by_mode, by_cost) = figure(3, width=4.6)
    size = len(members)
    for t, task in enumerate(tasks):
        colour = TASK_COLOURS[t % len(TASK_COLOURS)]
        by_members.plot(range(1, size + 1), [100 * a for a in task.curve(PLAIN)], "o-", color=colour,
                        label=f"{task.name}: first k, {PLAIN}")
        last = modes[-1]
        if last != PLAIN:
            by_members.plot(range(1, size + 1), [100 * a for a in task.curve(last)], "s--", color=colour,
                            alpha=0.6, markersize=4, label=f"{task.name}: first k, {last}")
        by_members.scatter([1 + 0.06 * (t - 0.5)] * size, [100 * a for a in task.single[PLAIN]], color=colour,
                           marker="x", zorder=3, label=f"{task.name}: each member alone")

        width = 0.8 / len(tasks)
        offsets = [i + (t - (len(tasks) - 1) / 2) * width for i in range(len(modes))]
        averages = [100 * mean(task.single[mode]) for mode in modes]
        spread = [[a - 100 * min(task.single[m]) for a, m in zip(averages, modes)],
                  [100 * max(task.single[m]) - a for a, m in zip(averages, modes)]]
        by_mode.bar(offsets, averages, width, yerr=spread, color=colour, alpha=0.7, capsize=3,
                    label=f"{task.name}: members (mean, min-max)")
        by_mode.scatter(offsets, [100 * task.ensemble[m][size] for m in modes], color="black", marker="*",
                        zorder=3, label=f"ensemble of {size}" if t == 0 else None)

        plain = mean([m.macs for m in members])
        by_cost.plot([plain * views[m] / 1e6 for m in modes], averages, "o-", color=colour,
                     label=f"{task.name}: a member, views 1..{views[modes[-1]]}")
        ensemble_cost = [sum(m.macs for m in members[:k]) / 1e6 for k in range(1, size + 1)]
        by_cost.plot(ensemble_cost, [100 * a for a in task.curve(PLAIN)], "s--", color=colour,
                     label=f"{task.name}: first k members, {PLAIN}")
    by_members.set(xlabel="members averaged (k)", ylabel="test accuracy (%)", title="ensembles of the first k members")
    by_members.set_xticks(range(1, size + 1))
    by_mode.set_xticks(range(len(modes)), [f"{m}\nx{views[m]}" for m in modes])
    by_mode.set(ylabel="test accuracy (%)", title="test-time views (x: inference cost)")
    low = min(100 * min(min(task.single[m]) for m in modes) for task in tasks)
    by_mode.set_ylim(max(0, low - 10), 100)
    by_cost.set_xscale("log")
    by_cost.set(xlabel="multiply-adds per test image (M, log)", ylabel="test accuracy (%)",
                title="accuracy against inference cost")
    for axes in (by_members, by_mode, by_cost):
        axes.legend(fontsize=6)
        axes.grid(alpha=0.3)
    return fig


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
