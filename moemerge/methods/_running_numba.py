"""The numba loops behind `methods._running_fast` (`pma update`'s running sums): imported only
when an update computes, as numba's import costs ~0.3 s. Module-level functions, so that
`cache=True` keeps their machine code between runs (in __pycache__).

Each loop repeats `methods.running`'s float64 operations on one element, in the same order and
never fused (no fastmath: no FMA contraction, IEEE division): snapshot values widened exactly
to float64 (bf16 as its uint16 bits), W' = (W - S) + M_new * n, S' = (S + M_new) - M_old,
E' = E * (1 - alpha) + M * alpha, the average one division, then rounded to the output type as
torch rounds a float64 (to float32 first, then bf16 round-to-nearest-even). NaN averages are
only counted: the caller then redoes the chunk with torch, whose NaN bit patterns it keeps.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import overload

from moemerge.methods._numba_elems import bf16_rne, f32

__all__ = ["copy_k", "include_k", "slide_k", "ema_k", "avg_k"]


def widen(v: Any) -> Any:
    """The float64 value of a stored element (bf16 bits as uint16, float32 or float64)."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(widen, inline="always")
def _widen_impl(v: Any) -> Any:
    if isinstance(v, types.Float):
        def same(v: Any) -> Any:
            return np.float64(v)
        return same
    if isinstance(v, types.Integer):  # bf16 bits
        def bits(v: Any) -> Any:
            return np.float64(f32(v))
        return bits
    return None


def narrow(v: Any, out: Any) -> Any:
    """float64 `v` as an element of array `out` (bf16 bits as uint16, float32 or float64)."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(narrow, inline="always")
def _narrow_impl(v: Any, out: Any) -> Any:
    if isinstance(out.dtype, types.Float):
        if out.dtype.bitwidth == 32:
            def to32(v: Any, out: Any) -> Any:
                return np.float32(v)
            return to32

        def to64(v: Any, out: Any) -> Any:
            return v
        return to64
    if isinstance(out.dtype, types.Integer):  # bf16 via float32, ties to even (NaN: not used)
        def to16(v: Any, out: Any) -> Any:
            return bf16_rne(np.float32(v))
        return to16
    return None


@numba.njit(nogil=True, cache=True)
def copy_k(x: Any, s: Any) -> None:
    """s = x (a window's first snapshot: every sum starts as it)."""
    for j in range(s.size):
        s[j] = widen(x[j])


@numba.njit(nogil=True, cache=True)
def include_k(x: Any, s: Any, w: Any, position: int, wma: bool) -> None:
    """Snapshot x at `position` (2...) of a window into S (and W): W += x * position; S += x."""
    p = np.float64(position)
    if wma:
        for j in range(s.size):
            m = widen(x[j])
            w[j] = w[j] + m * p
            s[j] = s[j] + m
    else:
        for j in range(s.size):
            s[j] = s[j] + widen(x[j])


@numba.njit(nogil=True, cache=True, error_model="numpy")
def slide_k(new: Any, old: Any, s_src: Any, w_src: Any, s_dst: Any, w_dst: Any, n: int, wma: bool,
            div: int, avg: Any, do_avg: bool) -> int:
    """One window slide from (s_src, w_src) into (s_dst, w_dst) (may be the same arrays):
    W' = (W - S) + new * n, S' = (S + new) - old; with `do_avg` the average (W' or S') / div
    into `avg`. Returns how many averages are NaN."""
    nf, d = np.float64(n), np.float64(div)
    nans = 0
    if wma:
        for j in range(s_dst.size):
            m = widen(new[j])
            s = s_src[j]
            w = (w_src[j] - s) + m * nf
            s = (s + m) - widen(old[j])
            w_dst[j] = w
            s_dst[j] = s
            if do_avg:
                q = w / d
                nans += q != q
                avg[j] = narrow(q, avg)
    elif do_avg:
        for j in range(s_dst.size):
            s = (s_src[j] + widen(new[j])) - widen(old[j])
            s_dst[j] = s
            q = s / d
            nans += q != q
            avg[j] = narrow(q, avg)
    else:
        for j in range(s_dst.size):
            s_dst[j] = (s_src[j] + widen(new[j])) - widen(old[j])
    return nans


@numba.njit(nogil=True, cache=True, error_model="numpy")
def ema_k(x: Any, e_src: Any, e_dst: Any, alpha: float, beta: float, avg: Any, do_avg: bool) -> int:
    """E' = E * beta + x * alpha (beta = 1 - alpha as the caller computed it), from e_src into
    e_dst (may be the same); with `do_avg` E' into `avg`. Returns how many are NaN."""
    nans = 0
    for j in range(e_dst.size):
        e = e_src[j] * beta + widen(x[j]) * alpha
        e_dst[j] = e
        if do_avg:
            nans += e != e
            avg[j] = narrow(e, avg)
    return nans


@numba.njit(nogil=True, cache=True, error_model="numpy")
def avg_k(src: Any, div: int, avg: Any) -> int:
    """avg = src / div (div 1: src as it is), rounded to avg's type; returns the NaN count."""
    d = np.float64(div)
    nans = 0
    for j in range(src.size):
        q = src[j] / d
        nans += q != q
        avg[j] = narrow(q, avg)
    return nans
