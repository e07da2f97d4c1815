"""arcee_fusion: take the other model's values where their importance is an outlier, else the base.

MergeKit 0.1.5 (mergekit/merge_methods/arcee_fusion.py), base b and one model x:
  p = softmax(x) + 1e-8, q = softmax(b) + 1e-8 along the last dim (a 1-D tensor is one vector);
  kl = sum(p log(p / q)) per vector; importance = |x - b| * kl (kl broadcast over its vector);
  q1, med, q3 = sorted importance at flat indices floor(f (n - 1)), f = 0.25, 0.5, 0.75;
  threshold = med + 1.5 (q3 - q1) (float32); out = b + (x - b) * [importance >= threshold].
Differs: MergeKit takes the quartiles of 1,000,000 elements drawn at random (with
replacement) when a tensor has more; we take them exactly over all n elements (streamed
selection, `_selection`), so big tensors are deterministic. kl is computed in float64 and a
negative rounding residue counts as 0 (KL divergence is never negative); MergeKit computes it
in the merge dtype, where for near-identical rows it cancels to ~1% relative error, so an
element whose importance lies within that error of the threshold may be taken by one and
not the other (tests/test_methods_mergekit3.py checks each such element on the goldens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._host import host_copy, on_host
from moemerge.methods._memo import ScratchMemo
from moemerge.methods._selection import Selection, Target, selection_passes
from moemerge.methods.base import Chunk, Method, StatPass, TensorParams
from moemerge.methods.stats import BLOCK, exact_row_sum, exact_value

__all__ = ["ARCEE_FUSION", "quartile_indices", "fusion_threshold"]

#: Added to both softmaxes before the log ratio (MergeKit's `eps`).
_SOFTMAX_EPS = 1e-8
_WORK = 4  # scratch: base, other model (then x - b), importance (float32 view), selection work

#: scratch 2 holds the chunk's importance ("imp") between passes over the same read
_memo = ScratchMemo(lambda n: _WORK)


def quartile_indices(n: int) -> tuple[int, int, int]:
    """Ascending flat indices of q1, median and q3 among n values: floor(f (n - 1)).

    The same integers as MergeKit's `(q * (n - 1)).long()` with float32 q (exact for n up
    to its 1,000,000-element sample). Example: quartile_indices(10) == (2, 4, 6).
    """
    m = max(n - 1, 0)
    return m // 4, m // 2, (3 * m) // 4


def fusion_threshold(q1: float, med: float, q3: float) -> float:
    """med + 1.5 (q3 - q1), rounded as MergeKit's float32 tensor arithmetic rounds it."""
    f = np.float32
    return float(f(med) + f(1.5) * (f(q3) - f(q1)))


def _np(t: torch.Tensor) -> np.ndarray:
    """A [rows, row_len] numpy view of a chunk tensor (host copy only off the CPU)."""
    a = host_copy(t.detach())
    return a.reshape(a.shape[0] if a.dim() else 1, -1).numpy()


def _softmax_eps(v: np.ndarray) -> np.ndarray:
    """softmax(v) + 1e-8 along the last axis, in float64 (a new array)."""
    a = v.astype(np.float64)
    a -= a.max(axis=1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=1, keepdims=True)  # numpy sums each row the same way wherever it sits
    a += _SOFTMAX_EPS
    return a


