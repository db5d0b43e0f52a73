"""The one model builder: turns a stage table (conf/model/*.yaml) into a ``Net``.

A stage table lists the stem layers and the stages. A stage is one block spec, or
``{blocks: [spec, ...]}`` when it mixes block types (VGG's convs then pool, GoogLeNet's pool
then inception modules). A spec names a block from ``BLOCKS`` with its ``out_chs``, optional
``repeats`` and ``stride``; every other key is passed to the block, after the model-wide
``block_defaults`` for that block type.

Width w multiplies every ``*_chs`` value (rounded to multiples of 8), depth d multiplies
``repeats`` (rounded up): the (w, d) of compound scaling apply to every family the same way.
A spec without ``repeats`` is a single layer that never repeats (pools, GoogLeNet's modules).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

from omegaconf import OmegaConf
from torch import nn

from ..errors import ConfigError

from .blocks import BLOCKS, DropPath
from .net import AuxHead, ClassifierHead, Net
from .pretrained import load_pretrained, weights_source

LAYOUT_KEYS = ("block", "repeats", "stride", "widen_only")  # read by the builder, not passed to blocks


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


def _make_block(spec: Mapping, in_chs: int, width_mult: float, stride: int,
                block_defaults: Mapping[str, Mapping]) -> tuple[nn.Module, int]:
    """One block and its output width."""
    name = spec["block"]
    if name not in BLOCKS:
        raise ConfigError(f"unknown block {name!r}; known blocks: {', '.join(sorted(BLOCKS))}")
    # MobileNet v2 keeps its 1280 features when slimmed (w < 1): torchvision scales them by max(1, w)
    width_mult = max(1.0, width_mult) if spec.get("widen_only") else width_mult
    options = {**block_defaults.get(name, {}), **{k: v for k, v in spec.items() if k not in LAYOUT_KEYS}}
    options = {k: scale_width(v, width_mult) if k.endswith("_chs") else v for k, v in options.items()}
    out_chs = options.pop("out_chs", None)
    try:  # a misspelt option in the yaml is the user's to fix, not a bug: say which block
        inspect.signature(BLOCKS[name]).bind(in_chs, out_chs, stride=stride, **options)
    except TypeError as error:
        raise ConfigError(f"block {name!r}: {error}") from None
    block = BLOCKS[name](in_chs, out_chs, stride=stride, **options)
    return block, out_chs or block.out_chs  # blocks that set their own width (pooling, inception) say it


def _build_sequence(specs: Sequence[Mapping], chs: int, width_mult: float, depth_mult: float,
                    block_defaults: Mapping[str, Mapping]) -> tuple[nn.Sequential, list[int]]:
    """Stack the blocks of a stem or a stage; returns them and each block's output width."""
    blocks, widths = [], []
    for spec in specs:
        repeats = scale_depth(spec["repeats"], depth_mult) if "repeats" in spec else 1
        for i in range(repeats):
            block, chs = _make_block(spec, chs, width_mult, spec.get("stride", 1) if i == 0 else 1, block_defaults)
            blocks.append(block)
            widths.append(chs)
    return nn.Sequential(*blocks), widths or [chs]


def _build_aux_heads(aux_head: Mapping, widths: Sequence[Sequence[int]], num_classes: int,
                     width_mult: float) -> tuple[dict[str, AuxHead], dict[str, tuple[int, int]]]:
    """GoogLeNet's side classifiers: ``aux_head.at`` names each and the [stage, block] it reads."""
    options = {k: v for k, v in aux_head.items() if k not in ("at", "weight")}
    options = {k: scale_width(v, width_mult) if k.endswith("_chs") else v for k, v in options.items()}
    heads, at = {}, {}
    for name, where in (aux_head.get("at") or {}).items():
        if not (isinstance(where, Sequence) and len(where) == 2 and 0 <= where[0] < len(widths)
                and 0 <= where[1] < len(widths[where[0]])):
            raise ConfigError(f"aux head {name!r} reads [stage, block] {where}, which this model does not have")
        try:
            heads[name] = AuxHead(widths[where[0]][where[1]], num_classes, **options)
        except TypeError as error:
            raise ConfigError(f"aux head {name!r}: {error}") from None
        at[name] = (int(where[0]), int(where[1]))
    if not heads:
        raise ConfigError("model.aux_heads=true but model.aux_head.at names no attach point")
    return heads, at


