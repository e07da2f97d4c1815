"""slerp: spherical interpolation between the base (t = 0) and one other model (t = 1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._vectors import gram_dots, reduce_dots
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams, check_range

__all__ = ["SLERP", "slerp_coefficients"]

#: MergeKit's DOT_THRESHOLD: above it the vectors are treated as colinear and lerped.
_DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, dot: float, n0: float, n1: float) -> tuple[float, float]:
    """(a, b) with out = a v0 + b v1, from <v0, v1>, |v0|^2, |v1|^2 (methods.md)."""
    norm0 = math.sqrt(n0)
    norm1 = math.sqrt(n1)
    norm0 = norm0 if norm0 >= 1e-8 else 1.0  # a norm under 1e-8 counts as 1
    norm1 = norm1 if norm1 >= 1e-8 else 1.0
    c = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    if abs(c) > _DOT_THRESHOLD:
        return 1.0 - t, t
    th = math.acos(c)
    s = math.sin(th)
    return math.sin((1 - t) * th) / s, math.sin(t * th) / s


def _map(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> list[int]:
    v0 = chunk.base(out=chunk.scratch(0))
    v1 = chunk.input(0, out=chunk.scratch(1))
    return gram_dots([v0, v1], [(0, 1), (0, 0), (1, 1)])


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    return (StatPass(name="dots", map=_map, reduce=reduce_dots),)


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    a, b = slerp_coefficients(float(p.glob["t"]), *stats["dots"])
    v0 = chunk.base(out=chunk.scratch(0))
    v1 = chunk.input(0, out=chunk.scratch(1))
    v0.mul_(a)
    v1.mul_(b)
    v0.add_(v1)
    return v0


SLERP = Method(
    name="slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    params=(ParamSpec(name="t", scope="global", range=check_range(0, 1),
                      doc="0 gives the base, 1 the other model (MergeKit's documented range)"),),
    apply=_apply,
    base="required",
    min_inputs=1,
    max_inputs=1,
    passes=_passes,
    # two float32 buffers; float64 products run in cache-sized blocks (stats.BLOCK); one spare
    working_copies=lambda n: 2,
    temporaries=lambda n: 1,
)
