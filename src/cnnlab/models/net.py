"""The one shape every architecture has: stem -> stages -> head.

Freezing (freeze depth K = stem + stages[:K]), feature caching, scaling and cost analysis rely
only on this contract, so they work for every family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear: "the softmax layer" of the course notes.

    VGG's classifier is the same with two additions, as in torchvision (so its weights load):
    pooling to a 7x7 grid instead of 1x1, and hidden FC layers (``hidden``, each linear -> ReLU
    -> dropout) before the last linear. Adaptive pooling keeps any input resolution working.
    """

    def __init__(self, in_chs: int, num_classes: int, dropout: float = 0.0, pool_size: int = 1,
                 hidden: Sequence[int] = ()):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        layers, width = [], in_chs * pool_size * pool_size
        for hidden_width in hidden:
            layers += [nn.Linear(width, hidden_width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden_width
        self.hidden = nn.Sequential(*layers)
        # with hidden layers their dropout already precedes the last linear
        self.dropout = nn.Dropout(0.0 if hidden else dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(features))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The vector the softmax layer reads: pooled features (through VGG's hidden layers)."""
        return self.hidden(self.flatten(self.pool(features)))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """The softmax layer alone (its logits), on ``embed``'s output."""
        return self.fc(self.dropout(embedding))


class AuxHead(nn.Module):
    """GoogLeNet's auxiliary classifier (torchvision's ``InceptionAux``), a side head used in training only.

    Adaptive average pool to ``pool`` x ``pool`` -> 1x1 conv-bn-relu -> flatten -> linear -> ReLU
    -> dropout -> linear to the classes. torchvision pools 5x5/3 from 14x14, i.e. to 4x4.
    """

    def __init__(self, in_chs: int, num_classes: int, conv_chs: int = 128, hidden_chs: int = 1024,
                 pool: int = 4, dropout: float = 0.7):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.conv = nn.Sequential(nn.Conv2d(in_chs, conv_chs, 1, bias=False), nn.BatchNorm2d(conv_chs),
                                  nn.ReLU(inplace=True))
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(conv_chs * pool * pool, hidden_chs)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_chs, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(self.flatten(self.conv(self.pool(features)))))))


class Net(nn.Module):
    """An image classifier in the form shared by all cnnlab architectures.

    Optional ``aux_heads`` (GoogLeNet's side classifiers) read the output of block ``aux_at[name]``
    = (stage, block); ``forward`` ignores them, only ``forward_with_aux`` (training) runs them.
    """

    def __init__(self, stem: nn.Module, stages: nn.ModuleList, head: nn.Module, name: str = "net",
                 min_resolution: int | None = None, aux_heads: Mapping[str, nn.Module] | None = None,
                 aux_at: Mapping[str, tuple[int, int]] | None = None, aux_weight: float = 0.3):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.head = head
        self.name = name
        self.min_resolution = min_resolution
        self.aux_heads = nn.ModuleDict(aux_heads) if aux_heads else None  # None: no params, no state keys
        self.aux_at = {k: tuple(v) for k, v in (aux_at or {}).items()} if aux_heads else {}
        self.aux_weight = aux_weight  # the weight of the summed aux losses in training (paper: 0.3)
        self.pretrained_cfg: Mapping | None = None  # the published weights loaded (url, mean, std, sizes), if any

    def _check_size(self, x: torch.Tensor) -> None:
        # below its minimum a family's downsampling runs out of pixels; say so instead of a shape error
        if self.min_resolution and min(x.shape[-2:]) < self.min_resolution:
            size = self.min_resolution
            raise ConfigError(f"{self.name} needs images of at least {size}x{size} px, got {x.shape[-2]}x{x.shape[-1]}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The main logits and the aux heads' logits, in the order their blocks run (training only)."""
        if not self.aux_heads:
            return self(x), []
        self._check_size(x)
        readers = {}
        for name, where in self.aux_at.items():
            readers.setdefault(where, []).append(name)
        x, aux = self.stem(x), []
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                x = block(x)
                aux += [self.aux_heads[name](x) for name in readers.get((s, b), ())]
        return self.head(x), aux


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
