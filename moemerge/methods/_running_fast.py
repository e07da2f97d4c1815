"""`RunningStep.fold` and its average over a whole chunk in one compiled pass per step
(`methods._running_numba`), with the bits of the torch path (tests/test_running_fast.py).

`fold_average` returns False when it cannot run: numba missing or off (MOEMERGE_NO_NUMBA=1),
snapshots other than bf16/float32/float64, an average other than bf16/float32/float64, tensors
not in host memory, minus-sqrt, or a NaN average (torch keeps NaN bit patterns the loop does
not promise). The caller then runs the torch path over the same chunk; the inputs are never
written here, so it starts from what was read.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moemerge.methods._host import kernel_view

if TYPE_CHECKING:
    import torch

    from moemerge.methods.running import RunningStep

__all__ = ["available", "fold_average"]

_KERNELS: list[Any] = []


def _kernels() -> Any:
    """The compiled module, imported on first use; None without numba (or a cache directory)."""
    if not _KERNELS:
        try:
            _KERNELS.append(importlib.import_module("moemerge.methods._running_numba"))
        except (ImportError, RuntimeError, OSError):
            _KERNELS.append(None)
    return _KERNELS[0]


def available() -> bool:
    """Whether the compiled loops can run (numba importable, not switched off)."""
    return os.environ.get("MOEMERGE_NO_NUMBA", "") in ("", "0") and _kernels() is not None


def _np(t: torch.Tensor) -> np.ndarray | None:
    """A host tensor's elements as numpy (bf16 as uint16 bits); None for other dtypes/devices."""
    import torch

    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    if t.dtype in (torch.bfloat16, torch.float32, torch.float64):
        return kernel_view(t)
    return None


def fold_average(step: RunningStep, snaps: Sequence[torch.Tensor], sums_in: Mapping[str, torch.Tensor],
                 sums_out: Mapping[str, torch.Tensor], avg: torch.Tensor) -> bool:
    """`step.fold` into `sums_out`, then `step.average` rounded into `avg`, for whole flat chunks
    (fp64 sums); False: not done (see the module docstring), nothing promised about the outputs."""
    from moemerge.methods.running import DIVISORS

    if step.method == "minus-sqrt" or (step.method == "ema" and step.alpha is None) or not available():
        return False
    got = [_np(t) for t in (*snaps, *sums_in.values(), *sums_out.values(), avg)]
    arrays = [v for v in got if v is not None]
    if len(arrays) != len(got):
        return False
    xs, a = arrays[:len(snaps)], arrays[-1]
    ins = dict(zip(sums_in, arrays[len(snaps):len(snaps) + len(sums_in)]))
    outs = dict(zip(sums_out, arrays[len(snaps) + len(sums_in):-1]))
    k = _kernels()
    div = DIVISORS[step.method](step.window)
    if step.mode == "output":
        q = "E" if step.method == "ema" else "W" if step.method == "wma" else "S"
        return int(k.avg_k(ins[q], div, a)) == 0
    ema, wma = step.method == "ema", step.method == "wma"
    s = outs["E" if ema else "S"]
    w = outs["W"] if wma else s  # unused unless wma
    if step.mode == "build":
        for i, x in enumerate(xs):
            if i == 0:
                for v in outs.values():
                    k.copy_k(x, v)
            elif ema:
                k.ema_k(x, s, s, float(step.alpha or 0.0), 1.0 - float(step.alpha or 0.0), a, False)
            else:
                k.include_k(x, s, w, i + 1, wma)
        return int(k.avg_k(w if wma else s, div, a)) == 0
    if ema:
        alpha = float(step.alpha or 0.0)
        src = ins["E"]
        if not xs:
            np.copyto(s, src)
        for i, x in enumerate(xs):
            last = i == len(xs) - 1
            nans = k.ema_k(x, src, s, alpha, 1.0 - alpha, a, last)
            src = s
            if last:
                return int(nans) == 0
        return int(k.avg_k(s, div, a)) == 0
    s_src, w_src = ins["S"], ins["W"] if wma else ins["S"]
    g = step.growing
    if g or not xs:  # the window fills (as a build adds), or nothing entered: from a copy
        for q, v in outs.items():
            np.copyto(v, ins[q])
        s_src, w_src = s, w
        for j, x in enumerate(xs[:g]):
            k.include_k(x, s, w, step.window - g + j + 1, wma)
    pairs = len(xs[g:]) // 2
    for i in range(pairs):
        last = i == pairs - 1
        nans = k.slide_k(xs[g + i], xs[g + pairs + i], s_src, w_src, s, w, step.window, wma, div, a, last)
        s_src, w_src = s, w
        if last:
            return int(nans) == 0
    return int(k.avg_k(w if wma else s, div, a)) == 0
