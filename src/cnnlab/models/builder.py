"""The one model builder: turns a stage table (conf/model/*.yaml) into a ``Net``.

A stage table lists the stem layers and the stages. Each stage entry names a block from
``BLOCKS`` with its output channels, repeats and stride; any other keys are passed to the
block. Width w multiplies channels (rounded to multiples of 8), depth d multiplies repeats
(rounded up): the (w, d) of compound scaling apply to every family the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from .blocks import BLOCKS
from .net import ClassifierHead, Net


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` without going below 90% of the target."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def scale_width(channels: int, width_mult: float) -> int:
    return channels if width_mult == 1.0 else make_divisible(channels * width_mult)


def scale_depth(repeats: int, depth_mult: float) -> int:
    return int(math.ceil(repeats * depth_mult))


def _make_block(spec: Mapping, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    options = {k: v for k, v in spec.items() if k not in ("block", "out_chs", "repeats", "stride")}
    try:
        block = BLOCKS[spec["block"]]
    except KeyError:
        raise ValueError(f"unknown block {spec['block']!r}; known blocks: {', '.join(sorted(BLOCKS))}") from None
    return block(in_chs, out_chs, stride=stride, **options)


def build_net(stem: Sequence[Mapping], stages: Sequence[Mapping], num_classes: int, in_chans: int = 3,
              width_mult: float = 1.0, depth_mult: float = 1.0, dropout: float = 0.0,
              name: str = "net") -> Net:
    """Build a ``Net`` from its stem layers and stage table, scaled by width and depth."""
    chs = in_chans
    stem_layers = []
    for spec in stem:
        out_chs = scale_width(spec.get("out_chs", chs), width_mult) if "out_chs" in spec else chs
        stem_layers.append(_make_block(spec, chs, out_chs, spec.get("stride", 1)))
        chs = out_chs

    built_stages = nn.ModuleList()
    for spec in stages:
        out_chs = scale_width(spec["out_chs"], width_mult)
        blocks = []
        for i in range(scale_depth(spec.get("repeats", 1), depth_mult)):
            blocks.append(_make_block(spec, chs, out_chs, spec.get("stride", 1) if i == 0 else 1))
            chs = out_chs
        built_stages.append(nn.Sequential(*blocks))

    head = ClassifierHead(chs, num_classes, dropout)
    return Net(nn.Sequential(*stem_layers), built_stages, head, name=name)
