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
    acc = np.empty(col_block, np.float32)  # one scale block's sums: stays in L1 (measured:
    nans = 0                               # 2.3x the rate of summing whole rows, 3 inputs)
    for i in range(rows):
        r = row0 + i
        g = row_group[r]
        o = out[i]
        for j0 in range(0, cols, col_block):
            t = j0 // col_block
            m = min(cols, j0 + col_block) - j0
            a = acc[:m]
            for k in range(n):
                base = offs[k] + r * cols + j0
                c = flat[base:base + m]  # slices: no wraparound checks, so LLVM vectorizes
                s = scales[k, g, t]
                wk = w[k]
                if k == 0:
                    for j in range(m):
                        a[j] = np.float32(e4m3_value(c[j]) * s) * wk
                else:
                    for j in range(m):
                        a[j] = a[j] + np.float32(e4m3_value(c[j]) * s) * wk
            ob = o[j0:j0 + m]
            for j in range(m):
                v = a[j]
                nans += v != v
                ob[j] = to_out(v, out)
    return nans
