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
    from moemerge.io.quant import _fp8_numba as nb

    return {"dequantize": nb.dequantize_k, "group_amax": nb.group_amax_k, "search": nb.search_k,
            "encode": nb.encode_k}


def _kernels() -> dict[str, Any] | None:
    global _KERNELS, _FAILED
    if _KERNELS is None and not _FAILED:
        try:
            _KERNELS = _build()
        except (ImportError, RuntimeError, OSError):  # no numba, or no writable cache directory
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
    k["dequantize"](codes, scales, row_group, col_block, out)


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
