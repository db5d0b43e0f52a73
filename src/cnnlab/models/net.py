"""The one shape every architecture has: stem -> stages -> head.

Freezing (freeze depth K = stem + stages[:K]), feature caching, scaling and cost analysis rely
only on this contract, so they work for every family.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear: "the softmax layer" of the course notes."""

    def __init__(self, in_chs: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.flatten(self.pool(features))))


class Net(nn.Module):
    """An image classifier in the form shared by all cnnlab architectures."""

    def __init__(self, stem: nn.Module, stages: nn.ModuleList, head: nn.Module, name: str = "net"):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.head = head
        self.name = name

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
