"""The numba loop behind `engine/finite.py`: whether any element of a float array, seen as its
bits, has every exponent bit set (NaN or Inf). Imported only where numba is loaded already (a
statistics method's kernels); module level, so that `cache=True` keeps the machine code."""

from __future__ import annotations

from typing import Any

import numba

__all__ = ["nonfinite_k"]

#: Elements tested between two looks at the result: a NaN stops the scan within this many.
_STEP = 1 << 16


@numba.njit(nogil=True, cache=True)
def nonfinite_k(bits: Any, mask: Any) -> bool:
    """Whether some bits[j] & mask == mask (bits: a float array's unsigned-integer view, mask
    its exponent bits, of the same type). Loops over slices and an OR of the tests, so that
    LLVM vectorizes them (an early exit per element would not)."""
    n = bits.size
    for b0 in range(0, n, _STEP):
        blk = bits[b0:b0 + _STEP]
        hit = False
        for j in range(blk.size):
            hit |= (blk[j] & mask) == mask
        if hit:
            return True
    return False
