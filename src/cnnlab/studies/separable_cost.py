"""Normal against depthwise-separable convolutions: multiplies and CPU time (MobileNet, Howard et al. 2017).

The notes: a depthwise-separable convolution (an f x f depthwise conv, one filter per input channel,
then a 1x1 pointwise conv) costs ``1/n_c + 1/f^2`` of a normal f x f convolution, n_c being the number
of filters (output channels): 6x6x3 input, 3x3 filters, 5 of them, valid padding: 2160 multiplies
against 432 + 240 = 672, "~10 times cheaper". Both layers are the zoo's own blocks (``ConvBnAct``,
``DepthwiseSeparable``); multiplies are counted by the cost analyser, time is measured on the CPU.
A whole-network line compares ``mobilenet_v1`` with its twin whose blocks are normal 3x3 convs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.cost import count_macs, stage_costs, total_row
from ..models import zoo
from ..models.blocks import ConvBnAct, DepthwiseSeparable
from .summary import Claim, Summary, figure, markdown_table, significant
from .timing import forward, spread, timed_samples

ABOUT = 1.5   # "~10 times" holds for a saving within a factor 1.5 of 10 (6.7x to 15x)
EXACT = 1e-9  # counted ratio against the formula: integers of the same layer, nothing to round


@dataclass(frozen=True)
class Layer:
    """A convolution layer: an ``size`` x ``size`` x ``in_chs`` input, ``out_chs`` filters of ``kernel`` x ``kernel``."""
    size: int
    in_chs: int
    out_chs: int
    kernel: int
    padding: str = "same"    # the zoo's blocks pad to keep the size; the notes' example is "valid"

    @property
    def name(self) -> str:
        return f"{self.size}x{self.size}x{self.in_chs}, {self.out_chs} filters {self.kernel}x{self.kernel}"

    @property
    def formula(self) -> float:
        """The notes' ratio, separable over normal cost: 1/n_c + 1/f^2 (n_c: the filters, i.e. output channels)."""
        return 1 / self.out_chs + 1 / self.kernel ** 2


NOTES_EXAMPLE = Layer(size=6, in_chs=3, out_chs=5, kernel=3, padding="valid")


def grid(size: int, channels: list[int], kernels: list[int]) -> list[Layer]:
    """The layers of the sweep: n_c channels in and out, as in MobileNet's blocks."""
    return [Layer(size, chs, chs, kernel) for kernel in kernels for chs in channels]


def normal_conv(layer: Layer) -> nn.Module:
    return padded(ConvBnAct(layer.in_chs, layer.out_chs, kernel=layer.kernel), layer.padding)


def separable_conv(layer: Layer) -> DepthwiseSeparable:
    return padded(DepthwiseSeparable(layer.in_chs, layer.out_chs, kernel=layer.kernel), layer.padding)


def padded(module: nn.Module, padding: str) -> nn.Module:
    """The blocks pad to "same"; "valid" (no padding) is the notes' 6x6 -> 4x4."""
    if padding == "valid":
        for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
            conv.padding = (0, 0)
    return module.eval()   # inference: BatchNorm on its running statistics, as a deployed MobileNet


# The layers --------------------------------------------------------------------------------------

def measure_layer(layer: Layer, batch: int, repeats: int, min_block_s: float) -> dict:
    """Multiply-adds of both layers (per image) and their CPU time per image (medians)."""
    normal, separable = normal_conv(layer), separable_conv(layer)
    depthwise, pointwise = separable
    shape = (1, layer.in_chs, layer.size, layer.size)
    macs = {"normal": count_macs(normal, shape), "depthwise": count_macs(depthwise, shape)}
    macs["pointwise"] = count_macs(separable, shape) - macs["depthwise"]
    macs["separable"] = macs["depthwise"] + macs["pointwise"]

    x = torch.randn(batch, *shape[1:])
    with torch.inference_mode():
        depthwise_out = depthwise(x)
        samples = timed_samples({"normal": forward(normal, x), "separable": forward(separable, x),
                                 "depthwise": forward(depthwise, x), "pointwise": forward(pointwise, depthwise_out)},
                                repeats, min_block_s)
    seconds = {name: statistics.median(s) / batch for name, s in samples.items()}
    return {"layer": layer, "macs": macs, "seconds": seconds,
            "mac_ratio": macs["separable"] / macs["normal"],
            "time_ratio": seconds["separable"] / seconds["normal"],
            "spread": max(spread(s) for s in samples.values())}


