"""The one shape every architecture has: stem -> stages -> head.

Freezing (freeze depth K = stem + stages[:K]), feature caching, scaling and cost analysis rely
only on this contract, so they work for every family.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        return self.fc(self.dropout(self.hidden(self.flatten(self.pool(features)))))


class Net(nn.Module):
    """An image classifier in the form shared by all cnnlab architectures."""

    def __init__(self, stem: nn.Module, stages: nn.ModuleList, head: nn.Module, name: str = "net",
                 min_resolution: int | None = None):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.head = head
        self.name = name
        self.min_resolution = min_resolution

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # below its minimum a family's downsampling runs out of pixels; say so instead of a shape error
        if self.min_resolution and min(x.shape[-2:]) < self.min_resolution:
            size = self.min_resolution
            raise ConfigError(f"{self.name} needs images of at least {size}x{size} px, got {x.shape[-2]}x{x.shape[-1]}")
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
