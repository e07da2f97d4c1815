"""Element conversions shared by the numba kernels (`_select_numba`, `_linear_numba`,
`_running_numba`): how a stored element becomes a float and how a float becomes a stored
element. bf16 travels as its uint16 bits (numba has no bfloat16). Compiled only.

Two rules every kernel keeps, or LLVM leaves its loops scalar (measured 2-8x slower):
index arrays through slices (`a = src[b0:b0 + n]`, then `a[j]`), not `src[b0 + j]` (numba then
cannot drop its negative-index wraparound); and a kernel that divides takes
`error_model="numpy"` (IEEE division; python's model tests every divisor for zero, which no
kernel here can meet: divisors are counts, weights' sums or scales, never 0)."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["BLK", "f32", "bf16_rne"]

#: Elements per block of the blocked loops: a few [BLK] float32 buffers per input stay in L1/L2,
#: and each step is a simple loop over the block (LLVM vectorizes it).
BLK = 2048


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
def bf16_rne(v: Any) -> Any:
    """The bf16 bits (uint16) of float32 `v`, rounded to nearest, ties to even, as torch rounds
    every non-NaN value (NaN: not used; callers redo NaN results with torch)."""
    b = np.float32(v).view(np.uint32)
    b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return np.uint16(b >> np.uint32(16))