# The whole network -------------------------------------------------------------------------------

def normal_twin(model_cfg):
    """The same stage table with every depthwise-separable block a normal 3x3 conv-BN-ReLU of the same widths
    and strides: the network MobileNet would be without its trick."""
    from omegaconf import OmegaConf

    twin = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    for part in (twin.stem, twin.stages):
        for spec in part:
            for block in spec.get("blocks", [spec]):
                if block.block == "depthwise_separable":
                    block.block = "conv_bn_act"
    twin.name = f"{model_cfg.name} with normal convs"
    return twin


def model_config(model: str, width: float):
    """The zoo's model config, composed as train.py composes it."""
    return zoo.model_config(model, width_mult=width)


def measure_network(model_cfg, resolution: int, batch: int, repeats: int, min_block_s: float) -> dict:
    """Both networks' parameters and multiply-adds (the cost analyser's total) and CPU time per image."""
    from hydra.utils import instantiate

    nets = {"separable": instantiate(model_cfg, num_classes=1000).eval(),
            "normal": instantiate(normal_twin(model_cfg), num_classes=1000).eval()}
    totals = {kind: total_row(stage_costs(net, resolution)) for kind, net in nets.items()}
    x = torch.randn(batch, 3, resolution, resolution)
    with torch.inference_mode():
        samples = timed_samples({kind: forward(net, x) for kind, net in nets.items()}, repeats, min_block_s)
    return {"model": model_cfg.name, "resolution": resolution,
            "params": {kind: t.params for kind, t in totals.items()},
            "macs": {kind: t.macs for kind, t in totals.items()},
            "seconds": {kind: statistics.median(s) / batch for kind, s in samples.items()},
            "spread": max(spread(s) for s in samples.values())}


# The study ---------------------------------------------------------------------------------------

def measure(params: dict, trials: list, **options) -> Summary:
    layers, timing, network = params["layers"], params["timing"], params["network"]
    if timing.get("threads"):
        torch.set_num_threads(int(timing["threads"]))
    batch, repeats, block = int(timing["batch"]), int(timing["repeats"]), float(timing["min_block_s"])
    torch.manual_seed(0)

    example = measure_layer(NOTES_EXAMPLE, batch, repeats, block)
    rows = [measure_layer(layer, batch, repeats, block)
            for layer in grid(int(layers["size"]), list(layers["channels"]), list(layers["kernels"]))]
    net = measure_network(model_config(network["model"], float(network["width"])), int(network["resolution"]),
                          batch, repeats, block)

    notes = [f"Multiply-adds: the cost analyser's count for one image (convolutions only; BatchNorm and ReLU "
             f"are not multiplies). Times: CPU time per image at batch {batch}, the median of {repeats} interleaved "
             f"timed blocks of at least {block * 1000:.0f} ms each after warm-up, {torch.get_num_threads()} torch "
             f"threads, in inference mode; the layers are the zoo's blocks with BatchNorm and ReLU.",
             f"Timing noise: the middle half of a layer's timed blocks lay within {pct(median_spread(rows))} of their "
             f"median (the median over layers; worst {pct(max(r['spread'] for r in rows))}). Other processes "
             "sharing the CPU make the times noisy; the multiply counts are exact.",
             f"{net['model']} at {net['resolution']} px: {net['params']['separable']:,} parameters against "
             f"{net['params']['normal']:,} for its twin with normal 3x3 convs.", *memory_bound(rows)]
    return Summary("Depthwise-separable vs normal convolutions: multiplies and CPU time",
                   claims(example, rows, net), table([example, *rows], net), plot(example, rows, net),
                   metrics(example, rows, net), notes)


