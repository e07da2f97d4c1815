"""The numba loops behind `_fused` (imported only when a statistics method computes on the CPU:
numba's import and cached machine code cost ~1 s). Module-level functions, so that
`cache=True` keeps their machine code between runs (in __pycache__).

Every loop repeats the torch path's float32 operations one by one, in the same order, on
float32 operands (literals and parameters are float32 values: a float64 operand would round
differently), and never fuses a multiply and an add: each element gets the same bits.
`src` is [sources, elements] (bf16 bit patterns as uint16, or float32); row 0 is the base.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["hist_k", "ties_k", "generalized_k", "delta_mask_k", "magprune_k", "sce_k", "sce_apply_k"]

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def f32(v: Any) -> Any:
    """The float32 value of a stored element (bf16 bits as uint16, or a float32)."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(f32, inline="always")
def _f32_impl(v: Any) -> Any:
    if isinstance(v, types.Float):
        def same(v: Any) -> Any:
            return np.float32(v)
        return same
    if isinstance(v, types.Integer):  # bf16: its bits are the high half of the float32's
        def widen(v: Any) -> Any:
            return np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
        return widen
    return None


@numba.njit(nogil=True, cache=True, inline="always")
def _abs_bits(x: Any) -> Any:
    return np.int64(np.float32(abs(x)).view(np.int32))


@numba.njit(nogil=True, cache=True, inline="always")
def _variance(src: Any, j: int, n: int, nf: Any) -> Any:
    """sce's population variance of the task vectors at element j, as `sce._variance` orders it."""
    b = f32(src[0, j])
    mean = f32(src[1, j]) - b
    for k in range(2, n + 1):
        mean = mean + (f32(src[k, j]) - b)
    mean = mean / nf
    t = (f32(src[1, j]) - b) - mean
    out = t * t
    for k in range(2, n + 1):
        t = (f32(src[k, j]) - b) - mean
        out = out + t * t
    return out / nf


@numba.njit(nogil=True, cache=True, inline="always")
def _value_bits(src: Any, row: int, j: int, n: int, nf: Any) -> Any:
    """Bit pattern of the ranked value: |x_row - base| (row >= 1), or the variance (row 0)."""
    if row == 0:
        return np.int64(np.float32(_variance(src, j, n, nf)).view(np.int32))
    return _abs_bits(f32(src[row, j]) - f32(src[0, j]))


@numba.njit(nogil=True, cache=True)
def hist_k(src: Any, n: int, trow: Any, tbin: Any, j0: int, j1: int, hist: Any, zeros: Any) -> None:
    """Add to hist[t] the high 16 bits (tbin[t] < 0) of target t's values, or the low 16 bits
    of those whose high bits are tbin[t]; zeros[t] += count of zero values."""
    nf = np.float32(n)
    nt = trow.shape[0]
    for j in range(j0, j1):
        for t in range(nt):
            v = _value_bits(src, trow[t], j, n, nf)
            if v == 0:
                zeros[t] += 1
            b = tbin[t]
            if b < 0:
                hist[t, v >> 16] += 1
            elif (v >> 16) == b:
                hist[t, v & 0xFFFF] += 1


@numba.njit(nogil=True, cache=True)
def ties_k(src: Any, n: int, trow: Any, thr: Any, r0: int, r1: int, row_len: int, counts: Any) -> None:
    """counts[t, r] = values equal to thr[t] in chunk row r (r0 <= r < r1) of target t."""
    nf = np.float32(n)
    for t in range(trow.shape[0]):
        for r in range(r0, r1):
            c = 0
            for j in range(r * row_len, (r + 1) * row_len):
                if _value_bits(src, trow[t], j, n, nf) == thr[t]:
                    c += 1
            counts[t, r] = c


@numba.njit(nogil=True, cache=True, inline="always")
def _splitmix(key: Any, pos: int) -> Any:
    z = key + np.uint64(pos) * _GOLDEN
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True, inline="always")
def _keep(bits: Any, grow: int, thr: Any, cut: Any, take: Any, seen: Any, k: int, m: int) -> bool:
    """Whether `bits` (chunk row with global index grow) is among target (k, m)'s selected:
    above the threshold, or tied with it in a row before the cut row, or among the cut row's
    first take[k, m] tied values (seen[k, m] counts those met so far)."""
    th = thr[k, m]
    if bits > th:
        return True
    if bits != th:
        return False
    c = cut[k, m]
    if grow < c:
        return True
    if grow > c:
        return False
    s = seen[k, m]
    seen[k, m] = s + 1
    return s < take[k, m]


