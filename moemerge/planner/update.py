"""Plan a `pma update`: the running-sum stage's chunks, sized from the budget like a merge's.

Headers in, `Plan` out (no data read): every float tensor of the newest snapshot reads the
snapshots of the step (`methods.running.RunningStep`) and, after the first update, the
previous state's fp64 sums; it writes the average and the new sums. Non-float tensors are
copied from the newest snapshot. Memory counts every buffer the engine takes for this: read
and output buffers twice (double buffering), the sums' fp64 bytes in both, what Zarr copies
while decoding and encoding them, and the stage's fp64 scratch blocks.

With `quant` (`--quantize`, decided by `planner.quant.resolve_output_quant` as for `pma`), a
tensor it names is averaged into float32 and written as its quantized parts with fresh scales
(engine/running.py calls engine/requant.py), laid out and chunked as a merge's (`planner.build`):
chunks on whole scale blocks, the parts in the tensor's place; `keep` tensors (an activation
scale beside the quantized weights) are copied from the newest snapshot as stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from moemerge.engine.constants import ALIGN, BLOCK_ELEMS  # a leaf module: imports nothing
from moemerge.io.checkpoint import TensorInfo, row_geometry
from moemerge.io.dtypes import is_float, itemsize
from moemerge.io.quant.base import QuantSpec
from moemerge.io.quant_out import BAND_ELEMS
from moemerge.methods.base import TensorParams
from moemerge.methods.running import SCRATCH, RunningStep
from moemerge.planner.build import (CHUNKS_PER_UNIT, DEFAULT_UNIT_BYTES, QUANT_EXTRA_PER_ELEM, chunk_rows_for,
                                    make_units)
from moemerge.planner.quant import chunk_align, chunk_parts_bytes, placed, quant_for
from moemerge.planner.layout import lay_out_shards
from moemerge.planner.plan import Plan, TensorPlan

__all__ = ["plan_update", "state_source"]

#: Double buffering: one chunk is read (and one written) while the previous one computes.
_IN_FLIGHT = 2
#: Bytes held per fp64 element while a state chunk read is decoded, or one written is encoded
#: (zarr's copies, or pma.state_io's reused buffers: one per read quantity, one per written
#: quantity and output buffer, as both output buffers' chunks may be written at once).
_ZARR_COPY = 8
_NO_PARAMS = TensorParams(per_input=(), glob={})


def state_source(state: str, quantity: str) -> str:
    """The source name of one running quantity of the previous state (`STATE/v000003-..#S`)."""
    return f"{state}#{quantity}"


def plan_update(
    step: RunningStep,
    newest: tuple[str, Mapping[str, TensorInfo]],
    reads: Sequence[tuple[str, Mapping[str, TensorInfo]]],
    *,
    state: str | None,
    memory_budget: int,
    shard_size: int,
    out_format: str = "safetensors",
    out_dtype: str | None = None,
    chunk_rows: int | None = None,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    quant: Mapping[str, QuantSpec] | None = None,
    keep: Mapping[str, TensorInfo] | None = None,
) -> Plan:
    """The plan of one update. `newest` is the newest snapshot (location, tensors): it gives the
    tensors, their order, the non-float ones and the side files; `reads` the snapshots the
    step reads, in its order; `state` the previous state version's location (read unless the
    step builds from scratch). Float tensors are written as `out_dtype`, else as the newest
    snapshot stores them (bf16 when it stores them quantized); those `quant` names are written
    quantized (see the module's docstring).

    Sources are the snapshots read, the newest (if not read), then one per running quantity
    of the state (`state_source`): a float tensor's inputs, in that order.
    """
    if len(reads) != step.snapshots:
        raise ValueError(f"plan_update: {len(reads)} snapshot(s) for a step over {step.snapshots}")
    if step.reads_sums and state is None:
        raise ValueError("plan_update: this step reads the previous sums; give the state")
    quantities = step.quantities
    k_in = len(quantities) if step.reads_sums else 0
    k_out = len(quantities) if step.writes_sums else 0
    urls = [u for u, _ in reads]
    newest_url, newest_cat = newest
    sources = tuple(urls + ([newest_url] if newest_url not in urls else [])
                    + [state_source(state, q) for q in quantities[:k_in] if state is not None])
    newest_idx = sources.index(newest_url)
    float_inputs = tuple(range(len(urls))) + tuple(range(len(sources) - k_in, len(sources)))
    names = sorted(newest_cat, key=lambda n: (newest_cat[n].file, newest_cat[n].start))

    # (tensor, out dtype, input dtypes, row granularity, quantized as) per tensor; None
    # granularity: a copy (from the newest snapshot)
    rows_of: list[tuple[TensorInfo, str, tuple[str, ...], int | None, QuantSpec | None]] = []
    for name in names:
        info = newest_cat[name]
        if not is_float(info.dtype):
            rows_of.append((info, info.dtype, (info.dtype,), None, None))
            continue
        infos = [cat[name] for _, cat in reads]
        gran = math.lcm(1, info.row_align, *(max(1, i.row_align) for i in infos))
        if out_format == "zarr" and len(info.shape) >= 3:  # Zarr chunks are whole dim-0 slabs
            gran = math.lcm(gran, max(1, math.prod(info.shape[1:-1])))
        dtype = out_dtype or ("BF16" if info.codec else info.dtype)
        q = quant_for(quant, name, info.shape)
        if q is not None:  # averaged into float32, then quantized chunk by chunk (engine/requant.py)
            dtype = "F32"
            gran = math.lcm(gran, chunk_align(q))
        rows_of.append((info, dtype, tuple(i.dtype for i in infos) + ("F64",) * k_in, gran, q))
    for info in (keep or {}).values():  # stored beside the quantized weights: copied as they are
        rows_of.append((info, info.dtype, (info.dtype,), None, None))

    # -- memory: one chunk size in elements, from the budget ----------------------------------
    in_elem = max((sum(itemsize(d) for d in ins) for _, _, ins, _, _ in rows_of), default=1)
    # a quantized tensor's output buffer holds its float32 values, then its parts, and the
    # quantizer's float32 temporaries come on top (as a merge's, planner.build)
    out_elem = max((itemsize(dt) + (8 * k_out if g is not None else 0) + (QUANT_EXTRA_PER_ELEM if q else 0)
                    for _, dt, _, g, q in rows_of), default=1)
    per_elem = _IN_FLIGHT * in_elem + _IN_FLIGHT * out_elem + _ZARR_COPY * (k_in + _IN_FLIGHT * k_out)
    fixed = SCRATCH * BLOCK_ELEMS * 8  # the stage's fp64 scratch blocks
    chunk_cap = max(1, (memory_budget - fixed) // per_elem) if memory_budget > fixed else 1
    # as a merge's elementwise chunks: a few per work unit of input
    chunk_cap = min(chunk_cap, max(1, unit_bytes // max(1, in_elem) // CHUNKS_PER_UNIT))

    entries: list[tuple[str, str, tuple[int, ...]]] = []
    glued: set[str] = set()  # a quantized tensor's parts after the first share its shard
    for info, dt, _, _, q in rows_of:
        if q is None:
            entries.append((info.name, dt, info.shape))
            continue
        for i, part in enumerate(q.parts):
            entries.append((part.name, part.dtype, part.shape))
            if i:
                glued.add(part.name)
    shards, where = lay_out_shards(entries, shard_size, glued)
    tensors: list[TensorPlan] = []
    chunk_elems = chunk_in = chunk_out = state_elems = 0
    bytes_read = bytes_written = 0
    for info, dt, ins, group, q in rows_of:
        rows, row_len = row_geometry(info.shape)
        copy = group is None
        per_chunk, _ = chunk_rows_for(rows, row_len, group or 1, chunk_cap, chunk_rows)
        elems = per_chunk * row_len
        chunk_in = max(chunk_in, elems * sum(itemsize(d) for d in ins) + ALIGN * len(ins))
        if copy:
            chunk_out = max(chunk_out, elems * itemsize(dt))
        else:
            chunk_elems = max(chunk_elems, elems)
            state_elems = max(state_elems, elems)
            parts = chunk_parts_bytes(q, per_chunk) + ALIGN if q is not None else 0
            chunk_out = max(chunk_out, elems * (itemsize(dt) + 8 * k_out) + parts + ALIGN * (1 + k_out))
        bytes_read += rows * row_len * sum(itemsize(d) for d in ins)
        bytes_written += sum(x.nbytes for x in q.parts) if q else math.prod(info.shape) * itemsize(dt)
        fname, off = where[q.parts[0].name if q else info.name]
        tensors.append(TensorPlan(
            name=info.name, shape=info.shape, rows=rows, row_len=row_len,
            method="copy" if copy else step.method, inputs=(newest_idx,) if copy else float_inputs, base=None,
            in_dtypes=ins, out_dtype=dt, compute_dtype="F64", params=_NO_PARAMS, rows_per_chunk=per_chunk,
            out_file=fname, out_offset=off, **({"quant": placed(q, where)} if q else {}),
        ))
    chunk_elems = min(chunk_elems, BLOCK_ELEMS)
    # the quantizer's temporaries: a band of whole scale blocks at a time (io.quant_out)
    quant_temps = max((QUANT_EXTRA_PER_ELEM * min(t.rows_per_chunk * t.row_len, BAND_ELEMS)
                       for t in tensors if t.quant), default=0)
    peak = (_IN_FLIGHT * chunk_in + _IN_FLIGHT * chunk_out + SCRATCH * chunk_elems * 8
            + _ZARR_COPY * (k_in + _IN_FLIGHT * k_out) * state_elems + quant_temps)
    return Plan(
        method=step.method, sources=sources, tensors=tuple(tensors), shards=tuple(shards),
        units=tuple(make_units(tensors, unit_bytes)), memory_budget=memory_budget, working_copies=SCRATCH,
        chunk_elems=chunk_elems, chunk_in_bytes=chunk_in, chunk_out_bytes=chunk_out, peak_bytes=peak,
        bytes_read=bytes_read, bytes_written=bytes_written, passes=0, side_source=newest_url,
        tokenizer_source=newest_url, out_format=out_format,
    )
