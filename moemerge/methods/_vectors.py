"""Dot products and norms for geometric methods: whole-tensor (exact, streamed) or per row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods.stats import dot_rows, exact_dot, exact_dots_of, exact_value

__all__ = ["exact_dots", "gram_dots", "reduce_dots", "row_dots"]


def exact_dots(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Exact-sum partials of <a, b> for each pair (float32 products are exact in float64)."""
    return [exact_dot(a, b) for a, b in pairs]


def gram_dots(vectors: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]]) -> list[int]:
    """`exact_dots([(vectors[i], vectors[j]) for i, j in pairs])`, each vector converted once."""
    return exact_dots_of(vectors, pairs)


def reduce_dots(parts: Sequence[list[int]]) -> list[float]:
    """Add the partials of every chunk exactly; the correctly rounded dot products."""
    return [exact_value(sum(p[k] for p in parts)) for k in range(len(parts[0]))]


def row_dots(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-row <a_r, b_r> in float64 (numpy: the same for a row wherever it sits)."""
    return dot_rows(a, b)
