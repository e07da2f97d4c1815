"""Compiled (numba) loops for FP8 E4M3 scale groups: dequantize, group amax, exact-scale search
and encode, each one pass over a band, giving the same bytes as `_fp8`'s torch expressions.

torch's CPU fp8 <-> f32 casts and the `_inexact` search run a few full-band temporaries each
(60-160 M values/s); these loops run ~1 G values/s on one core, with no temporaries. They are
serial and release the GIL (`nogil`): the engine's read threads dequantize bands of several
inputs at once, so the cores are used without a second thread pool fighting them (numba's
default `workqueue` layer also aborts on concurrent parallel calls from several threads).

`available()` is False without numba (or with MOEMERGE_NO_NUMBA=1): `_fp8` then runs torch.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["available", "dequantize", "group_amax", "quantize_codes"]

_KERNELS: dict[str, Any] | None = None
_FAILED = False


def _build() -> dict[str, Any]:
    import numba
    import numpy as np

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
        """c10's fp8e4m3fn_from_fp32_value after the clamp `_fp8._encode` does (NaN-free)."""
        if x > fmax:
            x = fmax
        elif x < -fmax:
            x = -fmax
        # numba widens integer arithmetic to 64 bits: work in int64, mask to c10's uint32 / uint8
        bits = np.int64(np.float32(x).view(np.uint32))
        sign = bits & 0x80000000
        bits ^= sign
        if bits >= (1087 << 20):
            res = np.int64(0x7F)
        elif bits < (121 << 23):  # an fp8 subnormal: c10 rounds by a float32 add of 2^14
            f = np.uint32(bits).view(np.float32) + np.uint32(141 << 23).view(np.float32)
            res = np.int64(np.float32(f).view(np.uint32)) - (141 << 23)
        else:
            bits += ((7 - 127) << 23) + 0x7FFFF + ((bits >> 20) & 1)
            res = bits >> 20
        return np.uint8((res | (sign >> 24)) & 0xFF)

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
        for i in range(n):
            g = row_group[i]
            for j0 in range(0, cols, col_block):
                s = scales[g, j0 // col_block]
                for j in range(j0, min(cols, j0 + col_block)):
                    out[i, j] = encode(values[i, j] / s, fmax)

    return {"dequantize": dequantize_k, "group_amax": group_amax_k, "search": search_k, "encode": encode_k}


def _kernels() -> dict[str, Any] | None:
    global _KERNELS, _FAILED
    if _KERNELS is None and not _FAILED:
        try:
            _KERNELS = _build()
        except ImportError:
            _FAILED = True
    return _KERNELS


def available() -> bool:
    """Whether the compiled loops can run (numba importable, not switched off)."""
    return os.environ.get("MOEMERGE_NO_NUMBA", "") in ("", "0") and _kernels() is not None


def _lut() -> Any:
    import torch

    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


_LUT: Any = None


def lut() -> Any:
    """float32[256]: each E4M3 code's value, as torch converts it (NaN codes included)."""
    global _LUT
    if _LUT is None:
        _LUT = _lut()
    return _LUT


def dequantize(codes: Any, scales: Any, row_group: Any, col_block: int, out: Any) -> None:
    """out[i, j] = value(codes[i, j]) * scales[row_group[i], j // col_block] (numpy arrays:
    codes uint8 [n, cols], scales/out float32, row_group int64)."""
    k = _kernels()
    assert k is not None
    k["dequantize"](codes, lut(), scales, row_group, col_block, out)


def group_amax(values: Any, row_group: Any, m: int, col_block: int) -> Any:
    """float32 [m, ceil(cols / col_block)]: max |v| per group (0 for a group with no rows)."""
    k = _kernels()
    assert k is not None
    return k["group_amax"](values, row_group, m, col_block)


def quantize_codes(values: Any, cands: Any, ok: Any, row_group: Any, col_block: int, fmax: float, out: Any) -> Any:
    """Pick each group's scale and encode: the first candidate `cands[k]` (k in order) with
    `ok[k]` that reproduces every value of the group exactly, else `cands[0]`; write the codes
    (uint8 [n, cols]) into `out` and return the chosen float32 scales [m, tc]."""
    import numpy as np

    k = _kernels()
    assert k is not None
    f = np.float32(fmax)
    chosen = cands[0].copy()
    if ok.any():
        alive = ok.copy()
        k["search"](values, lut(), cands, alive, row_group, col_block, f)
        for c in range(cands.shape[0] - 1, -1, -1):  # the first candidate that holds wins
            chosen = np.where(alive[c], cands[c], chosen)
    k["encode"](values, chosen, row_group, col_block, f, out)
    return chosen
