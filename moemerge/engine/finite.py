"""The rule for NaN and Inf in inputs: statistics methods refuse them, naming tensor and model.

Elementwise methods (linear, task_arithmetic, nearswap, passthrough, the PMA averages, and the
generalized family at density 1) pass a non-finite element through to the same output element,
as MergeKit does. A method that takes whole-tensor statistics or ranks (slerp, nuslerp,
model_stock, multislerp, karcher, ties / breadcrumbs / dare / della below density 1, sce)
would spread one bad element over the whole tensor or crash mid-run, so the engine checks each
chunk when it first reads it and stops with a `MergeRuntimeError` instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import MergeRuntimeError
from moemerge.methods.base import Method
from moemerge.planner.plan import Plan, TensorPlan

__all__ = ["first_read", "check_finite"]

#: Elements checked per step: a bool temporary of 1 MiB, not one the size of the chunk.
_STEP = 1 << 20


def first_read(method: Method, t: TensorPlan, kind: str, k: int) -> bool:
    """Whether a job is the first read of its chunk by a statistics method (check it there)."""
    if method.elementwise or t.method == "copy":
        return False
    if kind == "all" or (kind == "pass" and k == 0):
        return True
    return kind == "apply" and not method.passes(t.params, t.shape)


#: A float is non-finite exactly when every exponent bit is set: per float type (by name: no
#: torch at import), its same-size integer type, the unsigned numpy view and the exponent bits.
_BITS = {"torch.bfloat16": ("int16", np.uint16, 0x7F80), "torch.float16": ("int16", np.uint16, 0x7C00),
         "torch.float32": ("int32", np.uint32, 0x7F800000), "torch.float64": ("int64", np.uint64, 0x7FF0000000000000)}


def _compiled_bad(flat: torch.Tensor) -> bool | None:
    """`_bad` by the compiled loop (`_finite_numba`, ~0.14 ns per bf16 element, numpy's bit test
    ~0.46) where numba is loaded already (a statistics method's kernels: the check never loads
    it) and on; None where it cannot run."""
    if "numba" not in sys.modules or os.environ.get("MOEMERGE_NO_NUMBA", "") not in ("", "0"):
        return None
    spec = _BITS.get(str(flat.dtype))
    if spec is None or not flat.is_contiguous():
        return None
    try:
        from moemerge.engine._finite_numba import nonfinite_k
    except (ImportError, RuntimeError, OSError):  # no numba, or no writable cache directory
        return None
    view, unsigned, mask = spec
    return bool(nonfinite_k(flat.view(getattr(torch, view)).numpy().view(unsigned), unsigned(mask)))


def _bad(x: torch.Tensor) -> bool:
    """Whether `x` holds a NaN or an Inf. numpy on the CPU: torch's CPU isfinite measured
    0.1-0.2 GiB/s here, numpy's 7 GiB/s (and the bit test on 16-bit floats about as fast);
    the compiled loop where numba is loaded, 3x faster again."""
    flat = x.reshape(-1)
    if flat.device.type != "cpu":
        return not bool(torch.isfinite(flat).all())
    compiled = _compiled_bad(flat)
    if compiled is not None:
        return compiled
    spec = _BITS.get(str(flat.dtype))
    mask = spec[2] if spec is not None and spec[0] == "int16" else None  # 16-bit: the bit test
    for s in range(0, flat.numel(), _STEP):
        block = flat[s:s + _STEP]
        if mask is not None:
            bits = block.view(torch.int16).numpy()
            if bool(np.any((bits & mask) == mask)):
                return True
            continue
        if block.dtype not in (torch.float32, torch.float64):  # fp8: rare, widen it
            block = block.float()
        if not bool(np.isfinite(block.numpy()).all()):
            return True
    return False


def check_finite(plan: Plan, method: Method, t: TensorPlan, raws: Sequence[torch.Tensor], r0: int, r1: int) -> None:
    """Raise if any input's rows [r0, r1) of `t` hold NaN or Inf (raws: sources_used order)."""
    for src, raw in zip(t.sources_used, raws):
        if raw.is_floating_point() and _bad(raw):
            where = f"rows {r0}-{r1 - 1} of " if (r0, r1) != (0, t.rows) else ""
            raise MergeRuntimeError(
                f"tensor `{t.name}`: {where}{plan.sources[src]} holds NaN or Inf; {method.name} takes "
                "whole-tensor statistics and refuses non-finite inputs (elementwise methods such as linear "
                "pass them through); repair or replace that checkpoint (the output was not committed)"
            )
