"""Config + checkpoint headers -> Plan. Pure: reads no tensor data, touches no storage.

Every problem found (missing tensors, shape or dtype mismatches, parameters without a value)
is collected and raised once, so a user fixes a config in one round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moemerge.config import MergeConfig
from moemerge.errors import MismatchError, PlanError
from moemerge.io.checkpoint import TensorInfo, row_geometry
from moemerge.io.dtypes import is_float, itemsize
from moemerge.io.quant.base import QuantSpec
from moemerge.methods import get_method
from moemerge.methods.base import TensorParams
from moemerge.planner.layout import lay_out_shards
from moemerge.planner.params import count_layers, resolve_tensor_params
from moemerge.planner.plan import Plan, TensorPlan, WorkUnit
from moemerge.planner.quant import chunk_align, chunk_parts_bytes, layout_entries, placed, quant_for
from moemerge.sizes import format_size

__all__ = ["build_plan", "make_units", "DEFAULT_UNIT_BYTES", "MAX_LISTED", "BLOCK_ELEMS"]

#: Chunks per work unit for elementwise methods (pipeline depth inside one Dask task).
CHUNKS_PER_UNIT = 4
#: DESIGN "Work units and scale": about 256 MB of input per unit keeps a 100B+ model in the
#: thousands of units (Dask's per-task overhead stays negligible).
DEFAULT_UNIT_BYTES = 256 * 10**6
#: How many problems of one kind an error lists before summarizing the rest.
MAX_LISTED = 12
#: Elementwise methods compute in blocks of this many elements (1 MiB of fp32): small enough
#: to stay in L2 cache, which measured 2.2x faster here than whole 32M-element chunks.
BLOCK_ELEMS = 256 * 1024
#: Output bytes per element of a quantized tensor beyond its float32 values: its parts (~1 B)
#: and the quantizer's float32 temporaries, per buffered chunk (engine/requant.py).
QUANT_EXTRA_PER_ELEM = 10
#: Double buffering: one chunk is read (and one written) while the previous one computes.
_IN_FLIGHT = 2
#: Averages over one run's snapshots (oldest first): non-float tensors come from the newest.
_AVERAGES = frozenset({"sma", "wma", "ema"})


def _grouped(problems: list[str]) -> list[str]:
    """Fold problems that differ only in the tensor named: `tensor `x`: msg` (N tensors)."""
    by_msg: dict[str, list[str]] = {}
    order: list[str] = []
    for p in problems:
        if p.startswith("tensor `") and "`: " in p:
            name, msg = p[len("tensor `"):].split("`: ", 1)
        else:
            name, msg = "", p
        if msg not in by_msg:
            order.append(msg)
        by_msg.setdefault(msg, []).append(name)
    out = []
    for msg in order:
        names = [n for n in by_msg[msg] if n]
        if not names:
            out.append(msg)
        elif len(names) == 1:
            out.append(f"tensor `{names[0]}`: {msg}")
        else:
            out.append(f"{len(names)} tensors (e.g. `{names[0]}`): {msg}")
    return out


def _listed(problems: list[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    return "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def build_plan(
    cfg: MergeConfig,
    catalogs: Mapping[str, Mapping[str, TensorInfo]],
    *,
    memory_budget: int,
    shard_size: int,
    seed: int = 0,
    n_layers_hint: int | None = None,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    chunk_rows: int | None = None,
    out_format: str = "safetensors",
    quant: Mapping[str, QuantSpec] | None = None,
    keep: Mapping[str, TensorInfo] | None = None,
) -> Plan:
    """Plan a merge. `catalogs` maps each checkpoint location of `cfg` to its tensors.

    `chunk_rows` caps the rows per chunk below what the budget allows (tests use it to force
    one-row or odd chunks on small tensors; the output must not change). `quant` names the
    logical tensors written quantized (`planner.quant.resolve_output_quant`); `keep`, stored
    tensors copied as the first source has them (a quantized layout's `input_scale`).
    """
    method = get_method(cfg.merge_method)
    sources = tuple(cfg.model_locations())
    model_idx = method.input_models(cfg)
    inputs = tuple(sources.index(cfg.models[i].model) for i in model_idx)
    base = sources.index(cfg.base_model) if (method.base != "none" and cfg.base_model) else None
    used = ((base,) if base is not None else ()) + inputs
    warnings: list[str] = []
    notes: list[str] = []
    if cfg.base_model and method.base == "none" and cfg.base_model not in [m.model for m in cfg.models]:
        warnings.append(
            f"base_model is not merged by {method.name} (list it under `models` to include it); "
            "its config and tokenizer files are copied"
        )
    for name in method.ignored_params:
        if name in cfg.parameters or any(name in m.parameters for m in cfg.models):
            warnings.append(f"parameter `{name}` has no effect on {method.name} (MergeKit ignores it too)")

    # Snapshots of one run (averages, `non_float: last`): counters and serialized extra state
    # come from the last listed input, the newest, instead of having to be equal in all.
    take_last = (cfg.non_float or ("last" if method.name in _AVERAGES else "equal")) == "last"
    ref = used[0]
    ref_cat = catalogs[sources[ref]]
    names = sorted(ref_cat, key=lambda n: (ref_cat[n].file, ref_cat[n].start))
    n_layers = count_layers(names, n_layers_hint)
    missing: list[str] = []
    mismatched: list[str] = []
    param_problems: list[str] = []
    unsupported: list[str] = []
    for s in used:
        extra = set(catalogs[sources[s]]) - set(ref_cat)
        if extra:
            warnings.append(
                f"{sources[s]}: {len(extra)} tensor(s) not in {sources[ref]} are ignored "
                f"(e.g. `{sorted(extra)[0]}`)"
            )

    planned: list[dict[str, Any]] = []
    for name in names:
        infos: list[TensorInfo] = []
        for s in used:
            info = catalogs[sources[s]].get(name)
            if info is None:
                missing.append(f"tensor `{name}` is missing in {sources[s]} (present in {sources[ref]})")
            else:
                infos.append(info)
        if len(infos) != len(used):
            continue
        r = infos[0]
        if name.endswith("_scale_inv"):
            unsupported.append(
                f"tensor `{name}` in {sources[ref]}/{r.file}: a block scale without its FP8 weight "
                f"`{name[:-len('_scale_inv')]}` (F8_E4M3) beside it; the checkpoint is incomplete or not "
                "block-quantized as DeepSeek-V3 checkpoints are"
            )
            continue
        newest = infos[-1]
        if take_last and (not is_float(newest.dtype) or name.endswith("_extra_state")):
            planned.append(dict(name=name, infos=[newest], method="copy", out_dtype=newest.dtype,
                                params=None, inputs=inputs[-1:], base=None))
            continue
        for s, info in zip(used, infos):
            if info.shape != r.shape:
                mismatched.append(
                    f"{sources[s]}/{info.file}: tensor `{name}` is {list(info.shape)}, "
                    f"{sources[ref]} has {list(r.shape)}; inputs must share one architecture"
                )
            elif is_float(info.dtype) != is_float(r.dtype) or (
                not is_float(r.dtype) and info.dtype != r.dtype
            ):
                mismatched.append(
                    f"{sources[s]}/{info.file}: tensor `{name}` is {info.dtype}, "
                    f"{sources[ref]} has {r.dtype}; integer tensors must match exactly"
                )
        if not is_float(r.dtype):
            planned.append(dict(name=name, infos=infos, method="copy", out_dtype=r.dtype, params=None))
            continue
        params, probs = resolve_tensor_params(method, cfg, model_idx, name, n_layers, seed)
        param_problems += probs
        if not probs:
            msg = method.check_tensor(params)
            if msg:
                param_problems.append(f"tensor `{name}`: {msg}")
        # a dequantized input (io.quant) is served in float32 for exactness; unquantized it is bf16
        out_dtype = cfg.out_dtype or cfg.dtype or ("BF16" if r.codec else r.dtype)
        q = quant_for(quant, name, r.shape)
        if q is not None:  # merged into float32, then quantized chunk by chunk (engine/requant.py)
            out_dtype = "F32"
        planned.append(dict(name=name, infos=infos, method=method.name, out_dtype=out_dtype, params=params, quant=q))

    for info in (keep or {}).values():
        planned.append(dict(name=info.name, infos=[info], method="copy", out_dtype=info.dtype, params=None,
                            inputs=(0,), base=None))
    problems = unsupported + missing + mismatched + param_problems
    if problems:
        kind = MismatchError if (missing or mismatched) and not param_problems else PlanError
        problems = _grouped(problems)
        if len(problems) == 1:
            raise kind(problems[0])
        raise kind(f"cannot plan this merge ({len(problems)} problems):\n  {_listed(problems)}")

    # -- memory: one global chunk size in elements, from the budget ------------------------
    in_elem = max((sum(itemsize(i.dtype) for i in p["infos"]) for p in planned), default=1)
    # a quantized tensor's output buffer holds its float32 values and then its stored parts, and
    # the quantizer's float32 temporaries (a band of whole scale blocks, at most a chunk) come on top
    out_elem = max((itemsize(p["out_dtype"]) + (QUANT_EXTRA_PER_ELEM if p.get("quant") else 0)
                    for p in planned), default=1)
    wide = any(
        p["method"] != "copy" and ("F64" in {i.dtype for i in p["infos"]} or p["out_dtype"] == "F64")
        for p in planned
    )
    comp_elem = 8 if wide else 4
    working = max((method.working_copies(len(inputs)) for p in planned if p["method"] != "copy"), default=0)
    temps = method.temporaries(len(inputs)) if any(p["method"] != "copy" for p in planned) else 0
    if method.elementwise:
        # compute buffers are fixed cache-sized blocks, not chunk-sized
        fixed = working * BLOCK_ELEMS * comp_elem
        per_elem = _IN_FLIGHT * in_elem + _IN_FLIGHT * out_elem
    else:
        fixed = 0
        per_elem = _IN_FLIGHT * in_elem + (working + temps) * comp_elem + _IN_FLIGHT * out_elem
    chunk_cap = max(1, (memory_budget - fixed) // per_elem) if memory_budget > fixed else 1
    # a chunk is read whole by one task: no bigger than a work unit, so units stay bounded
    # (and a unit's worth of input is already far past where bigger reads go faster)
    chunk_cap = min(chunk_cap, max(1, unit_bytes // in_elem))
    if method.elementwise:
        # chunking never costs an elementwise method a read: a few chunks per unit keep a
        # task's reads, math and writes overlapped (one-chunk tasks run them one after another)
        chunk_cap = min(chunk_cap, max(1, unit_bytes // in_elem // CHUNKS_PER_UNIT))

    tensors: list[TensorPlan] = []
    entries, glued = layout_entries(planned)  # a quantized tensor's parts in its place
    shards, where = lay_out_shards(entries, shard_size, glued)
    chunk_elems = chunk_in = chunk_out = 0
    extra_passes = 0
    bytes_read = bytes_written = 0
    one_row: list[str] = []
    for p in planned:
        r: TensorInfo = p["infos"][0]
        rows, row_len = row_geometry(r.shape)
        gran = method.row_granularity(r.shape, p["params"]) if p["method"] != "copy" else 1
        # chunks fall on the scale blocks of every quantized input (io.quant: one band per read)
        gran = math.lcm(gran, *(max(1, i.row_align) for i in p["infos"]))
        if out_format == "zarr" and len(r.shape) >= 3:
            # Zarr chunks are slabs along dim 0: a chunk must hold whole dim-0 slices
            gran = math.lcm(gran, max(1, math.prod(r.shape[1:-1])))
        q = p.get("quant")
        if q is not None:  # chunks are whole scale blocks
            gran = math.lcm(gran, chunk_align(q))
        fit = (chunk_cap // max(1, row_len)) // gran * gran
        if rows == 0:
            rows_per_chunk = 1
        elif fit >= gran:
            rows_per_chunk = min(fit, rows)
            if chunk_rows:
                rows_per_chunk = min(rows_per_chunk, max(gran, chunk_rows // gran * gran))
        else:  # even one row (group) is above the budget share: go one at a time, and say so
            rows_per_chunk = gran
            one_row.append(f"`{r.name}` ({format_size(row_len * in_elem * gran)} per row)")
        elems = rows_per_chunk * row_len
        in_bytes = sum(i.read_nbytes for i in p["infos"])  # as stored: quantized parts, not served bytes
        chunk_elems = max(chunk_elems, elems if p["method"] != "copy" else 0)
        chunk_in = max(chunk_in, elems * sum(itemsize(i.dtype) for i in p["infos"]))
        chunk_out = max(chunk_out, elems * itemsize(p["out_dtype"]) + (chunk_parts_bytes(q, rows_per_chunk) if q else 0))
        n_pass = 0
        if p["method"] != "copy":
            n_pass = len(method.passes(p["params"], r.shape))
        multi = rows > rows_per_chunk
        extra_passes += n_pass
        bytes_read += in_bytes * (1 + n_pass if multi else 1)
        bytes_written += sum(x.nbytes for x in q.parts) if q else math.prod(r.shape) * itemsize(p["out_dtype"])
        compute = "F64" if (p["method"] != "copy" and comp_elem == 8 and (
            "F64" in {i.dtype for i in p["infos"]} or p["out_dtype"] == "F64")) else "F32"
        fname, off = where[q.parts[0].name if q else r.name]
        tensors.append(TensorPlan(
            name=r.name, shape=r.shape, rows=rows, row_len=row_len, method=p["method"],
            inputs=p.get("inputs", inputs),
            base=p.get("base", base), in_dtypes=tuple(i.dtype for i in p["infos"]), out_dtype=p["out_dtype"],
            compute_dtype=compute, params=p["params"] or _COPY_PARAMS,
            rows_per_chunk=rows_per_chunk, out_file=fname, out_offset=off,
            **({"quant": placed(q, where)} if q else {}),
        ))
    if one_row:
        notes.append(
            f"{len(one_row)} tensor(s) have rows too big for the budget and are processed one row "
            f"at a time: {', '.join(one_row[:5])}{' ...' if len(one_row) > 5 else ''}"
        )
    if method.elementwise:
        chunk_elems = min(chunk_elems, BLOCK_ELEMS)
    peak = _IN_FLIGHT * chunk_in + (working + temps) * chunk_elems * comp_elem + _IN_FLIGHT * chunk_out
    if peak > memory_budget:
        notes.append(
            f"buffers need {format_size(peak)}, above the {format_size(memory_budget)} budget, "
            "because single rows are that big"
        )
    side = cfg.base_model or cfg.models[0].model
    tok = cfg.tokenizer_source
    tok_source = side if tok in (None, "base") else tok
    return Plan(
        method=method.name, sources=sources, tensors=tuple(tensors), shards=tuple(shards),
        units=tuple(make_units(tensors, unit_bytes)), memory_budget=memory_budget,
        working_copies=working, chunk_elems=chunk_elems, chunk_in_bytes=chunk_in,
        chunk_out_bytes=chunk_out, peak_bytes=peak, bytes_read=bytes_read,
        bytes_written=bytes_written, passes=extra_passes, warnings=tuple(warnings),
        notes=tuple(notes), side_source=side, tokenizer_source=tok_source,
        config_hash=cfg.config_hash(), out_format=out_format,
    )


_COPY_PARAMS = TensorParams(per_input=(), glob={})


def make_units(tensors: list[TensorPlan], unit_bytes: int) -> list[WorkUnit]:
    """Group small tensors and split big ones by rows into units of about `unit_bytes` input."""
    units: list[WorkUnit] = []
    pieces: list[tuple[int, int, int]] = []
    acc = 0
    for ti, t in enumerate(tensors):
        row_in = t.row_len * sum(itemsize(d) for d in t.in_dtypes)
        total = t.rows * row_in
        if total > unit_bytes and t.rows > 1:
            if pieces:
                units.append(WorkUnit(pieces=tuple(pieces), in_bytes=acc))
                pieces, acc = [], 0
            step = max(t.rows_per_chunk, (unit_bytes // max(1, row_in)) // t.rows_per_chunk * t.rows_per_chunk)
            for r0 in range(0, t.rows, step):
                r1 = min(t.rows, r0 + step)
                units.append(WorkUnit(pieces=((ti, r0, r1),), in_bytes=(r1 - r0) * row_in))
            continue
        if pieces and acc + total > unit_bytes:
            units.append(WorkUnit(pieces=tuple(pieces), in_bytes=acc))
            pieces, acc = [], 0
        pieces.append((ti, 0, t.rows))
        acc += total
    if pieces:
        units.append(WorkUnit(pieces=tuple(pieces), in_bytes=acc))
    return units