def claims(example: dict, rows: list[dict], net: dict) -> list[Claim]:
    every = [example, *rows]
    deviation = max(abs(r["mac_ratio"] - r["layer"].formula) / r["layer"].formula for r in every)
    m = example["macs"]
    exact = (m["normal"], m["depthwise"], m["pointwise"]) == notes_example_counts()
    formula = Claim(
        "Depthwise-separable over normal convolution cost = 1/n_c + 1/f² (1/5 + 1/3² = 0.31 = (432+240)/2160).",
        f"counted: {m['normal']:,} vs {m['depthwise']:,} + {m['pointwise']:,} = {m['separable']:,} multiplies in the "
        f"notes' example (ratio {example['mac_ratio']:.3f}); on all {len(every)} layers the counted ratio equals "
        f"1/n_c + 1/f² (largest relative difference {deviation:.1e})",
        "confirmed" if exact and deviation < EXACT else "refuted")

    mac_saving = net["macs"]["normal"] / net["macs"]["separable"]
    fewer = Claim(
        "~10 times cheaper (multiplies).",
        f"{net['model']}: {mac_saving:.1f}x fewer multiply-adds than its normal-conv twin; single layers "
        f"{by_kernel(rows, 'mac_ratio')} (at most f² = 9x for 3x3)",
        "confirmed" if about_ten(mac_saving) else "refuted")

    time_saving = net["seconds"]["normal"] / net["seconds"]["separable"]
    faster = Claim(
        "~10 times cheaper (CPU time).",
        f"{net['model']}: {time_saving:.1f}x faster than its twin (for {mac_saving:.1f}x fewer multiplies); single "
        f"layers {by_kernel(rows, 'time_ratio')}; the depthwise conv does {pct(depthwise_share(rows, 'macs'))} of a "
        f"separable layer's multiplies but takes {pct(depthwise_share(rows, 'seconds'))} of its time, at "
        f"{gmacs(median_rate(rows, 'depthwise'))} GMAC/s against {gmacs(median_rate(rows, 'normal'))} for the "
        "normal conv (medians over the layers)",
        "confirmed" if about_ten(time_saving) else "refuted")
    return [formula, fewer, faster]


def memory_bound(rows: list[dict]) -> list[str]:
    """Why the time saving falls short of the multiply saving, when the measurement says it does."""
    depthwise, normal = median_rate(rows, "depthwise"), median_rate(rows, "normal")
    if depthwise >= normal / 3:
        return []
    return [f"The depthwise conv ran at {gmacs(depthwise)} billion multiply-adds per second, the normal conv at "
            f"{gmacs(normal)}: per value read or written it does about f²/2 multiply-adds, the normal conv about "
            "f²·n_c/2, so it waits on memory rather than on arithmetic (memory-bound), and a multiply saved by "
            "the separable layer saves less time than one of the normal conv's."]


def notes_example_counts() -> tuple[int, int, int]:
    """The notes' arithmetic for their example, from its sizes: (f·f·n_c) x positions x filters, etc."""
    e = NOTES_EXAMPLE
    positions = (e.size - e.kernel + 1) ** 2
    return (e.kernel ** 2 * e.in_chs * positions * e.out_chs, e.kernel ** 2 * positions * e.in_chs,
            e.in_chs * positions * e.out_chs)


def about_ten(saving: float) -> bool:
    return 10 / ABOUT <= saving <= 10 * ABOUT


def by_kernel(rows: list[dict], key: str) -> str:
    """The savings (1 / ratio) of the layers, kernel by kernel: '3x3 2.8x to 8.7x, 5x5 ...'."""
    parts = []
    for kernel in sorted({r["layer"].kernel for r in rows}):
        savings = [1 / r[key] for r in rows if r["layer"].kernel == kernel]
        parts.append(f"{kernel}x{kernel} {min(savings):.1f}x to {max(savings):.1f}x")
    return ", ".join(parts)


def depthwise_share(rows: list[dict], key: str) -> float:
    return statistics.median(r[key]["depthwise"] / (r[key]["depthwise"] + r[key]["pointwise"]) for r in rows)


def rate(measured: dict, part: str) -> float:
    """Multiply-adds per second (G) of one part (normal, depthwise, ...) of a measured layer or network."""
    return measured["macs"][part] / measured["seconds"][part] / 1e9


def median_rate(rows: list[dict], part: str) -> float:
    """Multiply-adds per second (G) of one part of the layers, the median over the layers."""
    return statistics.median(rate(r, part) for r in rows)


def median_spread(rows: list[dict]) -> float:
    return statistics.median(r["spread"] for r in rows)


