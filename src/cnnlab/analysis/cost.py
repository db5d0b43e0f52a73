"""What a network costs, part by part: output shape, parameters and multiply-adds.

Multiply-adds are counted by torch's own ``FlopCounterMode`` (FLOPs / 2 = MACs). It counts the
convolutions and matrix products, not BatchNorm, activations, pooling or additions: the convention
of the course notes ("2,160 multiplies") and of torchvision's published GFLOPS. The input is made
on the module's device, so a net built on the meta device is counted from shapes alone: VGG-16 at
224 px takes milliseconds and no memory for weights or activations.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from ..models.net import Net, count_parameters


@dataclass(frozen=True)
class CostRow:
    name: str                      # "stem", "stage 1", ..., "head", "total"
    output_shape: tuple[int, ...]  # without the batch dimension, as PyTorch orders it: (C, H, W)
    params: int
    macs: int


def count_macs(module: nn.Module, input_shape: Sequence[int] | torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``module`` on a zero input of ``input_shape``
    (batch included, e.g. ``(1, 3, 224, 224)``), or on the tensor given."""
    return _forward_counted(module, input_shape)[0]


def _forward_counted(module: nn.Module, x: Sequence[int] | torch.Tensor) -> tuple[int, torch.Tensor]:
    if not isinstance(x, torch.Tensor):
        x = torch.zeros(tuple(x), device=_device_of(module))
    modes = {m: m.training for m in module.modules()}
    module.eval()  # inference cost: no dropout, no stochastic depth, BatchNorm on running statistics
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = module(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2, y


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def stage_costs(net: Net, resolution: int, in_chans: int = 3) -> list[CostRow]:
    """One row per part of ``net`` (stem, stage 1..N, head) for one ``resolution`` x ``resolution``
    image; the parts run in sequence, each counted on its own, so the rows add up to the net."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ConfigError(f"resolution must be a positive whole number of pixels, got {resolution!r}")
    minimum = getattr(net, "min_resolution", None)
    if minimum and resolution < minimum:
        raise ConfigError(f"{net.name} needs images of at least {minimum}x{minimum} px, got {resolution}x{resolution}")
    parts = [("stem", net.stem), *((f"stage {i}", s) for i, s in enumerate(net.stages, 1)), ("head", net.head)]
    x = torch.zeros(1, in_chans, resolution, resolution, device=_device_of(net))
    rows = []
    for name, part in parts:
        macs, x = _forward_counted(part, x)
        rows.append(CostRow(name, tuple(x.shape[1:]), count_parameters(part), macs))
    return rows


def total_row(rows: Sequence[CostRow]) -> CostRow:
    return CostRow("total", rows[-1].output_shape, sum(r.params for r in rows), sum(r.macs for r in rows))


def shape_text(shape: Sequence[int]) -> str:
    """H x W x C, as the course notes write volumes (28x28x192); a vector is its length."""
    if len(shape) == 3:
        channels, height, width = shape
        return f"{height}x{width}x{channels}"
    return "x".join(str(s) for s in shape)


def human(value: float) -> str:
    """4.09 G, 10.0 M, 668 M: three significant figures are what a cost comparison needs."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.{2 if scaled < 10 else 1 if scaled < 100 else 0}f} {unit}"
    return f"{value:,.0f}"


COLUMNS = ("part", "output (HxWxC)", "parameters", "multiply-adds", "% of MACs")


def format_table(rows: Sequence[CostRow], fmt: str = "text", title: str | None = None) -> str:
    """The rows and their total as ``text`` (aligned, for a terminal), ``markdown`` or ``csv``.

    CSV keeps exact integers; text and Markdown give parameters with thousands separators and
    multiply-adds in K/M/G.
    """
    every = [*rows, total_row(rows)]
    total_macs = every[-1].macs
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["part", "output_shape", "params", "macs"])
        for row in every:
            writer.writerow([row.name, shape_text(row.output_shape), row.params, row.macs])
        return out.getvalue()

    cells = [[row.name, shape_text(row.output_shape), f"{row.params:,}", human(row.macs),
              f"{100 * row.macs / total_macs:.1f}" if total_macs else "-"] for row in every]
    if fmt == "markdown":
        lines = [f"**{title}**", ""] if title else []
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * 3]
        lines += ["| " + " | ".join(c) + " |" for c in cells[:-1]]
        lines.append("| " + " | ".join(f"**{c}**" for c in cells[-1]) + " |")
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise ConfigError(f"unknown table format {fmt!r}; use text, markdown or csv")
    widths = [max(len(line[i]) for line in [COLUMNS, *cells]) for i in range(len(COLUMNS))]

    def line(values):  # names and shapes to the left, numbers to the right
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    rule = "-" * len(line(COLUMNS))
    lines = ([title] if title else []) + [line(COLUMNS), rule, *map(line, cells[:-1]), rule, line(cells[-1])]
    return "\n".join(lines) + "\n"


FORMATS = {".csv": "csv", ".md": "markdown", ".markdown": "markdown", ".txt": "text"}


def _format_of(path: Path) -> str:
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"cost.output={path}: name a .csv, .md or .txt file")
    return FORMATS[path.suffix.lower()]


def write_table(rows: Sequence[CostRow], path: str | Path, title: str | None = None) -> Path:
    """Write the table in the format the file's suffix names (.csv, .md or .txt)."""
    path = Path(path)
    fmt = _format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_table(rows, fmt, title))
    return path


def report(cfg) -> list[CostRow]:
    """``python src/cost.py``: build ``cfg.model`` on the meta device, print its table, write it if asked."""
    from hydra.utils import instantiate

    options = cfg.cost
    resolution, num_classes = options.resolution, options.num_classes
    if isinstance(resolution, float) and resolution.is_integer():
        resolution = int(resolution)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ConfigError(f"cost.resolution must be a positive whole number of pixels, got {resolution!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"cost.num_classes must be a positive whole number, got {num_classes!r}")
    if options.output:
        _format_of(Path(options.output))  # a wrong suffix fails before the counting, not after
    with torch.device("meta"):  # shapes only: no weights are allocated or initialised
        net = instantiate(cfg.model, num_classes=num_classes)
    rows = stage_costs(net, resolution, in_chans=cfg.model.get("in_chans", 3))
    title = f"{net.name} at {resolution}x{resolution} px, {num_classes} classes (multiply-adds per image)"
    print(format_table(rows, "text", title), end="")
    if options.output:
        print(f"Wrote {write_table(rows, options.output, title)}", file=sys.stderr)
    return rows