@numba.njit(nogil=True, cache=True)
def generalized_k(src: Any, r0: int, r1: int, row_len: int, row_start: int, kind: Any,
                  thr: Any, cut: Any, take: Any, key: Any, bound: Any, mask: Any, fac: Any, use_fac: Any,
                  w: Any, consensus: bool, normalize: bool, div: Any, lam: Any, use_lam: bool, out: Any) -> None:
    """`generalized._Family.apply` for chunk rows [r0, r1), into out (flat float32).

    kind[i]: 0 keep all, 1 top-q target (i, 0), 2 outliers (target (i, 0) and not (i, 1)),
    3 random (z < bound[i] of stream key[i]; bound 0: none, max: all), 4 `mask[i]` (uint8).
    """
    n = w.shape[0]
    d = np.empty(n, np.float32)
    seen = np.zeros(thr.shape, np.int64)
    for r in range(r0, r1):
        grow = row_start + r
        seen[:] = 0
        for j in range(r * row_len, (r + 1) * row_len):
            b = f32(src[0, j])
            for i in range(n):
                x = f32(src[i + 1, j]) - b
                kd = kind[i]
                if kd != 0:
                    if kd == 1:
                        keep = _keep(_abs_bits(x), grow, thr, cut, take, seen, i, 0)
                    elif kd == 2:
                        bits = _abs_bits(x)
                        keep = _keep(bits, grow, thr, cut, take, seen, i, 0)
                        lo = _keep(bits, grow, thr, cut, take, seen, i, 1)
                        keep = keep and not lo
                    elif kd == 3:
                        keep = _splitmix(key[i], (row_start + r) * row_len + (j - r * row_len)) < bound[i]
                    else:
                        keep = mask[i, j] != 0
                    x = x * (_ONE if keep else _ZERO)
                if use_fac[i]:
                    x = x * fac[i]
                d[i] = x * w[i]
            mixed = d[0] if n == 1 else d[0] + d[1]
            for i in range(2, n):
                mixed = mixed + d[i]
            if consensus:
                sgn = (_ONE if mixed >= _ZERO else _ZERO) * _TWO - _ONE
                mixed = _ZERO
                dv = _ZERO
                for i in range(n):
                    agree = _ONE if d[i] * sgn > _ZERO else _ZERO
                    mixed = mixed + d[i] * agree
                    dv = dv + agree * w[i]
                dv = dv + (_ONE if dv == _ZERO else _ZERO)
                if normalize:
                    mixed = mixed / dv
            elif normalize:
                mixed = mixed / div
            if use_lam:
                mixed = mixed * lam
            out[j] = mixed + b


@numba.njit(nogil=True, cache=True)
def delta_mask_k(src: Any, row: int, j0: int, j1: int, start: int, key: Any, bound: Any, mode: int,
                 d: Any, mask: Any) -> None:
    """d[j] = x - base of source `row`; mask[j]: mode 1 splitmix64(key, start + j) < bound,
    2 all, 3 none, 0 left as it is (flat elements [j0, j1))."""
    for j in range(j0, j1):
        d[j] = f32(src[row, j]) - f32(src[0, j])
        if mode == 1:
            mask[j] = _splitmix(key, start + j) < bound
        elif mode == 2:
            mask[j] = True
        elif mode == 3:
            mask[j] = False


@numba.njit(nogil=True, cache=True)
def magprune_k(src: Any, row: int, m: int, inner: int, g0: int, g1: int, key: Any, start: int,
               pe: float, te: float, mask: Any) -> None:
    """DELLA's keep-mask of source `row` for groups [g0, g1) of the [groups, m, inner] layout:
    a uniform draw below pe + te * rank / (m - 1), ranks of |d| along m (stable ascending)."""
    vals = np.empty(m, np.float32)
    scale = 1.0 / 9007199254740992.0  # 2^-53
    for o in range(g0, g1):
        for c in range(inner):
            base = o * m * inner + c
            for k in range(m):
                j = base + k * inner
                vals[k] = abs(f32(src[row, j]) - f32(src[0, j]))
            order = np.argsort(vals, kind="mergesort")
            for k in range(m):
                r = np.float64(k) / np.float64(m - 1) if m > 1 else 0.5
                j = base + order[k] * inner
                u = np.float64(_splitmix(key, start + j) >> np.uint64(11)) * scale
                mask[j] = u < r * te + pe


@numba.njit(nogil=True, cache=True)
def sce_k(src: Any, n: int, r0: int, r1: int, row_len: int, row_start: int, sel: bool,
          thr: Any, cut: Any, take: Any, deltas: Any) -> None:
    """sce's masked task vectors: d_i = x_i - base, times the variance selection's 1.0/0.0."""
    nf = np.float32(n)
    seen = np.zeros(thr.shape, np.int64)
    for r in range(r0, r1):
        seen[:] = 0
        for j in range(r * row_len, (r + 1) * row_len):
            m = _ONE
            if sel:
                v = np.int64(np.float32(_variance(src, j, n, nf)).view(np.int32))
                m = _ONE if _keep(v, row_start + r, thr, cut, take, seen, 0, 0) else _ZERO
            b = f32(src[0, j])
            for i in range(n):
                x = f32(src[i + 1, j]) - b
                deltas[i][j] = x * m if sel else x


@numba.njit(nogil=True, cache=True)
def sce_apply_k(src: Any, deltas: Any, eta: Any, j0: int, j1: int, out: Any) -> None:
    """sce's sign consensus and energy-weighted mix of the masked task vectors, plus the base."""
    n = eta.shape[0]
    floor = np.float32(1e-6)
    for j in range(j0, j1):
        mixed = deltas[0][j]  # torch: d0 + d1, then + d2 ...: the same additions in order
        for i in range(1, n):
            mixed = mixed + deltas[i][j]
        sgn = (_ONE if mixed >= _ZERO else _ZERO) * _TWO - _ONE
        mixed = _ZERO
        dv = _ZERO
        for i in range(n):
            d = deltas[i][j]
            wt = (_ONE if d * sgn > _ZERO else _ZERO) * eta[i]
            dv = dv + wt
            mixed = mixed + d * wt
        dv = floor if dv < floor else dv
        out[j] = mixed / dv + f32(src[0, j])
