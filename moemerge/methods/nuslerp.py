"""nuslerp: slerp of two models (or two task vectors with a base), weighted by w_2/(w_1+w_2).

`nuslerp_flatten` (default true): the whole tensor is one vector (exact dot products over
streamed chunks). False: the vectors are rows (slices along the last dim), computed per row
inside the chunk; with `nuslerp_row_wise: true`, slices along dim 0, which span every row,
so such a tensor is processed as one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._host import same_device
from moemerge.methods._vectors import exact_dots, reduce_dots, row_dots
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams

__all__ = ["NUSLERP", "nuslerp_coefficients"]


def nuslerp_coefficients(t: float, dot: np.ndarray, n0: np.ndarray, n1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per vector (a, b) with out = a v0 + b v1 (methods.md: norm clamp 1e-7, lerp if sin^2 <= 1e-16)."""
    norm0 = np.maximum(np.sqrt(n0), 1e-7)
    norm1 = np.maximum(np.sqrt(n1), 1e-7)
    c = np.clip(dot / (norm0 * norm1), -1.0, 1.0)
    lerp = 1.0 - c * c <= 1e-16
    th = np.arccos(c)
    s = np.where(lerp, 1.0, np.sin(th))
    a = np.where(lerp, 1.0 - t, np.sin((1 - t) * th) / s)
    b = np.where(lerp, t, np.sin(t * th) / s)
    return a, b


def _t(p: TensorParams) -> float:
    w1, w2 = p.column("weight")
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def _vectors(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    v0 = chunk.input(0, out=chunk.scratch(0))
    v1 = chunk.input(1, out=chunk.scratch(1))
    base = None
    if chunk.has_base:
        base = chunk.base(out=chunk.scratch(2))
        v0.sub_(base)
        v1.sub_(base)
    return v0, v1, base


def _map(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> list[int]:
    v0, v1, _ = _vectors(chunk)
    return exact_dots([(v0, v1), (v0, v0), (v1, v1)])


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    if p.glob.get("nuslerp_flatten", True):
        return (StatPass(name="dots", map=_map, reduce=reduce_dots),)
    return ()


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    t = _t(p)
    v0, v1, base = _vectors(chunk)
    if p.glob.get("nuslerp_flatten", True):
        dot, n0, n1 = stats["dots"]
        a, b = nuslerp_coefficients(t, np.array([dot]), np.array([n0]), np.array([n1]))
        v0.mul_(float(a[0]))
        v1.mul_(float(b[0]))
    else:
        if p.glob.get("nuslerp_row_wise", False):
            # vectors along dim 0: move that dim last, compute per "row", move back
            shape = chunk.shape
            lead = shape[0] if shape else 1
            x0 = v0.reshape(lead, -1).T.contiguous()
            x1 = v1.reshape(lead, -1).T.contiguous()
        elif len(chunk.shape) <= 1:
            x0, x1 = v0.reshape(1, -1), v1.reshape(1, -1)
        else:
            x0, x1 = v0, v1
        a, b = nuslerp_coefficients(t, row_dots(x0, x1), row_dots(x0, x0), row_dots(x1, x1))
        ca = same_device(torch.from_numpy(a.astype(np.float32)).reshape(-1, 1), x0)
        cb = same_device(torch.from_numpy(b.astype(np.float32)).reshape(-1, 1), x1)
        if p.glob.get("nuslerp_row_wise", False):
            x0.mul_(ca)
            x1.mul_(cb)
            v0.copy_(x0.T.reshape(v0.shape))
            v1.copy_(x1.T.reshape(v1.shape))
        else:
            x0.mul_(ca)
            x1.mul_(cb)
    v0.add_(v1)
    if base is not None:
        v0.add_(base)
    return v0


def _granularity(shape: tuple[int, ...], p: TensorParams) -> int:
    """Rows a chunk must hold whole: a vector never spans two chunks."""
    if p.glob.get("nuslerp_flatten", True):
        return 1
    rows = math.prod(shape[:-1]) if len(shape) >= 2 else (shape[0] if shape else 1)
    if p.glob.get("nuslerp_row_wise", False) or len(shape) <= 1:
        return max(rows, 1)  # a vector along dim 0 (or a 1-D tensor) spans every row
    return 1


NUSLERP = Method(
    name="nuslerp",
    pretty_name="NuSLERP",
    reference_url="https://github.com/arcee-ai/mergekit",
    params=(
        ParamSpec(name="weight", scope="model", doc="relative weight; t = w_2 / (w_1 + w_2)"),
        ParamSpec(name="nuslerp_flatten", scope="global", default=True, kind="bool"),
        ParamSpec(name="nuslerp_row_wise", scope="global", default=False, kind="bool"),
    ),
    apply=_apply,
    base="optional",
    min_inputs=2,
    max_inputs=2,
    passes=_passes,
    working_copies=lambda n: 3,
    temporaries=lambda n: 8,  # float64 products, transposed copies for row-wise vectors
    row_granularity=_granularity,
)
