"""Inception modules with and without their 1x1 bottleneck reductions (GoogLeNet, Szegedy et al. 2014).

The notes: "the problem of computational cost can be reduced significantly by performing 1x1
convolution before 3x3 or 5x5. This creates a bottleneck layer." The course's example: a 28x28x192
input through 32 5x5 filters costs 28·28·32 · 5·5·192 = 120M multiplies, against 12.4M when a 1x1
conv first reduces it to 16 channels. Three levels, each with ``reduce`` on and off
(``cnnlab.models.blocks.Inception``): that example (inception 3a's 5x5 branch of the zoo's model),
every inception module of the model at full width and 224 px (multiply-adds, parameters, CPU time),
and the whole model trained on the shapes (the trials: multiply-adds, parameters, CPU time per image,
test accuracy). Multiply-adds are the cost analyser's counts; times are measured here on the CPU.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from ..analysis.cost import count_macs, stage_costs, total_row
from ..evaluation.evaluate import load_checkpoint
from ..models import zoo
from ..models.blocks import Inception
from ..models.net import count_parameters
from .separable_cost import about_ten
from .timing import forward, spread, timed_samples
from .summary import Claim, Summary, Trial, figure, markdown_table, points, prepared_data, pct, significant

GOOGLENET_NAMES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")   # the paper's names, in order
SIGNIFICANT = 1.5   # "significantly": at least 1.5x (a third) less cost
WITH, WITHOUT = "with 1x1", "without"


def model_config(model: str, reduce: bool, width: float = 1.0):
    """The zoo's model config with or without the reductions, composed as train.py composes it."""
    return zoo.model_config(model, width_mult=width, block_defaults={"inception": {"reduce": reduce}})


