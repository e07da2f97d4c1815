"""The numba loop behind `engine/fused_fp8.py`: a weighted sum of block-FP8 inputs taken from
their codes and scales, with the bits of dequantizing each input to float32 (`io.quant._fp8`)
and then summing (`methods._linear_numba.wsum_k`). Imported only when such a merge runs;
module level, so that `cache=True` keeps the machine code between runs."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from moemerge.io.quant._fp8_numba import e4m3_value
from moemerge.methods._linear_numba import to_out

__all__ = ["fp8_wsum_k"]


@numba.njit(nogil=True, cache=True)
def fp8_wsum_k(flat: Any, offs: Any, cols: int, scales: Any, row_group: Any, col_block: int, w: Any,
               row0: int, out: Any) -> int:
    """out[i, j] = sum_k w[k] * (value(code_k[r, j]) * scale_k[row_group[r], j // col_block])
    for r = row0 + i, input k's codes (E4M3, uint8) row r at flat[offs[k] + r * cols]: each dequantized value
    rounded to float32 once (as `_fp8_numba.dequantize_k`), then acc = x_0 * w_0 and
    acc = acc + x_k * w_k in input order (a multiply, then an add: never fused), rounded once
    to `out`'s type (as `wsum_k`). Returns how many results are NaN (their out elements are
    then not torch's: the caller redoes the chunk from the dequantized values)."""
    n = offs.shape[0]
    rows = out.shape[0]
    acc = np.empty(cols, np.float32)
    nans = 0
    for i in range(rows):
        g = row_group[row0 + i]
        for k in range(n):
            base = offs[k] + (row0 + i) * cols
            wk = w[k]
            for j0 in range(0, cols, col_block):
                s = scales[k, g, j0 // col_block]
                e = min(cols, j0 + col_block)
                c = flat[base + j0:base + e]  # slices: no wraparound checks, so LLVM vectorizes
                a = acc[j0:e]
                if k == 0:
                    for j in range(e - j0):
                        a[j] = np.float32(e4m3_value(c[j]) * s) * wk
                else:
                    for j in range(e - j0):
                        a[j] = a[j] + np.float32(e4m3_value(c[j]) * s) * wk
        o = out[i]
        for j in range(cols):
            v = acc[j]
            nans += v != v
            o[j] = to_out(v, out)
    return nans
