"""Plain nets against residual nets of the same depth and width (He et al. 2015, figure 1 and 6).

The notes: deeper plain nets train worse ("in reality, the training error gets worse" as layers are
added), skip connections fix that, and "the identity function is easy for a residual block to
learn". Each trial is a resnet_small-shaped net at some depth (``model.depth_mult`` repeats its blocks)
with or without skips. Training error is the last epoch's error on the training images as the
training saw them; closeness to the identity is measured after training, block by block, on
validation images: ``||block(x) - x|| / ||x||`` for every block whose input and output have one shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ..evaluation.evaluate import load_checkpoint
from ..models.blocks import ResidualBlock
from .summary import Claim, Summary, Trial, figure, markdown_table, prepared_data, pct


def weight_layers(net: nn.Module) -> int:
    """Convolutions and fully connected layers on the main path (the paper's depth: 1x1 shortcuts not counted)."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for name, m in net.named_modules() if "shortcut" not in name)


@torch.no_grad()
def block_changes(module, images: torch.Tensor) -> list[float]:
    """For each block that keeps its input's shape, ``||out - in|| / ||in||`` averaged over ``images``."""
    changes, hooks = [], []

    def record(block, inputs, output):
        x = inputs[0]
        if x.shape == output.shape:
            change = (output - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            changes.append(change.mean().item())

    blocks = [m for m in module.net.modules() if isinstance(m, ResidualBlock)]
    hooks = [block.register_forward_hook(record) for block in blocks]
    try:
        module.eval()
        module(images)
    finally:
        for hook in hooks:
            hook.remove()
    return changes


def measure(params: dict, trials: list[Trial], data_dir: str = "results/data", probe_images: int = 256) -> Summary:
    cache = prepared_data(data_dir)
    val = cache.split("val")
    images = torch.from_numpy(val.images[:probe_images].copy()).permute(0, 3, 1, 2).contiguous()

    rows = []
    for trial in trials:
        module, _ = load_checkpoint(str(trial.folder / "checkpoints" / "last.ckpt"))
        changes = block_changes(module, images)
        rows.append({
            "trial": trial, "residual": bool(trial.params["residual"]), "layers": weight_layers(module.net),
            "params": sum(p.numel() for p in module.net.parameters()),
            "train_error": 1 - float(trial.last_epoch["train_acc"]),
            "test_error": 1 - float(trial.metrics["test/acc"]),
            "change": sum(changes) / len(changes) if changes else float("nan"), "changes": changes,
        })
    rows.sort(key=lambda r: (r["layers"], r["residual"]))
    plain = {r["layers"]: r for r in rows if not r["residual"]}
    residual = {r["layers"]: r for r in rows if r["residual"]}
    depths = sorted(set(plain) & set(residual))
    if not depths:
        raise ValueError("residual_vs_plain needs a plain and a residual trial of the same depth")
    deepest = depths[-1]

    table = markdown_table(
        ["trial", "skips", "weight layers", "parameters", "training error", "test error", "block change"],
        [[r["trial"].key, "yes" if r["residual"] else "no", r["layers"], f"{r['params']:,}",
          f"{100 * r['train_error']:.1f}%", f"{100 * r['test_error']:.1f}%", f"{r['change']:.3f}"] for r in rows])
    notes = ["Training error: the last epoch's error on the training images, as the training saw them. "
             "Block change: how far a block moves its input, ‖block(x) − x‖ / ‖x‖, averaged over the blocks whose "
             f"output has their input's shape, on {len(images)} validation images after training (0: the identity)."]
    return Summary("Residual vs plain networks", claims(plain, residual, depths), table,
                   plot(rows, plain, residual, deepest), metrics(plain, residual, depths), notes)


def claims(plain: dict, residual: dict, depths: list[int]) -> list[Claim]:
    shallow, deep = depths[0], depths[-1]
    gaps = [plain[d]["train_error"] - residual[d]["train_error"] for d in depths]
    deep_half = gaps[len(gaps) // 2:]  # the claim is about deep nets: shallow ones need no skips
    skips_help = all(gap > 0 for gap in deep_half) and gaps[-1] > 0.01
    skips = Claim(
        "Skip connections reduce the training error of deep networks.",
        f"training error at {deep} layers: plain {pct(plain[deep]['train_error'])}, residual "
        f"{pct(residual[deep]['train_error'])}; residual lower at {', '.join(str(d) for d, g in zip(depths, gaps) if g > 0) or 'no'} "
        f"of {', '.join(map(str, depths))} layers",
        "confirmed" if skips_help else "refuted" if gaps[-1] < -0.01 else "not reproduced at this budget")

    best_plain = min(depths, key=lambda d: plain[d]["train_error"])
    degrades = plain[deep]["train_error"] > plain[best_plain]["train_error"] + 0.01
    degradation = Claim(
        "A plain network trains worse as it gets deeper, though in theory more layers can only help.",
        f"plain training error {pct(plain[shallow]['train_error'])} at {shallow} layers, lowest "
        f"{pct(plain[best_plain]['train_error'])} at {best_plain}, {pct(plain[deep]['train_error'])} at {deep}",
        "confirmed" if degrades else "not reproduced at this budget")

    # Judged where the claim matters, as the others: in the deepest nets, whose extra blocks have the
    # most reason to be (near) identities. The trend over depth is in the sentence.
    moves = {name: ", ".join(f"{runs[d]['change']:.2f}" for d in depths) for name, runs in
             (("residual", residual), ("plain", plain))}
    identity = Claim(
        "The identity function is easy for a residual block to learn.",
        f"after training, a block moves its input by ‖block(x) − x‖ / ‖x‖ = {moves['residual']} (residual) "
        f"and {moves['plain']} (plain) at {', '.join(map(str, depths))} layers",
        "confirmed" if residual[deep]["change"] < 0.5 * plain[deep]["change"] else "not reproduced at this budget")
    return [skips, degradation, identity]


def metrics(plain: dict, residual: dict, depths: list[int]) -> dict[str, float]:
    values = {}
    for name, runs in (("plain", plain), ("residual", residual)):
        for d in depths:
            values[f"{name}_{d}_train_error"] = runs[d]["train_error"]
            values[f"{name}_{d}_block_change"] = runs[d]["change"]
    return values


def plot(rows: list[dict], plain: dict, residual: dict, deepest: int):
    fig, (by_depth, curves, changes) = figure(3)
    for name, runs, colour in (("plain", plain, "tab:red"), ("residual", residual, "tab:blue")):
        layers = sorted(runs)
        by_depth.plot(layers, [100 * runs[d]["train_error"] for d in layers], "o-", color=colour, label=name)
        for d in layers:
            error = [100 * (1 - a) for a in runs[d]["trial"].column("train_acc")]
            shade = 0.35 + 0.65 * layers.index(d) / max(1, len(layers) - 1)
            curves.plot(range(1, len(error) + 1), error, color=colour, alpha=shade,
                        label=f"{name}-{d}", linestyle="-" if name == "residual" else "--")
        change = runs[deepest]["changes"]
        changes.plot(range(1, len(change) + 1), change, "o-", color=colour, markersize=3, label=f"{name}-{deepest}")
    by_depth.set(xlabel="weight layers", ylabel="training error (%)", title="training error at the end")
    curves.set(xlabel="epoch", ylabel="training error (%)", title="training error per epoch")
    # the depth is in the legend: in the title too, the title overran the figure's edge
    changes.set(xlabel="block (same-shape blocks, input to output)", ylabel="||block(x) - x|| / ||x||",
                title="how far each block moves its input")
    for axes in (by_depth, curves, changes):
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    return fig
