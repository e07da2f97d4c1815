"""Exact top-q selection over a whole tensor, as statistics passes (methods' shared part).

"The q largest values, ties broken by lowest flat index" for several targets at once (one
per input and threshold). Three passes: high-bits histograms, low-bits histograms inside
the chosen bin, then (only where the threshold value is tied) per-row counts of tied values
so that each chunk knows how many tied values came before it.

Integer temporaries (shifted bit patterns, comparison masks) go into a scratch buffer the
method lends (`work`), so a pass allocates nothing chunk-sized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods import _fused
from moemerge.methods._fused import Ranked
from moemerge.methods._host import host_copy, on_host
from moemerge.methods.base import Chunk, StatPass, TensorParams
from moemerge.methods.stats import (Threshold, high_histogram, low_histogram,
                                    pick_high_bin, pick_threshold)

__all__ = ["Target", "Selection", "selection_passes", "top_mask", "bool_view"]

#: values(chunk, stats, source) -> non-negative float32 values of that source for the chunk
Values = Callable[[Chunk, Mapping[str, Any], int], "torch.Tensor"]


@dataclass(frozen=True, slots=True)
class Target:
    """Select the `q(stats)` largest values of source `source` (q may depend on pass 1)."""

    name: str
    source: int
    q: Callable[[Mapping[str, Any]], int]


def _sum(parts: Sequence[Any]) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = {k: out[k] + p[k] for k in out}
    return out


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Bit patterns of values that are already non-negative (`Values` returns |x|): no copy."""
    return values.view(torch.int32)


def bool_view(buf: torch.Tensor, shape: Sequence[int], k: int = 0) -> torch.Tensor:
    """The k-th bool tensor of `shape` inside a (float32 or wider) scratch buffer."""
    n = math.prod(shape)
    flat = buf.reshape(-1).view(torch.uint8)
    if (k + 1) * n > flat.numel():
        raise ValueError(f"scratch buffer of {flat.numel()} bytes cannot hold bool mask {k} of {n}")
    return flat[k * n:(k + 1) * n].view(torch.bool).view(tuple(shape))


