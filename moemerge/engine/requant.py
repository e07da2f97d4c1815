"""Requantize a chunk on its way out: the merged float32 rows in an output buffer become the
rows of each stored part (codes, scales) right after them, with fresh scales (`--quantize`)."""

from __future__ import annotations

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.io.quant_out import Segment, quantize_into
from moemerge.planner.plan import TensorPlan

__all__ = ["requantize"]


def requantize(t: TensorPlan, r0: int, r1: int, out: torch.Tensor, nbytes: int) -> list[Segment]:
    """Quantize rows [r0, r1) of `t`, whose float32 values fill `out[:nbytes]`, into `out`
    after them; return the parts' segments `(name, first part row, offset, bytes)` to write."""
    assert t.quant is not None
    values = out[:nbytes].view(torch.float32).view(r1 - r0, t.row_len)
    amax = None
    if t.quant.codec.needs_amax(t.quant.spec):  # one scale spans the tensor: planned as one chunk
        if (r0, r1) != (0, t.rows):
            raise AssertionError(f"`{t.name}`: a per-tensor scale needs the whole tensor in one chunk")
        amax = float(values.abs().max()) if values.numel() else 0.0
    return quantize_into(t.quant, values, r0, r1, out, nbytes, amax=amax)
