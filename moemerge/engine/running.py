"""The running-sum stage (`methods.running`) as the pipeline's chunk kernel (`pma update`).

A float tensor's read buffer holds the step's snapshots' rows, then the previous sums' (fp64);
its output buffer gets the average (the output dtype), then the new sums, each at an aligned
offset. The stage runs over the whole chunk in one compiled pass (methods._running_fast, the
same bits), else on cache-sized blocks of the chunk with torch, as elementwise methods do. A tensor
written quantized (`--quantize`) gets its average as float32, turned into its stored parts
right after it (engine/requant.py, as a merge's), before the sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.engine.constants import ALIGN, BLOCK_ELEMS
from moemerge.engine.jobs import Segment
from moemerge.engine.requant import requantize
from moemerge.io.dtypes import itemsize, to_torch
from moemerge.methods._running_fast import fold_average
from moemerge.methods.running import SCRATCH, RunningStep
from moemerge.planner.plan import TensorPlan

__all__ = ["RunningKernel"]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningKernel:
    """`step` on every float tensor; `array` names the state array of (quantity, tensor)."""

    step: RunningStep
    array: Callable[[str, str], str]
    compiled: bool = True
    """Whether the compiled pass may run (numba's load costs ~0.75 s of CPU: small updates skip it)."""

    def _layout(self, t: TensorPlan, rows: int) -> list[int]:
        """Offsets of the average, then of each new sum, in the output buffer; then the end."""
        # t.out_bytes: the values, then (quantized) the parts that requantize writes after them
        offsets = [0, _aligned(t.out_bytes(rows))]
        n = rows * t.row_len
        for _ in self.step.quantities if self.step.writes_sums else ():
            offsets.append(offsets[-1] + _aligned(n * 8))
        return offsets

    def out_bytes(self, t: TensorPlan, rows: int) -> int:
        return self._layout(t, rows)[-1]

    def fill(self, t: TensorPlan, r0: int, r1: int, raws: list[torch.Tensor], slabs: list[torch.Tensor],
             out: torch.Tensor) -> list[Segment]:
        step = self.step
        n = (r1 - r0) * t.row_len
        qs = step.quantities
        snaps = raws[:step.snapshots]
        sums_in = dict(zip(qs, raws[step.snapshots:])) if step.reads_sums else {}
        offsets = self._layout(t, r1 - r0)
        avg_bytes = n * itemsize(t.out_dtype)
        avg = out[:avg_bytes].view(to_torch(t.out_dtype))
        sums_out = {q: out[off:off + n * 8].view(torch.float64)
                    for q, off in zip(qs if step.writes_sums else (), offsets[1:])}
        fast = self.compiled and fold_average(step, [x[:n] for x in snaps], {q: v[:n] for q, v in sums_in.items()}, sums_out, avg)
        for s in range(0, 0 if fast else n, BLOCK_ELEMS):  # the torch path: when the compiled one cannot
            e = min(n, s + BLOCK_ELEMS)
            scratch = [sl.view(torch.float64)[:e - s] for sl in slabs[:SCRATCH]]
            sums = step.fold([x[s:e] for x in snaps], {q: v[s:e] for q, v in sums_in.items()},
                             {q: v[s:e] for q, v in sums_out.items()}, scratch)
            avg[s:e].copy_(step.average(sums, scratch[0]))
        if t.quant is None:
            segs = [Segment(name=t.name, row=r0, offset=0, nbytes=avg_bytes)]
        else:
            segs = [Segment(name=name, row=row, offset=off, nbytes=nb)
                    for name, row, off, nb in requantize(t, r0, r1, out, avg_bytes)]
        segs += [Segment(name=self.array(q, t.name), row=r0, offset=off, nbytes=n * 8, aux=True)
                 for q, off in zip(sums_out, offsets[1:])]
        return segs
