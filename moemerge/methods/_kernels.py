"""Chunk kernels shared by several methods.

Every kernel uses separate multiply and add steps, never fused `alpha=`/`addcmul` forms:
a fused multiply-add may round differently in torch's vectorized body and its scalar tail,
and which elements land in the tail depends on the chunk size. Separate IEEE operations
round the same everywhere, so the output is byte-identical for any chunking.
"""

from __future__ import annotations

from collections.abc import Sequence

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods.base import Chunk

__all__ = ["weighted_sum", "weighted_delta_sum"]


def weighted_sum(chunk: Chunk, weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * x_i over the chunk's inputs, in the compute dtype (scratch 0 and 1)."""
    acc = chunk.scratch(0)
    tmp = chunk.scratch(1)
    for i, w in enumerate(weights):
        if i == 0:
            chunk.input(0, out=acc)
            acc.mul_(w)
            continue
        chunk.input(i, out=tmp)
        tmp.mul_(w)
        acc.add_(tmp)
    return acc


def weighted_delta_sum(chunk: Chunk, base: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * (x_i - base) (scratch 0 and 1; `base` must live elsewhere)."""
    acc = chunk.scratch(0)
    tmp = chunk.scratch(1)
    for i, w in enumerate(weights):
        dst = acc if i == 0 else tmp
        chunk.input(i, out=dst)
        dst.sub_(base)
        dst.mul_(w)
        if i:
            acc.add_(tmp)
    return acc
