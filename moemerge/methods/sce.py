"""sce: select high-variance positions, weight task vectors by energy, erase minority signs.

methods.md: v = Var_i(d_i) (population); keep the k = floor(select_topk * nnz(v)) largest
positions (one mask for all inputs); eta_i = mean(d_i^2) over the tensor, normalized;
e_i = sign consensus; out = b + sum(eta_i e_i d_i) / max(sum(eta_i e_i), 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods import _fused
from moemerge.methods._memo import ScratchMemo
from moemerge.methods._selection import Selection, Target, selection_passes
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams, check_range
from moemerge.methods.stats import exact_dot, exact_value

__all__ = ["SCE"]


#: Values left in the scratch buffers for the next pass over the same chunk: "deltas" (task
#: vectors in scratch 3 + i), "masked" (the same, multiplied by the selection mask), "var"
#: (their variance in scratch 1).
_memo = ScratchMemo(lambda n: n + 3)


def _deltas(chunk: Chunk) -> list[torch.Tensor]:
    out = [chunk.scratch(3 + i) for i in range(chunk.n_inputs)]
    if _memo.has(chunk, "deltas"):
        return out
    base = chunk.base(out=chunk.scratch(0))
    for i, d in enumerate(out):
        chunk.input(i, out=d)
        d.sub_(base)
    _memo.set(chunk, "deltas")
    return out


#: Elements per float64 block of `variance_into` (its temporaries: a few 512 KiB blocks).
_VAR_BLOCK = 1 << 16


def variance_into(deltas: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """sce's variance of the float32 task vectors `deltas`, elementwise, into float32 `out`:
    with each d_k widened to float64, S1 = sum d_k and S2 = sum d_k^2 in input order, and
    v = max(n S2 - S1^2, 0) / n^2 rounded once to float32 (the compiled kernel,
    `_select_numba._block_bits`, does the same operations).

    The sums are exact for bf16/f16 task vectors (and float32 ones of close magnitudes), so v
    then depends only on the values, not on their order or a common shift: positions whose
    variances are equal compare equal, and the top-k's tie rule (lowest flat index, methods.md)
    decides between them. A float32 mean-then-squares formula rounded such equal variances
    apart, which picked a different position at the threshold than the rule says.
    """
    n = len(deltas)
    flat_out = out.reshape(-1)
    flats = [d.reshape(-1) for d in deltas]
    total = flat_out.numel()
    for s in range(0, total, _VAR_BLOCK):
        e = min(s + _VAR_BLOCK, total)
        d = flats[0][s:e].double()
        s1 = d.clone()
        s2 = d.mul_(d)
        for f in flats[1:]:
            d = f[s:e].double()
            s1.add_(d)
            s2.add_(d.mul_(d))
        t = s2.mul_(n).sub_(s1.mul_(s1)).clamp_(min=0.0)  # rounding where the sums were not exact
        flat_out[s:e].copy_(t.div_(n * n))
    return out


def _chunk_variance(chunk: Chunk) -> torch.Tensor:
    """The variance of the chunk's task vectors in scratch 1."""
    if _memo.has(chunk, "var"):
        return chunk.scratch(1)
    deltas = _deltas(chunk)
    variance_into(deltas, chunk.scratch(1))
    _memo.add(chunk, "var")
    return chunk.scratch(1)


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
        return _chunk_variance(chunk)

    def share(values: int, zeros: int) -> int:  # the chunk's own k of its non-zero variances
        return math.floor(topk * (values - zeros))

    return selection_passes("sce", values, [Target("var", 0, q, share)], n, work=lambda c: c.scratch(2),
                            count_zeros=True, fused=_fused.variance_values)


def _masked(chunk: Chunk, stats: Mapping[str, Any], sel: Selection | None) -> list[torch.Tensor]:
    fast = _fused.sce_masked(chunk, stats, sel, _memo)  # compiled kernels (same bits)
    if fast is not None:
        return fast
    if sel is None:
        return _deltas(chunk)
    out = [chunk.scratch(3 + i) for i in range(chunk.n_inputs)]
    if _memo.has(chunk, "masked"):
        return out
    var = _chunk_variance(chunk)
    # variances are >= +0 (or NaN), so their patterns already order like |var|'s
    mask = sel.mask(stats, "var", var.view(torch.int32), chunk.row_start, out=chunk.scratch(2))  # 1.0/0.0
    for d in out:
        d.mul_(mask)
    _memo.set(chunk, "masked", "var")
    return out


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    sel = _selection(p, shape)

    def map_energy(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> list[int]:
        return [exact_dot(d, d) for d in _masked(chunk, stats, sel)]

    def reduce_energy(parts: Sequence[list[int]]) -> list[float]:
        n = math.prod(shape)
        return [exact_value(sum(pt[i] for pt in parts)) / n for i in range(len(parts[0]))]

    return (sel.passes if sel is not None else ()) + (StatPass(name="energy", map=map_energy, reduce=reduce_energy),)


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    sel = _selection(p, chunk.shape)
    fast = _fused.sce_apply(chunk, stats, sel, _memo)  # compiled kernels (same bits)
    if fast is not None:
        return fast
    deltas = _masked(chunk, stats, sel)
    _memo.clear()  # the scratch buffers are rewritten below
    energy = stats["energy"]
    total = math.fsum(energy)
    eta = [1.0 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    mixed = chunk.scratch(1)
    if len(deltas) == 1:
        mixed.copy_(deltas[0])
    else:
        torch.add(deltas[0], deltas[1], out=mixed)
    for d in deltas[2:]:
        mixed.add_(d)
    # sign consensus, 0 counted as +; a zero never matches: d agrees when sgn * d > 0 (exact);
    # masks as 1.0 / 0.0 floats: the same products as boolean ones, at a third of the cost
    sgn = chunk.scratch(0)  # the base is reloaded at the end
    torch.ge(mixed, 0, out=sgn)
    sgn.mul_(2.0)
    sgn.sub_(1.0)
    mixed.zero_()
    div = chunk.scratch(2)
    div.zero_()
    w = torch.empty_like(mixed)
    for e, d in zip(eta, deltas):
        torch.mul(d, sgn, out=w)
        torch.gt(w, 0, out=w)
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
    params=(ParamSpec(name="select_topk", scope="global", default=1.0, range=check_range(0, 1),
                      doc="fraction of non-zero-variance positions kept"),
            ParamSpec(name="int8_mask", scope="global", default=False, kind="bool",
                      doc="MergeKit memory option; no effect here")),
    apply=_apply,
    base="required",
    min_inputs=1,
    passes=_passes,
    # scratch: base, variance/mixed, mean/divisor + one delta per input (masks and bit patterns
    # live in them; float64 sums run in cache-sized blocks); temporaries: the consensus weight
    # and a spare
    working_copies=lambda n: n + 3,
    temporaries=lambda n: 2,
    ignored_params=("lambda", "weight"),
)
