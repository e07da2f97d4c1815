"""The numba loops behind `_fused` (imported only when a statistics method computes on the CPU:
numba's import and cached machine code cost ~1 s). Module-level functions, so that
`cache=True` keeps their machine code between runs (in __pycache__).

Every loop repeats the torch path's float32 operations one by one, in the same order, on
float32 operands (literals and parameters are float32 values: a float64 operand would round
differently), and never fuses a multiply and an add: each element gets the same bits.
`src` holds every source's elements (bf16 bit patterns as uint16, or float32), source s from
s * ss (one flat array: loops over it vectorize); source 0 is the base.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from moemerge.methods._linear_numba import to_out
from moemerge.methods._numba_elems import BLK, f32

__all__ = ["hist_k", "window_k", "ties_k", "generalized_k", "delta_mask_k", "magprune_k", "sce_k", "sce_apply_k"]

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True, inline="always")
def _abs_bits(x: Any) -> Any:
    return np.int64(np.float32(abs(x)).view(np.int32))


#: Counts a histogram's sub-copies take before they are added into it (int32 copies: < 2^31)
_FLUSH = 1 << 30


@numba.njit(nogil=True, cache=True, error_model="numpy")
def hist_k(src: Any, ss: int, n: int, trow: Any, tbin: Any, j0: int, j1: int, hist: Any, zeros: Any) -> None:
    """Add to hist[t] the high 16 bits (tbin[t] < 0) of target t's values, or the low 16 bits
    of those whose high bits are tbin[t]; zeros[t] += count of zero values. The high-bits
    counts go to four interleaved copies first (consecutive values mostly share a bin: one
    copy would wait on its own last store), added into hist at the end."""
    mean = np.empty(BLK, np.float64)  # sce's variance: the sums S1, S2 in float64
    acc = np.empty(BLK, np.float64)
    bits = np.empty(BLK, np.int32)
    nt = trow.shape[0]
    sub = np.zeros((nt, 4, hist.shape[1]), np.int32)
    pending = 0
    for b0 in range(j0, j1, BLK):
        length = min(BLK, j1 - b0)
        for t in range(nt):
            _block_bits(src, ss, trow[t], b0, length, n, mean, acc, bits)
            b = tbin[t]
            z = 0
            for j in range(length):
                z += bits[j] == 0
            zeros[t] += z
            if b < 0:
                h0, h1, h2, h3 = sub[t, 0], sub[t, 1], sub[t, 2], sub[t, 3]
                q = length - length % 4
                for j in range(0, q, 4):
                    h0[bits[j] >> 16] += 1
                    h1[bits[j + 1] >> 16] += 1
                    h2[bits[j + 2] >> 16] += 1
                    h3[bits[j + 3] >> 16] += 1
                for j in range(q, length):
                    h0[bits[j] >> 16] += 1
            else:
                for j in range(length):
                    v = bits[j]
                    if (v >> 16) == b:
                        hist[t, v & 0xFFFF] += 1
        pending += length
        if pending >= _FLUSH or b0 + BLK >= j1:
            for t in range(nt):
                if tbin[t] < 0:
                    for c in range(4):
                        for i in range(hist.shape[1]):
                            hist[t, i] += sub[t, c, i]
            sub[:] = 0
            pending = 0


@numba.njit(nogil=True, cache=True, error_model="numpy")
def window_k(src: Any, ss: int, n: int, trow: Any, wlo: Any, nb: Any, j0: int, j1: int, hist: Any) -> None:
    """hist[t, h - wlo[t], low 16 bits] += 1 for target t's values whose high 16 bits h lie in
    [wlo[t], wlo[t] + nb[t]): the low-bits histograms of a window of high bins, in one sweep
    (a block none of whose values is in the window is passed over after one vectorized test)."""
    mean = np.empty(BLK, np.float64)  # sce's variance: the sums S1, S2 in float64
    acc = np.empty(BLK, np.float64)
    bits = np.empty(BLK, np.int32)
    for b0 in range(j0, j1, BLK):
        length = min(BLK, j1 - b0)
        for t in range(trow.shape[0]):
            _block_bits(src, ss, trow[t], b0, length, n, mean, acc, bits)
            lo = np.int32(wlo[t])
            cnt = np.uint32(nb[t])
            hit = np.int32(0)
            for j in range(length):  # unsigned: below lo wraps to above cnt
                hit |= np.int32(np.uint32((bits[j] >> 16) - lo) < cnt)
            if hit == 0:
                continue
            for j in range(length):
                v = bits[j]
                h = np.uint32((v >> 16) - lo)
                if h < cnt:
                    hist[t, h, v & 0xFFFF] += 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def ties_k(src: Any, ss: int, n: int, trow: Any, thr: Any, r0: int, r1: int, row_len: int, counts: Any) -> None:
    """counts[t, r] = values equal to thr[t] in chunk row r (r0 <= r < r1) of target t."""
    mean = np.empty(BLK, np.float64)  # sce's variance: the sums S1, S2 in float64
    acc = np.empty(BLK, np.float64)
    bits = np.empty(BLK, np.int32)
    for t in range(trow.shape[0]):
        th = thr[t]
        for r in range(r0, r1):
            c = 0
            for b0 in range(r * row_len, (r + 1) * row_len, BLK):
                length = min(BLK, (r + 1) * row_len - b0)
                _block_bits(src, ss, trow[t], b0, length, n, mean, acc, bits)
                for j in range(length):
                    c += bits[j] == th
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
    return bool(s < take[k, m])


@numba.njit(nogil=True, cache=True, inline="always")
def _target_mask(dst: Any, bits: Any, length: int, grow: int, thr: Any, cut: Any, take: Any, seen: Any,
                 k: int, m: int) -> None:
    """dst = 1.0/0.0 membership of target (k, m) (see `_keep`) of values with these bit
    patterns: one compare per element, except in the cut row, whose tied values are counted
    in flat order (seen[k, m])."""
    c = cut[k, m]
    th = thr[k, m]
    if grow < c:
        for j in range(length):
            dst[j] = _ONE if bits[j] >= th else _ZERO
    elif grow > c:
        for j in range(length):
            dst[j] = _ONE if bits[j] > th else _ZERO
    else:
        for j in range(length):
            dst[j] = _ONE if _keep(bits[j], grow, thr, cut, take, seen, k, m) else _ZERO


@numba.njit(nogil=True, cache=True, inline="always")
def _block_bits(src: Any, ss: int, row: int, b0: int, length: int, n: int, mean: Any, acc: Any,
                bits: Any) -> None:
    """bits[j] = pattern of the ranked value at element b0 + j: |x_row - base| (row >= 1), or
    (row 0) sce's variance of the task vectors as `sce.variance_into` computes it: with the
    float32 task vectors d_k widened to float64, S1 = sum d_k and S2 = sum d_k^2 in input order,
    v = float32(max(n S2 - S1^2, 0) / n^2) (`mean` holds S1, `acc` S2, both float64)."""
    base = src[b0:b0 + length]
    if row > 0:
        x = src[row * ss + b0:row * ss + b0 + length]
        for j in range(length):
            bits[j] = np.float32(abs(f32(x[j]) - f32(base[j]))).view(np.int32)
        return
    x = src[ss + b0:ss + b0 + length]
    for j in range(length):
        d = np.float64(f32(x[j]) - f32(base[j]))
        mean[j] = d
        acc[j] = d * d
    for k in range(2, n + 1):
        x = src[k * ss + b0:k * ss + b0 + length]
        for j in range(length):
            d = np.float64(f32(x[j]) - f32(base[j]))
            mean[j] = mean[j] + d
            acc[j] = acc[j] + d * d
    nd = np.float64(n)
    nn = nd * nd
    for j in range(length):
        t = nd * acc[j] - mean[j] * mean[j]
        if t < 0.0:  # rounding where the sums were not exact: a variance is never negative
            t = 0.0
        bits[j] = np.float32(t / nn).view(np.int32)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def generalized_k(src: Any, ss: int, r0: int, r1: int, row_len: int, row_start: int, kind: Any,
                  thr: Any, cut: Any, take: Any, key: Any, bound: Any, mask: Any, fac: Any, use_fac: Any,
                  w: Any, consensus: bool, normalize: bool, div: Any, lam: Any, use_lam: bool, out: Any) -> int:
    """`generalized._Family.apply` for chunk rows [r0, r1), into out (flat: float32, or bf16 as
    its uint16 bits, rounded as torch rounds), in blocks of BLK elements, each step one loop
    over the block doing every operation it can for an element (they vectorize; the loops are
    memory-bound, so fewer of them is faster). Returns how many results are NaN (their out
    elements are then not torch's: the caller redoes the chunk into float32).

    kind[i]: 0 keep all, 1 top-q target (i, 0), 2 outliers (target (i, 0) and not (i, 1)),
    3 random (splitmix64 < bound[i] of stream key[i]), 4 `mask[i]` (bool).
    Multiplying by a mask's 1.0 or by a factor 1.0 gives the same bits (a NaN result is redone
    anyway), so every input takes the same steps: ((d * keep) * factor) * weight.
    """
    n = w.shape[0]
    d = np.empty(n * BLK, np.float32)
    mk = np.empty(BLK, np.float32)
    m2 = np.empty(BLK, np.float32)
    bits = np.empty(BLK, np.int32)
    mixed = np.empty(BLK, np.float32)
    sgn = np.empty(BLK, np.float32)
    dv = np.empty(BLK, np.float32)
    seen = np.zeros(thr.shape, np.int64)
    nans = 0
    for r in range(r0, r1):
        grow = row_start + r
        seen[:] = 0
        for b0 in range(r * row_len, (r + 1) * row_len, BLK):
            length = min(BLK, (r + 1) * row_len - b0)
            base = src[b0:b0 + length]
            for i in range(n):
                di = d[i * BLK:i * BLK + length]
                x = src[(i + 1) * ss + b0:(i + 1) * ss + b0 + length]
                kd = kind[i]
                f = fac[i] if use_fac[i] else _ONE
                wi = w[i]
                if kd == 1 or kd == 2:
                    for j in range(length):
                        v = f32(x[j]) - f32(base[j])
                        di[j] = v
                        bits[j] = np.float32(abs(v)).view(np.int32)
                    _target_mask(mk, bits, length, grow, thr, cut, take, seen, i, 0)
                    if kd == 2:  # above the low cut: dropped (the gamma largest)
                        _target_mask(m2, bits, length, grow, thr, cut, take, seen, i, 1)
                        for j in range(length):
                            mk[j] = _ONE if mk[j] != _ZERO and m2[j] == _ZERO else _ZERO
                    for j in range(length):
                        di[j] = ((di[j] * mk[j]) * f) * wi
                elif kd == 3:
                    ki, bi = key[i], bound[i]
                    start = row_start * row_len + b0
                    for j in range(length):
                        keep = _ONE if _splitmix(ki, start + j) < bi else _ZERO
                        di[j] = (((f32(x[j]) - f32(base[j])) * keep) * f) * wi
                elif kd == 4:
                    mi = mask[i, b0:b0 + length]
                    for j in range(length):
                        keep = _ONE if mi[j] else _ZERO
                        di[j] = (((f32(x[j]) - f32(base[j])) * keep) * f) * wi
                else:
                    for j in range(length):
                        di[j] = ((f32(x[j]) - f32(base[j])) * f) * wi
            # torch: d0 + d1, then + d2 ...: the same additions in order
            d0 = d[0:length]
            if n == 1:
                for j in range(length):
                    mixed[j] = d0[j]
            else:
                d1 = d[BLK:BLK + length]
                for j in range(length):
                    mixed[j] = d0[j] + d1[j]
            for i in range(2, n):
                di = d[i * BLK:i * BLK + length]
                for j in range(length):
                    mixed[j] = mixed[j] + di[j]
            if consensus:
                for j in range(length):
                    sgn[j] = (_ONE if mixed[j] >= _ZERO else _ZERO) * _TWO - _ONE
                for i in range(n):
                    di = d[i * BLK:i * BLK + length]
                    wi = w[i]
                    if i == 0:
                        for j in range(length):
                            agree = _ONE if di[j] * sgn[j] > _ZERO else _ZERO
                            mixed[j] = _ZERO + di[j] * agree
                            dv[j] = _ZERO + agree * wi
                    else:
                        for j in range(length):
                            agree = _ONE if di[j] * sgn[j] > _ZERO else _ZERO
                            mixed[j] = mixed[j] + di[j] * agree
                            dv[j] = dv[j] + agree * wi
            o = out[b0:b0 + length]
            for j in range(length):
                v = mixed[j]
                if consensus:
                    q = dv[j] + (_ONE if dv[j] == _ZERO else _ZERO)
                    if normalize:
                        v = v / q
                elif normalize:
                    v = v / div
                if use_lam:
                    v = v * lam
                v = v + f32(base[j])
                nans += v != v
                o[j] = to_out(v, out)
    return nans


@numba.njit(nogil=True, cache=True)
def delta_mask_k(src: Any, ss: int, row: int, j0: int, j1: int, start: int, key: Any, bound: Any, mode: int,
                 d: Any, mask: Any) -> None:
    """d[j] = x - base of source `row`; mask[j]: mode 1 splitmix64(key, start + j) < bound,
    2 all, 3 none, 0 left as it is (flat elements [j0, j1))."""
    x = src[row * ss + j0:row * ss + j1]
    base = src[j0:j1]
    dd = d[j0:j1]
    mm = mask[j0:j1]
    for j in range(j1 - j0):
        dd[j] = f32(x[j]) - f32(base[j])
    if mode == 1:
        for j in range(j1 - j0):
            mm[j] = _splitmix(key, start + j0 + j) < bound
    elif mode == 2:
        mm[:] = True
    elif mode == 3:
        mm[:] = False


@numba.njit(nogil=True, cache=True, error_model="numpy")
def magprune_k(src: Any, ss: int, row: int, m: int, inner: int, g0: int, g1: int, key: Any, start: int,
               pe: float, te: float, mask: Any) -> None:
    """DELLA's keep-mask of source `row` for groups [g0, g1) of the [groups, m, inner] layout:
    a uniform draw below pe + te * rank / (m - 1), ranks of |d| along m (stable ascending)."""
    # |d| >= 0 orders like its bit pattern: a stable LSD radix sort of the patterns (four 8-bit
    # digits) gives the order torch's argsort(stable=True) gives, ties by position
    bits = np.empty(m, np.uint32)
    bits2 = np.empty(m, np.uint32)
    pos = np.empty(m, np.int64)
    pos2 = np.empty(m, np.int64)
    count = np.empty(257, np.int64)
    scale = 1.0 / 9007199254740992.0  # 2^-53
    for o in range(g0, g1):
        for c in range(inner):
            base = o * m * inner + c
            for k in range(m):
                j = base + k * inner
                bits[k] = np.float32(abs(f32(src[row * ss + j]) - f32(src[j]))).view(np.uint32)
                pos[k] = k
            for shift in range(0, 32, 8):
                sh = np.uint32(shift)
                count[:] = 0
                for k in range(m):
                    count[np.int64((bits[k] >> sh) & np.uint32(0xFF)) + 1] += 1
                if count[1:].max() == m:  # one digit value: the pass keeps the order
                    continue
                for q in range(1, 257):
                    count[q] += count[q - 1]
                for k in range(m):
                    dg = np.int64((bits[k] >> sh) & np.uint32(0xFF))
                    at = count[dg]
                    count[dg] = at + 1
                    bits2[at] = bits[k]
                    pos2[at] = pos[k]
                bits, bits2 = bits2, bits
                pos, pos2 = pos2, pos
            for k in range(m):
                r = np.float64(k) / np.float64(m - 1) if m > 1 else 0.5
                j = base + pos[k] * inner
                u = np.float64(_splitmix(key, start + j) >> np.uint64(11)) * scale
                mask[j] = u < r * te + pe


@numba.njit(nogil=True, cache=True, error_model="numpy")
def sce_k(src: Any, ss: int, n: int, r0: int, r1: int, row_len: int, row_start: int, sel: bool,
          thr: Any, cut: Any, take: Any, deltas: Any) -> None:
    """sce's masked task vectors: d_i = x_i - base, times the variance selection's 1.0/0.0."""
    seen = np.zeros(thr.shape, np.int64)
    mean = np.empty(BLK, np.float64)  # sce's variance: the sums S1, S2 in float64
    acc = np.empty(BLK, np.float64)
    bits = np.empty(BLK, np.int32)
    mk = np.empty(BLK, np.float32)
    for r in range(r0, r1):
        seen[:] = 0
        for b0 in range(r * row_len, (r + 1) * row_len, BLK):
            length = min(BLK, (r + 1) * row_len - b0)
            if sel:
                _block_bits(src, ss, 0, b0, length, n, mean, acc, bits)
                _target_mask(mk, bits, length, row_start + r, thr, cut, take, seen, 0, 0)
            base = src[b0:b0 + length]
            for i in range(n):
                di = deltas[i][b0:b0 + length]
                x = src[(i + 1) * ss + b0:(i + 1) * ss + b0 + length]
                if sel:
                    for j in range(length):
                        di[j] = (f32(x[j]) - f32(base[j])) * mk[j]
                else:
                    for j in range(length):
                        di[j] = f32(x[j]) - f32(base[j])


@numba.njit(nogil=True, cache=True, error_model="numpy")
def sce_apply_k(src: Any, ss: int, deltas: Any, eta: Any, j0: int, j1: int, out: Any) -> None:
    """sce's sign consensus and energy-weighted mix of the masked task vectors, plus the base."""
    n = eta.shape[0]
    floor = np.float32(1e-6)
    mixed = np.empty(BLK, np.float32)
    sgn = np.empty(BLK, np.float32)
    dv = np.empty(BLK, np.float32)
    for b0 in range(j0, j1, BLK):
        length = min(BLK, j1 - b0)
        d0 = deltas[0][b0:b0 + length]
        for j in range(length):
            mixed[j] = d0[j]  # torch: d0 + d1, then + d2 ...: the same additions in order
        for i in range(1, n):
            di = deltas[i][b0:b0 + length]
            for j in range(length):
                mixed[j] = mixed[j] + di[j]
        for j in range(length):
            sgn[j] = (_ONE if mixed[j] >= _ZERO else _ZERO) * _TWO - _ONE
            mixed[j] = _ZERO
            dv[j] = _ZERO
        for i in range(n):
            di = deltas[i][b0:b0 + length]
            e = eta[i]
            for j in range(length):
                wt = (_ONE if di[j] * sgn[j] > _ZERO else _ZERO) * e
                dv[j] = dv[j] + wt
                mixed[j] = mixed[j] + di[j] * wt
        base = src[b0:b0 + length]
        o = out[b0:b0 + length]
        for j in range(length):
            v = floor if dv[j] < floor else dv[j]
            o[j] = mixed[j] / v + f32(base[j])
