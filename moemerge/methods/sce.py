"""sce: select high-variance positions, weight task vectors by energy, erase minority signs.

methods.md: v = Var_i(d_i) (population); keep the k = floor(select_topk * nnz(v)) largest
positions (one mask for all inputs); eta_i = mean(d_i^2) over the tensor, normalized;
e_i = sign consensus; out = b + sum(eta_i e_i d_i) / max(sum(eta_i e_i), 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moemerge.methods._selection import Selection, Target, selection_passes
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams, check_range
from moemerge.methods.stats import exact_row_sum, exact_value

__all__ = ["SCE"]


def _deltas(chunk: Chunk) -> list[torch.Tensor]:
    base = chunk.base(out=chunk.scratch(0))
    out = []
    for i in range(chunk.n_inputs):
        d = chunk.input(i, out=chunk.scratch(3 + i))
        d.sub_(base)
        out.append(d)
    return out


def _variance(deltas: list[torch.Tensor], out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Population variance over inputs, elementwise: mean((d_i - mean)^2)."""
    n = len(deltas)
    mean = tmp
    mean.copy_(deltas[0])
    for d in deltas[1:]:
        mean.add_(d)
    mean.div_(n)
    out.zero_()
    for d in deltas:
        diff = d - mean
        diff.mul_(diff)
        out.add_(diff)
    out.div_(n)
    return out


def _selection(p: TensorParams, shape: tuple[int, ...]) -> Selection | None:
    topk = float(p.glob.get("select_topk", 1.0))
    if topk >= 1:
        return None
    n = math.prod(shape)
    key = "sce:high"

    def q(stats: Mapping[str, Any]) -> int:
        nonzero = n - int(stats[key][-1])  # zeros of source 0 counted in pass 1
        return math.floor(topk * nonzero) if topk > 0 else 0

    def values(chunk: Chunk, stats: Mapping[str, Any], source: int) -> torch.Tensor:
        return _variance(_deltas(chunk), chunk.scratch(1), chunk.scratch(2))

    return selection_passes("sce", values, [Target("var", 0, q)], n)


def _masked(chunk: Chunk, stats: Mapping[str, Any], sel: Selection | None) -> list[torch.Tensor]:
    deltas = _deltas(chunk)
    if sel is not None:
        var = _variance(deltas, chunk.scratch(1), chunk.scratch(2))
        from moemerge.methods.stats import abs_bits

        mask = sel.mask(stats, "var", abs_bits(var), chunk.row_start)
        for d in deltas:
            d.mul_(mask)
    return deltas


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    sel = _selection(p, shape)

    def map_energy(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> list[int]:
        return [exact_row_sum(d.to(torch.float64) ** 2) for d in _masked(chunk, stats, sel)]

    def reduce_energy(parts: Sequence[list[int]]) -> list[float]:
        n = math.prod(shape)
        return [exact_value(sum(pt[i] for pt in parts)) / n for i in range(len(parts[0]))]

    return (sel.passes if sel is not None else ()) + (StatPass(name="energy", map=map_energy, reduce=reduce_energy),)


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    sel = _selection(p, chunk.shape)
    deltas = _masked(chunk, stats, sel)
    energy = stats["energy"]
    total = math.fsum(energy)
    eta = [1.0 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    mixed = chunk.scratch(1)
    mixed.copy_(deltas[0])
    for d in deltas[1:]:
        mixed.add_(d)
    positive = mixed >= 0  # sign consensus, 0 counted as +; a zero never matches
    mixed.zero_()
    div = chunk.scratch(2)
    div.zero_()
    for e, d in zip(eta, deltas):
        agree = torch.where(positive, d > 0, d < 0)
        w = agree.to(d.dtype)
        w.mul_(e)
        div.add_(w)
        d.mul_(w)
        mixed.add_(d)
    div.clamp_min_(1e-6)
    mixed.div_(div)
    mixed.add_(chunk.base(out=chunk.scratch(0)))
    return mixed


SCE = Method(
    name="sce",
    pretty_name="SCE",
    reference_url="https://arxiv.org/abs/2408.07990",
    params=(ParamSpec(name="select_topk", scope="global", default=1.0, check=check_range(0, 1),
                      doc="fraction of non-zero-variance positions kept"),
            ParamSpec(name="int8_mask", scope="global", default=False, kind="bool",
                      doc="MergeKit memory option; no effect here")),
    apply=_apply,
    base="required",
    min_inputs=1,
    passes=_passes,
    # scratch: base, variance/mixed, mean/divisor + one delta per input; temporaries: float64
    # squares for the energy sums, masks, bit patterns
    working_copies=lambda n: n + 3,
    temporaries=lambda n: 8,
    ignored_params=("lambda", "weight"),
)