def _kl_rows(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(softmax(x) + eps || softmax(b) + eps) of every row, float64, in cache-sized row blocks."""
    rows, row_len = x.shape
    kl = np.empty(rows, np.float64)
    step = max(1, BLOCK // max(1, row_len))
    for r in range(0, rows, step):
        k = min(step, rows - r)
        p = _softmax_eps(x[r:r + k])
        q = _softmax_eps(b[r:r + k])
        np.divide(p, q, out=q)
        np.log(q, out=q)
        np.multiply(p, q, out=q)
        q.sum(axis=1, out=kl[r:r + k])
    return kl


def _fill_importance(x: np.ndarray, b: np.ndarray, kl: np.ndarray | float, out: np.ndarray) -> None:
    """out = float32(|x - b| * kl) (|x - b| rounded in the compute dtype, as the output's d)."""
    rows, row_len = x.shape
    step = max(1, BLOCK // max(1, row_len))
    for r in range(0, rows, step):
        k = min(step, rows - r)
        d = np.subtract(x[r:r + k], b[r:r + k])
        t = np.abs(d).astype(np.float64)
        if isinstance(kl, np.ndarray):
            t *= kl[r:r + k, None]
        else:
            t *= kl
        out[r:r + k] = t  # one rounding to float32


def _nonneg(kl: np.ndarray | float) -> np.ndarray | float:
    """KL >= 0 exactly; a rounding residue below 0 (or -0.0) becomes +0.0, so |d| kl >= +0."""
    if isinstance(kl, np.ndarray):
        return np.where(kl > 0, kl, 0.0)
    return kl if kl > 0 else 0.0


def _is_vector(shape: tuple[int, ...]) -> bool:
    return len(shape) <= 1


def _importance(chunk: Chunk, stats: Mapping[str, Any]) -> torch.Tensor:
    """The chunk's importance as float32 [rows, row_len] in scratch 2 (memoized per read)."""
    buf = chunk.scratch(2)
    rows = chunk.row_stop - chunk.row_start
    imp = buf.reshape(-1).view(torch.float32)[:rows * chunk.row_len].view(rows, chunk.row_len)
    if _memo.has(chunk, "imp"):
        return imp
    xn = _np(chunk.input(0, out=chunk.scratch(1)))
    bn = _np(chunk.base(out=chunk.scratch(0)))
    kl = _nonneg(stats["af:kl"] if _is_vector(chunk.shape) else _kl_rows(xn, bn))
    if on_host(imp):
        _fill_importance(xn, bn, kl, imp.numpy())
    else:
        host = np.empty((rows, chunk.row_len), np.float32)
        _fill_importance(xn, bn, kl, host)
        imp.copy_(torch.from_numpy(host))  # computed on the host: the same bits on every device
    _memo.set(chunk, "imp")
    return imp


# -- a 1-D tensor is one softmax vector spanning every chunk: its kl takes three passes --------

def _flat_blocks(n: int) -> Sequence[tuple[int, int]]:
    return [(s, min(n, s + BLOCK)) for s in range(0, n, BLOCK)]


def _map_max(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> tuple[float, float]:
    x = _np(chunk.input(0, out=chunk.scratch(1)))
    b = _np(chunk.base(out=chunk.scratch(0)))
    return float(x.max()), float(b.max())


def _max2(parts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return max(p[0] for p in parts), max(p[1] for p in parts)


def _exp_shifted(v: np.ndarray, s: int, e: int, m: float) -> np.ndarray:
    a = v[s:e].astype(np.float64)
    a -= m
    np.exp(a, out=a)
    return a


def _map_sum(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> list[int]:
    """Exact-sum partials of exp(x - max x) and exp(b - max b) (every element one addend)."""
    mx, mb = stats["af:max"]
    x = _np(chunk.input(0, out=chunk.scratch(1))).reshape(-1)
    b = _np(chunk.base(out=chunk.scratch(0))).reshape(-1)
    out = [0, 0]
    for s, e in _flat_blocks(x.size):
        out[0] += exact_row_sum(torch.from_numpy(_exp_shifted(x, s, e, mx).reshape(-1, 1)))
        out[1] += exact_row_sum(torch.from_numpy(_exp_shifted(b, s, e, mb).reshape(-1, 1)))
    return out


def _sum_partials(parts: Sequence[list[int]]) -> list[int]:
    return [sum(p[k] for p in parts) for k in range(len(parts[0]))]


def _map_kl(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> int:
    """Exact-sum partial of p log(p / q) with the whole vector's softmaxes."""
    mx, mb = stats["af:max"]
    sx, sb = stats["af:sum"]
    x = _np(chunk.input(0, out=chunk.scratch(1))).reshape(-1)
    b = _np(chunk.base(out=chunk.scratch(0))).reshape(-1)
    total = 0
    for s, e in _flat_blocks(x.size):
        pp = _exp_shifted(x, s, e, mx)
        pp /= sx
        pp += _SOFTMAX_EPS
        qq = _exp_shifted(b, s, e, mb)
        qq /= sb
        qq += _SOFTMAX_EPS
        np.divide(pp, qq, out=qq)
        np.log(qq, out=qq)
        np.multiply(pp, qq, out=qq)
        total += exact_row_sum(torch.from_numpy(qq.reshape(-1, 1)))
    return total


def _vector_passes() -> tuple[StatPass, ...]:
    return (
        StatPass(name="af:max", map=_map_max, reduce=_max2, combine=lambda a, b: _max2([a, b])),
        StatPass(name="af:sum", map=_map_sum, reduce=lambda parts: [exact_value(v) for v in _sum_partials(parts)]),
        StatPass(name="af:kl", map=_map_kl, reduce=lambda parts: exact_value(sum(parts)),
                 combine=lambda a, b: a + b),
    )


# -- quartiles: exact selection over the whole tensor ---------------------------------------------

_NAMES = ("q1", "med", "q3")


def _selection(shape: tuple[int, ...]) -> Selection:
    n = math.prod(shape)
    # the value at ascending index i is the (n - i)-th largest
    targets = [Target(name, 0, _constant(n - i)) for name, i in zip(_NAMES, quartile_indices(n))]
    return selection_passes("af", _values, targets, n, work=_work)


def _constant(q: int) -> Callable[[Mapping[str, Any]], int]:
    return lambda stats: q


def _values(chunk: Chunk, stats: Mapping[str, Any], source: int) -> torch.Tensor:
    return _importance(chunk, stats)


def _work(chunk: Chunk) -> torch.Tensor:
    return chunk.scratch(3)


def _map_min(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> float:
    return float(_importance(chunk, stats).min())


def _passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    out: tuple[StatPass, ...] = _vector_passes() if _is_vector(shape) else ()
    if 0 in quartile_indices(math.prod(shape)):  # n <= 4: selection says "all" for q = n, not the min
        out += (StatPass(name="af:min", map=_map_min, reduce=min, combine=min),)
    return out + _selection(shape).passes


def _quartiles(stats: Mapping[str, Any], shape: tuple[int, ...]) -> list[float]:
    thr = _selection(shape).thresholds(stats)
    out = []
    for name, i in zip(_NAMES, quartile_indices(math.prod(shape))):
        if i == 0:
            out.append(float(stats["af:min"]))
        else:
            out.append(float(np.array([thr[name].bits], np.int32).view(np.float32)[0]))
    return out


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    q1, med, q3 = _quartiles(stats, chunk.shape)
    threshold = fusion_threshold(q1, med, q3)
    imp = _importance(chunk, stats)
    mask = chunk.scratch(3)
    torch.ge(imp, threshold, out=mask)  # 1.0 / 0.0 in the compute dtype
    _memo.clear()  # scratch 0 and 1 are rewritten below; the importance is used up
    b = chunk.base(out=chunk.scratch(0))
    d = chunk.input(0, out=chunk.scratch(1))
    d.sub_(b)
    d.mul_(mask)
    d.add_(b)
    return d


ARCEE_FUSION = Method(
    name="arcee_fusion",
    pretty_name="Arcee Fusion",
    reference_url="https://arcee.ai",
    params=(),
    apply=_apply,
    base="required",
    min_inputs=1,
    max_inputs=1,
    passes=_passes,
    working_copies=lambda n: _WORK,
    # float64 softmax / log-ratio blocks (cache-sized unless one row is bigger) and the row kl
    temporaries=lambda n: 4,
)