def selection_passes(prefix: str, values: Values, targets: Sequence[Target], n: int, *,
                     work: Callable[[Chunk], torch.Tensor], count_zeros: bool = False,
                     fused: Callable[[Chunk], Ranked | None] | None = None) -> Selection:
    """The passes selecting each target's q largest values among the n of a tensor.

    `work(chunk)` is a chunk-shaped float32 scratch buffer the passes may overwrite (it must
    not hold the values). `count_zeros`: also count each source's zeros in pass 1 (stored
    under key -1 - source of the high histograms; `Target.q` may use them). `fused(chunk)`:
    the same values as computed by the compiled kernels straight from the stored inputs
    (methods/_fused.py), or None where they cannot run (then `values`).
    """
    sources = sorted({t.source for t in targets})
    hi_key, lo_key, tie_key = f"{prefix}:high", f"{prefix}:low", f"{prefix}:ties"

    def ranked(chunk: Chunk) -> Ranked | None:
        return fused(chunk) if fused is not None else None

    def map_high(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> dict[int, torch.Tensor]:
        out = {}
        rk = ranked(chunk)
        if rk is not None:  # one pass over the stored rows for every source, on every core
            hist, zeros = _fused.histograms(rk, sources, [-1] * len(sources))
            for k, s in enumerate(sources):
                out[s] = torch.from_numpy(hist[k])
                if count_zeros:
                    out[-1 - s] = torch.tensor([int(zeros[k])])
            return out
        for s in sources:
            bits = _bits(values(chunk, stats, s))
            out[s] = high_histogram(bits, out=work(chunk).view(torch.int32))
            if count_zeros:  # count_nonzero is ~8x faster than summing a bool mask
                out[-1 - s] = torch.tensor([bits.numel() - int(torch.count_nonzero(bits))])
        return out

    # memos hold the object they were computed from, so a recycled id() can never match
    plan_memo: list[Any] = [None, None]

    def plan_targets(stats: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
        """target -> (q clipped to [0, n], high bin, count above the bin); bin -1 if trivial."""
        hist = stats[hi_key]
        if plan_memo[0] is hist:
            memoized: dict[str, tuple[int, int, int]] = plan_memo[1]
            return memoized
        plans = {}
        for t in targets:
            q = max(0, min(n, int(t.q(stats))))
            if q == 0 or q == n:
                plans[t.name] = (q, -1, 0)
            else:
                b, above = pick_high_bin(hist[t.source], q)
                plans[t.name] = (q, b, above)
        plan_memo[:] = [hist, plans]
        return plans

    def map_low(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> dict[str, torch.Tensor]:
        out = {}
        plans = plan_targets(stats)
        rk = ranked(chunk)
        if rk is not None:
            live = [t for t in targets if plans[t.name][1] >= 0]
            for t in targets:
                out[t.name] = torch.zeros(1, dtype=torch.int64)
            if live:
                hist, _ = _fused.histograms(rk, [t.source for t in live], [plans[t.name][1] for t in live])
                for k, t in enumerate(live):
                    out[t.name] = torch.from_numpy(hist[k])
            return out
        cache: dict[int, torch.Tensor] = {}
        for t in targets:
            q, b, _ = plans[t.name]
            if b < 0:
                out[t.name] = torch.zeros(1, dtype=torch.int64)
                continue
            if t.source not in cache:  # values may live in a shared scratch buffer: keep only one
                cache.clear()
                cache[t.source] = _bits(values(chunk, stats, t.source))
            out[t.name] = low_histogram(cache[t.source], b, out=work(chunk).view(torch.int32))
        return out

    def reduce_low(parts: Sequence[Any]) -> dict[str, Any]:
        summed: dict[str, Any] = _sum(list(parts))
        return summed

    memo: list[Any] = [None, None]

    def thresholds(stats: Mapping[str, Any]) -> dict[str, Threshold]:
        low = stats[lo_key]
        if memo[0] is low:
            memoized: dict[str, Threshold] = memo[1]
            return memoized
        plans = plan_targets(stats)
        out: dict[str, Threshold] = {}
        for t in targets:
            q, b, above = plans[t.name]
            if b < 0:  # select nothing (q = 0) or everything (q = n)
                out[t.name] = Threshold(bits=-1 if q == n else 0x7FFFFFFF, above=q, equal=0, q=q)
            else:
                out[t.name] = pick_threshold(stats[lo_key][t.name], b, above, q)
        memo[:] = [low, out]
        return out

    def map_ties(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {}
        thrs = thresholds(stats)
        rk = ranked(chunk)
        if rk is not None:
            live = [t for t in targets if thrs[t.name].needs_tiebreak]
            counts = _fused.tie_counts(rk, [t.source for t in live], [thrs[t.name].bits for t in live],
                                       chunk.row_stop - chunk.row_start) if live else None
            for t in targets:
                out[t.name] = None
            for k, t in enumerate(live):
                assert counts is not None
                out[t.name] = counts[k]
            return out
        for t in targets:
            thr = thrs[t.name]
            if not thr.needs_tiebreak:
                out[t.name] = None
                continue
            bits = _bits(values(chunk, stats, t.source))
            eq = torch.eq(bits, thr.bits, out=bool_view(work(chunk), bits.shape))
            if on_host(eq):  # numpy's per-row count is ~15x faster than torch.count_nonzero(dim=1) here
                out[t.name] = np.count_nonzero(eq.numpy().reshape(bits.shape[0], -1), axis=1).astype(np.int64)
            else:  # on a device: counted there, the small per-row counts brought back
                rowc = torch.count_nonzero(eq.reshape(bits.shape[0], -1), dim=1)
                out[t.name] = host_copy(rowc).numpy().astype(np.int64)
        return out

    def reduce_ties(parts: Sequence[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t in targets:
            rows = [p[t.name] for p in parts]
            if rows[0] is None:
                out[t.name] = None
            else:  # prefix[r] = tied values in rows before r
                out[t.name] = np.concatenate(([0], np.cumsum(np.concatenate(rows))))
        return out

    passes = (
        StatPass(name=hi_key, map=map_high, reduce=_sum, combine=lambda a, b: _sum([a, b])),
        StatPass(name=lo_key, map=map_low, reduce=reduce_low, combine=lambda a, b: _sum([a, b])),
        StatPass(name=tie_key, map=map_ties, reduce=reduce_ties,
                 needed=lambda stats: any(th.needs_tiebreak for th in thresholds(stats).values()),
                 when_skipped={t.name: None for t in targets}),
    )
    return Selection(passes=passes, thresholds=thresholds, tie_key=tie_key)


@dataclass(frozen=True, slots=True)
class Selection:
    """The passes of a selection, and how to read its result from the reduced stats."""

    passes: tuple[StatPass, ...]
    thresholds: Callable[[Mapping[str, Any]], dict[str, Threshold]]
    tie_key: str

    def mask(self, stats: Mapping[str, Any], name: str, bits: torch.Tensor, row_start: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
        return top_mask(bits, self.thresholds(stats)[name], stats[self.tie_key][name], row_start, out=out)


def top_mask(bits: torch.Tensor, thr: Threshold, ties: np.ndarray | None, row_start: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the chunk's elements among the selected q (same shape as `bits`).

    `bits` is [rows, ...] starting at tensor row `row_start`; `ties[r]` counts the values equal
    to the threshold in the tensor's rows before r. Rows before the one where the q-th tied
    value falls keep all their tied values, that row keeps its first few, later rows none.
    Bool, or `out`'s dtype: a float32 `out` gets 1.0/0.0 (multiplying by it is 3x faster
    than by a bool mask, and gives the same values).
    """
    mask = torch.empty_like(bits, dtype=torch.bool) if out is None else out
    if thr.q == 0:
        return mask.fill_(0)
    if thr.take_equal <= 0:
        return torch.gt(bits, thr.bits, out=mask)
    if thr.take_equal >= thr.equal:
        return torch.ge(bits, thr.bits, out=mask)
    assert ties is not None
    b2 = bits.reshape(bits.shape[0], -1)
    m2 = mask.view(b2.shape)
    cut = int(np.searchsorted(ties, thr.take_equal, side="left")) - 1  # ties[cut] < take <= ties[cut+1]
    local = cut - row_start
    full = min(max(local, 0), b2.shape[0])
    if full:
        torch.ge(b2[:full], thr.bits, out=m2[:full])
    if full < b2.shape[0]:
        torch.gt(b2[full:], thr.bits, out=m2[full:])
    if 0 <= local < b2.shape[0]:
        tied = torch.nonzero(b2[local] == thr.bits).reshape(-1)  # one row's tied positions
        m2[local].index_fill_(0, tied[:thr.take_equal - int(ties[cut])], 1)
    return mask