def build_net(stem: Sequence[Mapping], stages: Sequence[Mapping], num_classes: int, in_chans: int = 3,
              width_mult: float = 1.0, depth_mult: float = 1.0, dropout: float = 0.0,
              name: str = "net", *, block_defaults: Mapping[str, Mapping] | None = None,
              head_pool: int = 1, head_hidden: Sequence[int] = (), drop_path_rate: float = 0.0,
              bn_eps: float | None = None, bn_momentum: float | None = None,
              min_resolution: int | None = None, pretrained: str | None = None,
              pretrained_cache_dir: str | None = None, weights: Mapping[str, Mapping] | None = None,
              aux_heads: bool = False, aux_head: Mapping | None = None) -> Net:
    """Build a ``Net`` from its stem layers and stage table, scaled by width and depth.

    ``head_pool``/``head_hidden`` give VGG's 7x7-pooled classifier with hidden FC layers;
    ``drop_path_rate`` is the stochastic-depth rate of the last block (rising linearly from 0
    over the blocks that have a residual branch); ``bn_eps``/``bn_momentum`` set every BatchNorm
    (GoogLeNet and EfficientNet B5-B7 differ from PyTorch's defaults); ``min_resolution`` makes
    smaller inputs a clear error. ``aux_heads`` adds the side classifiers that ``aux_head``
    describes (GoogLeNet's, read only by ``Net.forward_with_aux`` in training; their ``*_chs``
    scale with the width, ``aux_head.weight`` is their loss weight). ``pretrained`` (a name from
    ``weights``, the model's published weights, or a file or URL, see ``pretrained.py``) loads weights
    into the built net; URLs are cached in ``pretrained_cache_dir``. Published weights leave their entry
    (URL, mean, std, input size) on the net as ``net.pretrained_cfg``, as timm's models carry theirs.
    """
    stem, stages, head_hidden = _plain(stem), _plain(stages), _plain(head_hidden)
    block_defaults = _plain(block_defaults or {})
    stem_layers, widths = _build_sequence(stem, in_chans, width_mult, 1.0, block_defaults)
    chs = widths[-1]

    built_stages, stage_widths = nn.ModuleList(), []
    for stage in stages:
        built, widths = _build_sequence(stage.get("blocks", [stage]), chs, width_mult, depth_mult, block_defaults)
        built_stages.append(built)
        stage_widths.append(widths)
        chs = widths[-1]

    head = ClassifierHead(chs, num_classes, dropout, pool_size=head_pool, hidden=head_hidden)
    aux, aux_at, aux_head = None, None, _plain(aux_head or {})
    if aux_heads:
        aux, aux_at = _build_aux_heads(aux_head, stage_widths, num_classes, width_mult)
    net = Net(stem_layers, built_stages, head, name=name, min_resolution=min_resolution,
              aux_heads=aux, aux_at=aux_at, aux_weight=aux_head.get("weight", 0.3))

    # Settings that concern every block are applied once here rather than threaded through each.
    drop_paths = [m for m in built_stages.modules() if isinstance(m, DropPath)]
    for i, drop_path in enumerate(drop_paths):
        drop_path.p = drop_path_rate * i / len(drop_paths)  # as torchvision's EfficientNet
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = bn.eps if bn_eps is None else bn_eps
        bn.momentum = bn.momentum if bn_momentum is None else bn_momentum
    if pretrained:
        weights = _plain(weights or {})
        load_pretrained(net, weights_source(str(pretrained), weights, name), pretrained_cache_dir)
        net.pretrained_cfg = weights.get(str(pretrained))
    return net


def _plain(value):
    """Hydra may hand over OmegaConf containers; blocks want plain dicts and lists."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
