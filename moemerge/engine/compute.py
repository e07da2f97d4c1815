"""One chunk's math: typed views of a read buffer, the method's apply, copies of integer tensors.

No threads and no storage here: the pipeline hands in a filled read buffer and gets back a
filled output buffer, whatever executor runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import MergeRuntimeError
from moemerge.io.dtypes import itemsize, to_torch
from moemerge.methods.base import Method
from moemerge.engine.constants import ALIGN, BLOCK_ELEMS
from moemerge.planner.plan import Plan, TensorPlan

_log = logging.getLogger(__name__)
_over_budget_said: list[str] = []  # the first tensor the warning named (said once a process)

__all__ = ["ALIGN", "ChunkView", "segments", "typed_views", "scratch_2d", "copy_equal", "apply_into"]


def segments(t: TensorPlan, r0: int, r1: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of each source's rows in a read buffer, aligned."""
    out = []
    pos = 0
    for dt in t.in_dtypes:
        n = (r1 - r0) * t.row_len * itemsize(dt)
        out.append((pos, n))
        pos += -(-n // ALIGN) * ALIGN
    return out


class ChunkView:
    """The `Chunk` the methods see: typed views of the read buffer, converted on demand."""

    def __init__(
        self, t: TensorPlan, raws: Sequence[torch.Tensor], scratch: Sequence[torch.Tensor],
        r0: int, r1: int, compute: torch.dtype, in_cast: torch.dtype | None,
        out: torch.Tensor | None = None,
    ) -> None:
        self.name = t.name
        self.shape = t.shape
        self.row_start = r0
        self.row_stop = r1
        self.row_len = t.row_len
        self.n_inputs = len(t.inputs)
        self.compute_dtype = compute
        self._has_base = self.has_base = t.base is not None
        self._raws = raws
        self._scratch = scratch
        self._extra: dict[int, torch.Tensor] = {}
        self._in_cast = in_cast
        self._out = out

    def _convert(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self._in_cast is not None and x.dtype != self._in_cast:
            x = x.to(self._in_cast)  # MergeKit's `dtype`: inputs are cast to it when read
        if out is None:
            return x.to(self.compute_dtype, copy=True)
        out.copy_(x)
        return out

    def input(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._convert(self._raws[i + (1 if self._has_base else 0)], out)

    def base(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self._has_base:
            raise RuntimeError(f"tensor `{self.name}`: this method has no base model")
        return self._convert(self._raws[0], out)

    def scratch(self, k: int) -> torch.Tensor:
        if k < len(self._scratch):
            return self._scratch[k]
        # beyond the planned buffers: a plan sized for compiled loops (Plan.compiled_sizing)
        # whose chunk took the torch path after all; correct first, so allocated, and said once
        extra = self._extra.get(k)
        if extra is None:
            if not _over_budget_said:
                _over_budget_said.append(self.name)
                _log.warning("tensor `%s`: the torch path took more compute buffers than planned for the "
                             "compiled loops; allocated beyond --memory-budget", self.name)
            like = self._scratch[0] if self._scratch else None
            extra = self._extra[k] = (torch.empty_like(like) if like is not None else
                                      torch.empty(self.row_stop - self.row_start, self.row_len, dtype=self.compute_dtype))
        return extra

    def stored(self) -> tuple[torch.Tensor, ...] | None:
        """Every source's rows as stored (base first), for kernels that convert as they
        compute (methods/_fused.py); None when inputs are cast on reading (MergeKit's `dtype`)
        to a type that rounds them (float32 and float64 hold every bf16/fp16/float32 value)."""
        cast = self._in_cast
        if cast is not None and cast not in (torch.float32, torch.float64) and any(r.dtype != cast for r in self._raws):
            return None
        return tuple(self._raws)

    def output(self) -> torch.Tensor | None:
        """The output rows ([rows, row_len], the output's dtype) for kernels that round as they
        compute (methods/_fused.py): a method that fills it returns it from `apply`, and the
        engine then copies nothing. None where the engine gives none (elementwise blocks)."""
        return self._out


def typed_views(t: TensorPlan, buf: torch.Tensor, r0: int, r1: int) -> list[torch.Tensor]:
    return [buf[off:off + n].view(to_torch(dt)) for (off, n), dt in zip(segments(t, r0, r1), t.in_dtypes)]


def scratch_2d(slabs: list[torch.Tensor], comp: torch.dtype, r0: int, r1: int, t: TensorPlan) -> list[torch.Tensor]:
    n = (r1 - r0) * t.row_len
    return [s.view(comp)[:n].view(r1 - r0, t.row_len) for s in slabs] if n else []


def copy_equal(t: TensorPlan, raws: list[torch.Tensor], plan: Plan) -> torch.Tensor:
    """Non-floating tensors are copied when equal in every input (methods.md), else an error."""
    first = raws[0].view(torch.uint8)
    for src, r in zip(t.sources_used[1:], raws[1:]):
        if not torch.equal(first, r.view(torch.uint8)):
            raise MergeRuntimeError(
                f"tensor `{t.name}` ({t.out_dtype}) differs between {plan.sources[t.sources_used[0]]} "
                f"and {plan.sources[src]}; integer tensors are copied and must be identical in every input"
            )
    return first


def _weighted_into(method: Method, t: TensorPlan, raws: list[torch.Tensor], comp: torch.dtype,
                   cast: torch.dtype | None, out: torch.Tensor) -> bool:
    """A weighted-sum method (linear, the PMA averages) in one pass from the read buffer into
    the write buffer (methods/_fused.py), when it can run with the torch path's bits."""
    from moemerge.methods._fused import weighted_into

    inputs = raws[1:] if t.base is not None else raws
    if cast is not None and cast not in (torch.float32, torch.float64) and any(r.dtype != cast for r in inputs):
        return False  # inputs are rounded to MergeKit's `dtype` first: the torch path does that
    return weighted_into(method.name, t.params, inputs, comp, out)


def apply_into(method: Method, t: TensorPlan, r0: int, r1: int, raws: list[torch.Tensor],
               slabs: list[torch.Tensor], comp: torch.dtype, cast: torch.dtype | None,
               stats: dict[str, Any], out: torch.Tensor) -> int:
    """Apply `method` to rows [r0, r1) into the byte buffer `out`; return the bytes written.

    Elementwise methods run in cache-sized blocks (BLOCK_ELEMS) so temporaries stay in cache.
    """
    rows = r1 - r0
    n = rows * t.row_len
    nbytes = n * itemsize(t.out_dtype)
    typed_out = out[:nbytes].view(to_torch(t.out_dtype))
    if method.elementwise and n and _weighted_into(method, t, raws, comp, cast, typed_out):
        return nbytes
    if method.elementwise:
        for s in range(0, n, BLOCK_ELEMS):
            e = min(n, s + BLOCK_ELEMS)
            chunk = ChunkView(t, [r[s:e] for r in raws], [sl.view(comp)[:e - s] for sl in slabs],
                              r0, r1, comp, cast)
            typed_out[s:e].copy_(method.apply(chunk, stats, t.params).reshape(-1))
    elif n:
        direct = typed_out.view(rows, t.row_len)
        chunk = ChunkView(t, [r.view(rows, t.row_len) for r in raws], scratch_2d(slabs, comp, r0, r1, t),
                          r0, r1, comp, cast, out=direct)
        result = method.apply(chunk, stats, t.params)
        if result is not direct:  # a kernel may have written the output rows itself
            typed_out.copy_(result.reshape(-1))
    return nbytes
