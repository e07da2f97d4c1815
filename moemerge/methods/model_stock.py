"""model_stock: interpolate the average of the fine-tunes toward the base by their angle.

t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors; the output
is t mean(w_i) + (1 - t) w_0. `filter_wise: true` uses one cosine per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._host import div_scalar_, same_device
from moemerge.methods._vectors import gram_dots, reduce_dots, row_dots
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams

__all__ = ["MODEL_STOCK", "stock_t"]


def stock_t(n: int, dots: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """t from pairwise dots `dots[(i, j)]` (i <= j; (i, i) are squared norms), vectorized."""
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norm = np.sqrt(dots[(i, i)]) * np.sqrt(dots[(j, j)])
            cos.append(np.clip(dots[(i, j)] / np.maximum(norm, 1e-6), -1.0, 1.0))
    c = np.mean(np.stack(cos), axis=0)
    den = 1 + (n - 1) * c
    return np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))


def _offsets(chunk: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = chunk.base(out=chunk.scratch(0))
    offs = []
    for i in range(chunk.n_inputs):
        o = chunk.input(i, out=chunk.scratch(2 + i))
        o.sub_(base)
        offs.append(o)
    return base, offs


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


def _map(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> list[int]:
    _, offs = _offsets(chunk)
    return gram_dots(offs, _pairs(len(offs)))


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    if p.glob.get("filter_wise", False):
        return ()
    return (StatPass(name="dots", map=_map, reduce=reduce_dots),)


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    n = chunk.n_inputs
    if p.glob.get("filter_wise", False):
        base, offs = _offsets(chunk)
        view = [o.reshape(1, -1) if len(chunk.shape) <= 1 else o for o in offs]
        dots = {(i, j): row_dots(view[i], view[j]) for i, j in _pairs(n)}
        t = torch.from_numpy(stock_t(n, dots).astype(np.float32))
        t = same_device(t.reshape(-1, 1) if len(chunk.shape) > 1 else t.reshape(1), base)
    else:  # the offsets are only needed for the per-row cosines
        base = chunk.base(out=chunk.scratch(0))
        dots = {pair: np.array([v]) for pair, v in zip(_pairs(n), stats["dots"])}
        t = torch.tensor(float(stock_t(n, dots)[0]), dtype=torch.float32)
    # mean(w_i): the inputs' sum, in input order
    avg = chunk.scratch(1)
    chunk.input(0, out=avg)
    for i in range(1, n):
        avg.add_(chunk.input(i, out=chunk.scratch(2 + i)))
    div_scalar_(avg, n)
    avg.mul_(t)
    one_minus = 1.0 - t
    base.mul_(one_minus)
    avg.add_(base)
    return avg


def _granularity(shape: tuple[int, ...], p: TensorParams) -> int:
    if p.glob.get("filter_wise", False) and len(shape) <= 1:
        return shape[0] if shape else 1  # a 1-D tensor is one row
    return 1


MODEL_STOCK = Method(
    name="model_stock",
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    params=(ParamSpec(name="filter_wise", scope="global", default=False, kind="bool",
                      doc="one interpolation ratio per row instead of per tensor"),),
    apply=_apply,
    base="required",
    min_inputs=2,
    passes=_passes,
    # scratch: base, average + one offset per input; float64 products run in cache-sized
    # blocks (stats.BLOCK); one spare temporary
    working_copies=lambda n: n + 2,
    temporaries=lambda n: 1,
    row_granularity=_granularity,
)