def table(rows: list[dict], net: dict) -> str:
    cells = [[r["layer"].name + (" (the notes' example, valid padding)" if r["layer"] == NOTES_EXAMPLE else ""),
              f"{r['macs']['normal']:,}", f"{r['macs']['depthwise']:,} + {r['macs']['pointwise']:,}",
              f"{r['mac_ratio']:.3f}", f"{r['layer'].formula:.3f}", ms(r["seconds"]["normal"]),
              ms(r["seconds"]["separable"]), f"{r['time_ratio']:.2f}",
              *(gmacs(rate(r, part)) for part in ("normal", "depthwise", "pointwise"))] for r in rows]
    cells.append([f"**{net['model']}** at {net['resolution']} px vs normal-conv twin", f"{net['macs']['normal']:,}",
                  f"{net['macs']['separable']:,}", f"{net['macs']['separable'] / net['macs']['normal']:.3f}", "",
                  ms(net["seconds"]["normal"]), ms(net["seconds"]["separable"]),
                  f"{net['seconds']['separable'] / net['seconds']['normal']:.2f}",
                  gmacs(rate(net, "normal")), "", ""])
    return markdown_table(
        ["layer (n x n x channels in, filters f x f)", "normal: multiply-adds", "separable: depthwise + pointwise",
         "ratio counted", "1/n_c + 1/f²", "normal: ms/image", "separable: ms/image", "time ratio",
         "normal: GMAC/s", "depthwise: GMAC/s", "pointwise: GMAC/s"], cells)


def metrics(example: dict, rows: list[dict], net: dict) -> dict[str, float]:
    values = {"notes_example_normal_macs": example["macs"]["normal"],
              "notes_example_separable_macs": example["macs"]["separable"],
              "network_mac_saving": net["macs"]["normal"] / net["macs"]["separable"],
              "network_time_saving": net["seconds"]["normal"] / net["seconds"]["separable"],
              "timing_spread": median_spread(rows)}
    for r in rows:
        key = f"c{r['layer'].out_chs}_f{r['layer'].kernel}"
        values[f"{key}_mac_ratio"] = r["mac_ratio"]
        values[f"{key}_time_ratio"] = r["time_ratio"]
    return values


KERNEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def plot(example: dict, rows: list[dict], net: dict):
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (counted, timed, rates) = figure(3)
    kernels = sorted({r["layer"].kernel for r in rows})
    colour = {k: KERNEL_COLOURS[i % len(KERNEL_COLOURS)] for i, k in enumerate(kernels)}
    for k in kernels:
        mine = [r for r in rows if r["layer"].kernel == k]
        counted.plot([r["layer"].formula for r in mine], [r["mac_ratio"] for r in mine], "o", color=colour[k],
                     label=f"{k}x{k}")
        timed.plot([r["mac_ratio"] for r in mine], [r["time_ratio"] for r in mine], "o-", color=colour[k],
                   label=f"{k}x{k} layers")
        channels = [r["layer"].out_chs for r in mine]
        rates.plot(channels, [rate(r, "normal") for r in mine], "o-", color=colour[k], label=f"normal {k}x{k}")
        rates.plot(channels, [rate(r, "depthwise") for r in mine], "s--", color=colour[k], label=f"depthwise {k}x{k}")
    counted.plot([example["layer"].formula], [example["mac_ratio"]], "*", color="black", markersize=11,
                 label="notes' example")
    timed.plot([net["macs"]["separable"] / net["macs"]["normal"]], [net["seconds"]["separable"] / net["seconds"]["normal"]],
               "*", color="black", markersize=11, label=net["model"])
    low = min(r["mac_ratio"] for r in rows + [example])
    counted.plot([low, 1], [low, 1], color="grey", linewidth=0.8, label="counted = formula")
    timed.plot([low, 1], [low, 1], color="grey", linewidth=0.8, label="time saving = multiply saving")
    timed.axhline(1, color="grey", linestyle=":", linewidth=0.8)
    counted.set(xlabel="1/n_c + 1/f²", ylabel="separable / normal multiply-adds (counted)",
                title="multiplies: counted vs the notes' formula", xscale="log", yscale="log")
    timed.set(xlabel="separable / normal multiply-adds", ylabel="separable / normal CPU time",
              title="CPU time ratio vs multiply ratio", xscale="log", yscale="log")
    rates.set(xlabel="channels n_c", ylabel="multiply-adds per second (G)", title="throughput: normal vs depthwise conv",
              xscale="log", yscale="log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axes in (counted, timed, rates):
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3, which="both")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
    return fig


def ms(seconds: float) -> str:
    return significant(seconds * 1000, 3)


def gmacs(per_second: float) -> str:
    """Billions of multiply-adds per second, to two figures: CPU timings here are no more precise."""
    return significant(per_second, 2)


def pct(value: float) -> str:
    return f"{100 * value:.0f}%"
