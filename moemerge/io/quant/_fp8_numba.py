"""The numba loops behind `_fp8_kernels` (imported only when a quantized tensor is read or
written: numba's import and cached machine code cost ~1 s). Module-level functions, so that
`cache=True` keeps their machine code between runs (in __pycache__)."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["dequantize_k", "group_amax_k", "search_k", "encode_k"]


@numba.njit(nogil=True, cache=True, inline="always")
def e4m3_value(c: Any) -> Any:
    """The float32 value of E4M3 code `c` as torch converts it, from bits (no table lookup:
    a loop of these vectorizes): a normal code rebiased (exponent + 120, mantissa << 20), a
    subnormal one m * 2^-9 (exact), NaN (0x7f / 0xff) torch's 0x7ff00000 with the sign."""
    m = np.int32(c) & np.int32(0x7F)
    sign = (np.int32(c) & np.int32(0x80)) << np.int32(24)
    normal = (m << np.int32(20)) + np.int32(120 << 23)
    sub = np.float32(np.float32(m) * np.float32(2.0 ** -9)).view(np.int32)
    b = normal if m >= 8 else sub
    b = np.int32(0x7FF00000) if m == 0x7F else b
    return np.int32(b | sign).view(np.float32)


@numba.njit(nogil=True, cache=True)
def dequantize_k(codes: Any, scales: Any, row_group: Any, col_block: int, out: Any) -> None:
    n, cols = codes.shape
    for i in range(n):
        g = row_group[i]
        crow = codes[i]
        orow = out[i]
        for j0 in range(0, cols, col_block):
            s = scales[g, j0 // col_block]
            e = min(cols, j0 + col_block)
            c = crow[j0:e]  # slices: no wraparound checks, so LLVM vectorizes the loop
            o = orow[j0:e]
            for j in range(e - j0):
                o[j] = e4m3_value(c[j]) * s  # float32 x float32: one rounding, as torch's mul


@numba.njit(nogil=True, cache=True)
def group_amax_k(values: Any, row_group: Any, m: int, col_block: int) -> Any:
    """max |v| per group, as an integer max of the sign-cleared bits (the order of finite
    floats and inf; NaN's bits lie above inf's): a loop that vectorizes. A group with a NaN
    gets NaN (0x7fc00000; torch's amax gives some NaN: scales treat every NaN alike)."""
    n, cols = values.shape
    tc = (cols + col_block - 1) // col_block
    amax = np.zeros((m, tc), dtype=np.uint32)
    bits = values.view(np.uint32)
    for i in range(n):
        g = row_group[i]
        row = bits[i]
        for j0 in range(0, cols, col_block):
            e = min(cols, j0 + col_block)
            blk = row[j0:e]
            a = np.uint32(0)
            for j in range(e - j0):
                a = max(a, blk[j] & np.uint32(0x7FFFFFFF))
            t = j0 // col_block
            amax[g, t] = max(amax[g, t], a)
    for g in range(m):
        for t in range(tc):
            if amax[g, t] > np.uint32(0x7F800000):
                amax[g, t] = np.uint32(0x7FC00000)
    return amax.view(np.float32)


@numba.njit(nogil=True, cache=True, inline="always")
def encode(x: Any, fmax: Any) -> Any:
    """c10's fp8e4m3fn_from_fp32_value after the clamp `_fp8._encode` does, both roundings
    computed and one selected (branch-free); equal to torch on every float32 (tested)."""
    x = min(max(x, -fmax), fmax)  # NaN passes through (c10 then gives 0x7f)
    b = np.float32(x).view(np.uint32)
    sign = b & np.uint32(0x80000000)
    a = np.uint32(b ^ sign)
    # an fp8 subnormal: c10 rounds by a float32 add of 2^14 (denorm_mask 141 << 23)
    sub = np.uint32(np.float32(abs(np.float32(x)) + np.float32(16384.0)).view(np.uint32) - np.uint32(141 << 23))
    # a normal: rebias the exponent (7 - 127) and round to nearest even at bit 20
    nor = np.uint32((a + np.uint32(0xC4000000 + 0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20))
    r = sub if a < np.uint32(121 << 23) else nor
    r = np.uint32(0x7F) if a >= np.uint32(1087 << 20) else r
    return np.uint8((r | (sign >> np.uint32(24))) & np.uint32(0xFF))

@numba.njit(nogil=True, cache=True, error_model="numpy")
def search_k(values: Any, lut: Any, cands: Any, alive: Any, row_group: Any, col_block: int, fmax: Any) -> None:
    """alive[k, g, t] &= every value of group (g, t) is code * cands[k, g, t] exactly."""
    n, cols = values.shape
    ncand = cands.shape[0]
    for i in range(n):
        g = row_group[i]
        for j0 in range(0, cols, col_block):
            t = j0 // col_block
            for k in range(ncand):
                if not alive[k, g, t]:
                    continue
                s = cands[k, g, t]
                for j in range(j0, min(cols, j0 + col_block)):
                    v = values[i, j]
                    if lut[encode(v / s, fmax)] * s != v:
                        alive[k, g, t] = False
                        break

@numba.njit(nogil=True, cache=True, error_model="numpy")
def encode_k(values: Any, scales: Any, row_group: Any, col_block: int, fmax: Any, out: Any) -> None:
    """`encode` of values / scale for every element, its steps as loops over arrays (bits
    through array views): LLVM vectorizes each, ~5x the element-by-element `encode`."""
    n, cols = values.shape
    q = np.empty(cols, dtype=np.float32)
    t = np.empty(cols, dtype=np.float32)
    qb = q.view(np.uint32)
    tb = t.view(np.uint32)
    for i in range(n):
        g = row_group[i]
        v = values[i]
        o = out[i]
        for j0 in range(0, cols, col_block):
            s = scales[g, j0 // col_block]
            e = min(cols, j0 + col_block)
            vv = v[j0:e]
            qq = q[j0:e]
            for j in range(e - j0):
                qq[j] = min(max(vv[j] / s, -fmax), fmax)  # NaN passes through (c10 then gives 0x7f)
        for j in range(cols):
            t[j] = abs(q[j]) + np.float32(16384.0)
        for j in range(cols):  # as `encode`, from the bits of q and of |q| + 2^14
            b = qb[j]
            sign = b & np.uint32(0x80000000)
            a = np.uint32(b ^ sign)
            sub = np.uint32(tb[j] - np.uint32(141 << 23))
            nor = np.uint32((a + np.uint32(0xC4000000 + 0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1)))
                            >> np.uint32(20))
            r = sub if a < np.uint32(121 << 23) else nor
            r = np.uint32(0x7F) if a >= np.uint32(1087 << 20) else r
            o[j] = np.uint8((r | (sign >> np.uint32(24))) & np.uint32(0xFF))
