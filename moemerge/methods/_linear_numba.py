"""The numba loop behind `_fused.weighted_into` (linear and the PMA averages): imported only
when such a method computes on the CPU, as numba's import costs ~0.3 s. A module-level
function, so that `cache=True` keeps its machine code between runs (in __pycache__).

The loop repeats `_kernels.weighted_sum`'s float32 operations in the same order: acc = x_0 * w_0,
then acc = acc + x_i * w_i (a multiply, then an add: never fused), then one rounding to the
output type (bf16 round-to-nearest-even, as torch rounds every non-NaN value). NaN results
are only counted: the caller redoes such a chunk with torch, whose NaN bit patterns it keeps.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import overload

from moemerge.methods._numba_elems import BLK, bf16_rne, f32

__all__ = ["wsum_k"]


def to_out(v: Any, out: Any) -> Any:
    """float32 `v` as an element of array `out` (bf16 as uint16 bits, or float32)."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(to_out, inline="always")
def _to_out_impl(v: Any, out: Any) -> Any:
    if isinstance(out.dtype, types.Float):
        def same(v: Any, out: Any) -> Any:
            return np.float32(v)
        return same
    if isinstance(out.dtype, types.Integer):  # bf16 bits: round to nearest, ties to even (NaN: unused)
        def narrow(v: Any, out: Any) -> Any:
            return bf16_rne(v)
        return narrow
    return None


@numba.njit(nogil=True, cache=True)
def wsum_k(src: Any, ss: int, n: int, w: Any, j0: int, j1: int, out: Any) -> int:
    """out[j] = sum_i w[i] * x_i[j] for j in [j0, j1), x_i from src[i * ss]; returns how many
    results are NaN (their out elements are then not torch's)."""
    acc = np.empty(BLK, np.float32)
    nans = 0
    w0 = w[0]
    # loops over slices (not src[off + j]): numba then drops the negative-index wraparound and
    # LLVM vectorizes each loop, 8x faster here
    for b0 in range(j0, j1, BLK):
        length = min(BLK, j1 - b0)
        a = src[b0:b0 + length]
        for j in range(length):
            acc[j] = f32(a[j]) * w0
        for i in range(1, n):
            wi = w[i]
            a = src[i * ss + b0:i * ss + b0 + length]
            for j in range(length):
                acc[j] = acc[j] + f32(a[j]) * wi
        o = out[b0:b0 + length]
        for j in range(length):
            v = acc[j]
            nans += v != v
            o[j] = to_out(v, out)
    return nans
