"""The numba loops behind `_fp8_kernels` (imported only when a quantized tensor is read or
written: numba's import and cached machine code cost ~1 s). Module-level functions, so that
`cache=True` keeps their machine code between runs (in __pycache__)."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["dequantize_k", "group_amax_k", "search_k", "encode_k"]


@numba.njit(nogil=True, cache=True)
def dequantize_k(codes: Any, lut: Any, scales: Any, row_group: Any, col_block: int, out: Any) -> None:
    n, cols = codes.shape
    for i in range(n):
        g = row_group[i]
        for j0 in range(0, cols, col_block):
            s = scales[g, j0 // col_block]
            for j in range(j0, min(cols, j0 + col_block)):
                out[i, j] = lut[codes[i, j]] * s  # float32 x float32: one rounding, as torch's mul

@numba.njit(nogil=True, cache=True)
def group_amax_k(values: Any, row_group: Any, m: int, col_block: int) -> Any:
    n, cols = values.shape
    tc = (cols + col_block - 1) // col_block
    amax = np.zeros((m, tc), dtype=np.float32)
    for i in range(n):
        g = row_group[i]
        for j0 in range(0, cols, col_block):
            a = np.float32(0.0)
            for j in range(j0, min(cols, j0 + col_block)):
                v = abs(values[i, j])
                if v > a or v != v:  # NaN sticks, as in torch's amax
                    a = v
                    if v != v:
                        break
            t = j0 // col_block
            if a > amax[g, t] or a != a:
                amax[g, t] = a
    return amax

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

@numba.njit(nogil=True, cache=True)
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

@numba.njit(nogil=True, cache=True)
def encode_k(values: Any, scales: Any, row_group: Any, col_block: int, fmax: Any, out: Any) -> None:
    n, cols = values.shape
    q = np.empty(min(cols, col_block), dtype=np.float32)
    for i in range(n):
        g = row_group[i]
        for j0 in range(0, cols, col_block):
            s = scales[g, j0 // col_block]
            e = min(cols, j0 + col_block)
            for j in range(j0, e):  # the division apart: a loop LLVM vectorizes
                q[j - j0] = values[i, j] / s
            for j in range(j0, e):
                out[i, j] = encode(q[j - j0], fmax)