def inception_inputs(net: nn.Module, resolution: int) -> list[tuple[Inception, tuple[int, ...]]]:
    """Every inception module of ``net`` and the shape of its input for one image, from one pass."""
    found = []
    hooks = [m.register_forward_pre_hook(lambda module, inputs: found.append((module, tuple(inputs[0].shape))))
             for m in net.modules() if isinstance(m, Inception)]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, resolution, resolution, device=next(net.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def module_pairs(model: str, resolution: int) -> list[dict]:
    """The model's inception modules at full width, with (``reduce=True``) and without the reductions, each
    with its input shape, multiply-adds and parameters."""
    from hydra.utils import instantiate

    nets = {flag: instantiate(model_config(model, flag), num_classes=1000) for flag in (True, False)}
    reduced, unreduced = (inception_inputs(nets[flag], resolution) for flag in (True, False))
    names = GOOGLENET_NAMES if len(reduced) == len(GOOGLENET_NAMES) else [str(i) for i in range(1, len(reduced) + 1)]
    return [{"name": name, "shape": shape, "modules": {WITH: with_1x1, WITHOUT: without},
             "macs": {WITH: count_macs(with_1x1, shape), WITHOUT: count_macs(without, shape)},
             "params": {WITH: count_parameters(with_1x1), WITHOUT: count_parameters(without)}}
            for name, (with_1x1, shape), (without, _) in zip(names, reduced, unreduced)]


def notes_example(first: dict) -> dict:
    """The notes' example: the 5x5 branch of the first module (inception 3a: 28x28x192 in, 16 reduced, 32 out)."""
    branches = {kind: module.branches[2] for kind, module in first["modules"].items()}
    kernel = branches[WITHOUT][0].kernel_size[0]
    return {"name": f"{kernel}x{kernel} branch of {first['name']}", "shape": first["shape"], "modules": branches,
            "macs": {kind: count_macs(b, first["shape"]) for kind, b in branches.items()},
            "params": {kind: count_parameters(b) for kind, b in branches.items()}}


def notes_arithmetic(example: dict) -> dict[str, int]:
    """The notes' own arithmetic for the example, from its layers' sizes: output positions x filters x f·f·n_c."""
    _, channels, height, width = example["shape"]
    big = example["modules"][WITHOUT][0]
    reduce_1x1, conv = (block[0] for block in example["modules"][WITH])
    positions = height * width
    return {WITHOUT: positions * big.out_channels * big.kernel_size[0] ** 2 * channels,
            "1x1": positions * reduce_1x1.out_channels * channels,
            "kxk": positions * conv.out_channels * conv.kernel_size[0] ** 2 * reduce_1x1.out_channels}


def time_pairs(rows: list[dict], batch: int, repeats: int, min_block_s: float) -> None:
    """Each row's CPU time per image with and without the reductions (interleaved medians), into ``row['seconds']``."""
    for row in rows:
        x = torch.randn(batch, *row["shape"][1:])
        modules = {kind: module.eval() for kind, module in row["modules"].items()}
        with torch.inference_mode():
            samples = timed_samples({kind: forward(m, x) for kind, m in modules.items()}, repeats, min_block_s)
        row["seconds"] = {kind: statistics.median(s) / batch for kind, s in samples.items()}
        row["spread"] = max(spread(s) for s in samples.values())


def trained_size(trial: Trial, data_dir: str) -> int:
    """The resolution a trial trained at: its run's ``data.image_size``, else the prepared images' own size."""
    if trial.run is not None and "data.image_size" in trial.run.data.params:
        return int(trial.run.data.params["data.image_size"])
    return int(prepared_data(data_dir).split("test").images.shape[1])


def trained_pairs(trials: list[Trial], data_dir: str) -> list[dict]:
    """The trained networks: cost at the trained resolution and what the trainings measured."""
    rows = []
    for trial in trials:
        module, _ = load_checkpoint(str(trial.folder / "checkpoints" / "last.ckpt"))
        net = module.net.eval()
        image_size = trained_size(trial, data_dir)
        total = total_row(stage_costs(net, image_size))
        kind = WITH if trial.params["reduce"] else WITHOUT
        run = trial.run.info if trial.run is not None else None
        rows.append({"name": trial.key, "kind": kind, "trial": trial, "shape": (1, 3, image_size, image_size),
                     "modules": {kind: net}, "macs": {kind: total.macs}, "params": {kind: total.params},
                     "accuracy": float(trial.metrics["test/acc"]), "images": int(trial.metrics["test/images"]),
                     "classes": net.head.fc.out_features,
                     "minutes": (run.end_time - run.start_time) / 60_000 if run and run.end_time else None})
    return rows


def network_pair(rows: list[dict]) -> dict:
    """The two trained networks as one row of a with/without comparison."""
    kinds = {r["kind"]: r for r in rows}
    if set(kinds) != {WITH, WITHOUT}:
        raise ValueError("inception_bottleneck needs one trial with reduce: true and one with reduce: false")
    return {"name": "trained network", "shape": kinds[WITH]["shape"],
            "modules": {k: r["modules"][k] for k, r in kinds.items()},
            "macs": {k: r["macs"][k] for k, r in kinds.items()},
            "params": {k: r["params"][k] for k, r in kinds.items()}}


# The study ---------------------------------------------------------------------------------------

def measure(params: dict, trials: list[Trial], data_dir: str = "results/data") -> Summary:
    timing, modules = params["timing"], params["modules"]
    if timing.get("threads"):
        torch.set_num_threads(int(timing["threads"]))
    batch, repeats, block = int(timing["batch"]), int(timing["repeats"]), float(timing["min_block_s"])
    torch.manual_seed(0)

    pairs = module_pairs(modules["model"], int(modules["resolution"]))
    example = notes_example(pairs[0])
    trained = trained_pairs(trials, data_dir)
    network = network_pair(trained)
    time_pairs([example, *pairs, network], batch, repeats, block)

    notes = [f"The notes' example and the modules: {modules['model']} at full width and {modules['resolution']} px, "
             f"as the paper; the trained networks: {params['model']} at width {params['width']}, "
             f"{network['shape'][-1]} px, {params['epochs']} epochs, seed {params['seed']}, the same data for both "
             f"({params['data']}).",
             f"Times: CPU time per image at batch {batch}, the median of {repeats} interleaved timed blocks of at least "
             f"{block * 1000:.0f} ms after warm-up, {torch.get_num_threads()} torch threads, inference mode. The "
             f"middle half of the blocks lay within {100 * statistics.median(r['spread'] for r in pairs):.0f}% of their "
             "median (the median over modules): other processes on the CPU make times noisy, counts are exact.",
             accuracy_note(trained)]
    return Summary("Inception modules with and without 1x1 bottlenecks", claims(example, pairs, network, trained),
                   tables(example, pairs, network, trained), plot(example, pairs, network, trained),
                   metrics(example, pairs, network, trained), notes)


def saving(row: dict, key: str) -> float:
    return row[key][WITHOUT] / row[key][WITH]


def claims(example: dict, pairs: list[dict], network: dict, trained: list[dict]) -> list[Claim]:
    arithmetic = notes_arithmetic(example)
    counted = example["macs"]
    exact = counted[WITHOUT] == arithmetic[WITHOUT] and counted[WITH] == arithmetic["1x1"] + arithmetic["kxk"]
    _, channels, size, _ = example["shape"]
    conv = example["modules"][WITH][1][0]
    example_claim = Claim(
        "A 1x1 bottleneck cuts the cost of a 5x5 conv about 10x (28x28x192 in, 32 filters: 120M multiplies; "
        "12.4M through a 1x1 reduction to 16 channels).",
        f"counted on a {size}x{size}x{channels} input, {conv.out_channels} filters {conv.kernel_size[0]}x"
        f"{conv.kernel_size[0]}: {millions(counted[WITHOUT])} without, {millions(arithmetic['1x1'])} + "
        f"{millions(arithmetic['kxk'])} = {millions(counted[WITH])} through a 1x1 to {conv.in_channels} channels "
        f"({saving(example, 'macs'):.1f}x fewer"
        f"{', as the notes compute' if exact else ', NOT the notes arithmetic'}); CPU time "
        f"{saving(example, 'seconds'):.1f}x less",
        "confirmed" if exact and about_ten(saving(example, "macs")) else "refuted")

    # Multiplies and time judged apart, as separable_cost does: the notes' cost is multiplies; what a CPU
    # makes of them is a second question with its own answer.
    module_savings = [saving(p, "macs") for p in pairs]
    network_claim = Claim(
        "The 1x1 bottlenecks cut the computational cost (multiplies) significantly, in whole modules and networks.",
        f"inception modules {min(module_savings):.1f}x to {max(module_savings):.1f}x fewer multiply-adds; the "
        f"trained network {saving(network, 'macs'):.1f}x fewer multiply-adds, {saving(network, 'params'):.1f}x "
        "fewer parameters",
        "confirmed" if saving(network, "macs") >= SIGNIFICANT else "refuted")
    time_claim = Claim(
        "The 1x1 bottlenecks cut the computational cost significantly (CPU time).",
        f"inception modules {min(saving(p, 'seconds') for p in pairs):.1f}x to "
        f"{max(saving(p, 'seconds') for p in pairs):.1f}x less CPU time; the trained network "
        f"{saving(network, 'seconds'):.1f}x less per image",
        "confirmed" if saving(network, "seconds") >= SIGNIFICANT else "refuted")

    kinds = {r["kind"]: r for r in trained}
    gap, error = accuracy_gap(kinds[WITH], kinds[WITHOUT])
    learned = kinds[WITHOUT]["accuracy"] > chance(kinds[WITHOUT]) + 3 * binomial_error(kinds[WITHOUT])
    accuracy_claim = Claim(
        "The bottlenecks make the network cheaper without costing accuracy (the Inception design).",
        f"test accuracy {pct(kinds[WITH]['accuracy'])} with the 1x1 reductions, {pct(kinds[WITHOUT]['accuracy'])} "
        f"without (difference {points(gap, signed=True)}, ± {100 * 2 * error:.1f} at two standard errors)",
        "not reproduced at this budget" if not learned else "confirmed" if gap > -2 * error else "refuted")
    return [example_claim, network_claim, time_claim, accuracy_claim]


def binomial_error(row: dict) -> float:
    """The standard error of a test accuracy measured on ``images`` images."""
    p = row["accuracy"]
    return math.sqrt(max(p * (1 - p), 1e-12) / row["images"])


def accuracy_gap(with_1x1: dict, without: dict) -> tuple[float, float]:
    """Accuracy with minus without the reductions, and the standard error of that difference."""
    return (with_1x1["accuracy"] - without["accuracy"],
            math.sqrt(binomial_error(with_1x1) ** 2 + binomial_error(without) ** 2))


def chance(row: dict) -> float:
    return 1 / row["classes"]


def accuracy_note(trained: list[dict]) -> str:
    images = trained[0]["images"]
    return (f"Test accuracy on {images:,} images: one training each, so its noise is at least the binomial "
            f"standard error, ±{points(max(binomial_error(r) for r in trained))} here; a difference "
            "within two standard errors is no difference.")


def tables(example: dict, pairs: list[dict], network: dict, trained: list[dict]) -> str:
    header = ["", "input (HxWxC)", "multiply-adds: without", "with 1x1", "saving", "parameters: without",
              "with 1x1", "ms/image: without", "with 1x1", "time saving"]
    rows = [[f"**{example['name']}** (the notes' example)", *cost_cells(example)]]
    rows += [[f"inception {p['name']}", *cost_cells(p)] for p in pairs]
    rows.append([f"**{network['name']}**", *cost_cells(network)])
    costs = markdown_table(header, rows)
    runs = markdown_table(
        ["trial", "1x1 reductions", "parameters", "multiply-adds", "test accuracy", "training run (min)"],
        [[r["name"], "yes" if r["kind"] == WITH else "no", f"{r['params'][r['kind']]:,}",
          millions(r["macs"][r["kind"]]), pct(r["accuracy"]),
          f"{r['minutes']:.1f}" if r["minutes"] is not None else ""] for r in trained])
    return costs + "\n" + runs


def cost_cells(row: dict) -> list[str]:
    _, channels, height, width = row["shape"]
    return [f"{height}x{width}x{channels}", millions(row["macs"][WITHOUT]), millions(row["macs"][WITH]),
            f"{saving(row, 'macs'):.1f}x", f"{row['params'][WITHOUT]:,}", f"{row['params'][WITH]:,}",
            significant(1000 * row["seconds"][WITHOUT], 3), significant(1000 * row["seconds"][WITH], 3),
            f"{saving(row, 'seconds'):.1f}x"]


def metrics(example: dict, pairs: list[dict], network: dict, trained: list[dict]) -> dict[str, float]:
    values = {"example_macs_without": example["macs"][WITHOUT], "example_macs_with": example["macs"][WITH],
              "example_time_saving": saving(example, "seconds"),
              "network_mac_saving": saving(network, "macs"), "network_time_saving": saving(network, "seconds"),
              "network_param_saving": saving(network, "params")}
    for p in pairs:
        values[f"module_{p['name']}_mac_saving"] = saving(p, "macs")
    for r in trained:
        values[f"{r['name']}_test_acc"] = r["accuracy"]
    return values


COLOURS = {WITH: "tab:blue", WITHOUT: "tab:red"}


def plot(example: dict, pairs: list[dict], network: dict, trained: list[dict]):
    fig, (by_module, savings, curves) = figure(3)
    rows = [example, *pairs]
    names = ["3a 5x5\n(notes)", *(p["name"] for p in pairs)]
    for offset, kind in ((-0.2, WITHOUT), (0.2, WITH)):
        by_module.bar([i + offset for i in range(len(rows))], [r["macs"][kind] / 1e6 for r in rows], 0.4,
                      color=COLOURS[kind], label=kind if kind == WITH else "without 1x1")
    by_module.set_xticks(range(len(rows)), names, fontsize=7)
    _, channels, height, width = pairs[0]["shape"]
    by_module.set(ylabel="multiply-adds per image (M)",
                  title=f"inception modules at full width ({pairs[0]['name']} sees {height}x{width}x{channels})")

    compared = [("notes' example", example), ("module 3a" if pairs[0]["name"] == "3a" else "first module", pairs[0]),
                ("trained network", network)]
    for offset, (key, label) in zip((-0.27, 0, 0.27), (("macs", "multiply-adds"), ("params", "parameters"),
                                                        ("seconds", "CPU time"))):
        savings.bar([i + offset for i in range(len(compared))], [saving(row, key) for _, row in compared], 0.27,
                    label=label)
    savings.axhline(1, color="grey", linewidth=0.8)
    savings.set_xticks(range(len(compared)), [name for name, _ in compared], fontsize=8)
    savings.set(ylabel="without / with the 1x1 reductions", title="what the 1x1 reductions save")

    for r in trained:
        accuracy = [100 * a for a in r["trial"].column("val_acc")]
        curves.plot(range(1, len(accuracy) + 1), accuracy, "o-", color=COLOURS[r["kind"]], markersize=3,
                    label=f"{r['name']} (test {pct(r['accuracy'])})")
    curves.set(xlabel="epoch", ylabel="validation accuracy (%)", title="the trained networks")
    for axes in (by_module, savings, curves):
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    return fig


def millions(value: int) -> str:
    return f"{value / 1e6:.1f}M" if value >= 1e5 else f"{value:,}"
