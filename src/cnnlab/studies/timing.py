"""Timing a forward pass on a machine others may share: warmed up, in interleaved blocks, the median kept."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn


def timed_samples(candidates: Mapping[str, Callable[[], object]], repeats: int,
                   min_block_s: float) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one sample per timed block: ``repeats`` blocks each, interleaved
    (a, b, c, a, b, c, ...), so that a change in the machine's load falls on every candidate alike.

    Each candidate is warmed up first (the first calls allocate and choose kernels) and a block makes as
    many calls as last ``min_block_s``, so that the clock's resolution and one-off stalls weigh little.
    The median of the samples is the figure to use; their spread says how noisy the machine was.
    """
    calls = {name: calls_per_block(fn, min_block_s) for name, fn in candidates.items()}
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return samples


def calls_per_block(fn: Callable[[], object], min_block_s: float) -> int:
    """Warm ``fn`` up, then double the calls until a block of them lasts ``min_block_s``."""
    fn()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= min_block_s:
            return calls
        calls *= 2


def spread(samples: list[float]) -> float:
    """Interquartile range over the median: 0.05 means the middle half of the blocks lay within 5%."""
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return (high - low) / statistics.median(samples)


def forward(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One forward pass, to be timed (under ``torch.inference_mode``: no autograd bookkeeping)."""
    return lambda: module(x)
