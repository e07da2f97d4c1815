"""Config + checkpoint headers -> Plan. Pure: reads no tensor data, touches no storage.

Every problem found (missing tensors, shape or dtype mismatches, parameters without a value)
is collected and raised once, so a user fixes a config in one round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moemerge.config import MergeConfig, input_models
from moemerge.engine.constants import BLOCK_ELEMS  # a leaf module: imports nothing
from moemerge.errors import MismatchError, PlanError
from moemerge.io.checkpoint import TensorInfo, row_geometry
from moemerge.io.dtypes import is_float, itemsize
from moemerge.io.quant.base import QuantSpec
from moemerge.methods import get_method
from moemerge.methods.base import Method, TensorParams
from moemerge.planner.layout import lay_out_shards
from moemerge.planner.params import count_layers, resolve_tensor_params
from moemerge.planner.plan import Plan, PlannedTensor, TensorPlan, WorkUnit
from moemerge.planner.quant import chunk_align, chunk_parts_bytes, layout_entries, placed, quant_for
from moemerge.settings import DEFAULT_UNIT_BYTES
from moemerge.sizes import format_size

__all__ = ["build_plan", "make_units", "chunk_rows_for", "DEFAULT_UNIT_BYTES", "MAX_LISTED"]

#: Chunks per work unit for elementwise methods (pipeline depth inside one Dask task).
CHUNKS_PER_UNIT = 4
#: How many problems of one kind an error lists before summarizing the rest.
MAX_LISTED = 12
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


@dataclass(frozen=True, slots=True, kw_only=True)
class _Roles:
    """Which sources a merge reads: indices into the plan's sources."""

    sources: tuple[str, ...]
    model_idx: list[int]
    """Indices into cfg.models of the method's inputs (the base excluded)."""
    inputs: tuple[int, ...]
    base: int | None
    used: tuple[int, ...]
    """Base first when there is one, then the inputs: the order of a tensor's `infos`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Selection:
    """Every output tensor decided, and every problem found on the way (raised together)."""

    planned: tuple[PlannedTensor, ...]
    warnings: tuple[str, ...]
    unsupported: tuple[str, ...]
    missing: tuple[str, ...]
    mismatched: tuple[str, ...]
    param_problems: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sizing:
    """The buffer sizes every tensor's chunks share, from the budget."""

    in_elem: int
    """Input bytes per element (all sources, largest tensor)."""
    comp_elem: int
    """Compute bytes per element: 8 when any merged tensor is F64, else 4."""
    working: int
    temps: int
    chunk_cap: int
    """Elements per chunk at most."""
    compiled: bool = False
    """Sized for the method's compiled loops (`Plan.compiled_sizing`)."""


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
    compiled: bool = False,
) -> Plan:
    """Plan a merge. `catalogs` maps each checkpoint location of `cfg` to its tensors.

    `chunk_rows` caps the rows per chunk below what the budget allows (tests use it to force
    one-row or odd chunks on small tensors; the output must not change). `quant` names the
    logical tensors written quantized (`planner.quant.resolve_output_quant`); `keep`, stored
    tensors copied as the first source has them (a quantized layout's `input_scale`).

    In steps: which sources play which role, which tensors are made how (`_select`; every
    problem raised at once), buffer sizes from the budget (`_size`), then each tensor's
    chunking and place in the output (`_tensor_plans`). `compiled`: the method's compiled
    loops will run on the host (numba present, CPU device, one process), so buffers are sized
    for them where every merged tensor takes them (`_compiled_sizing`).
    """
    method = get_method(cfg.merge_method)
    roles = _roles(cfg, method)
    n_inputs = len(roles.inputs)
    if cfg.slices:  # MergeKit's `slices:`: output layers taken from layer ranges (planner/slices.py)
        from moemerge.planner.slices import select_slices

        sel, n_inputs = select_slices(cfg, method, roles.sources, catalogs, seed=seed, quant=quant, keep=keep)
    else:
        sel = _select(cfg, method, roles, catalogs, seed=seed, n_layers_hint=n_layers_hint, quant=quant, keep=keep)
    problems = list(sel.unsupported + sel.missing + sel.mismatched + sel.param_problems)
    if problems:
        kind = MismatchError if (sel.missing or sel.mismatched) and not sel.param_problems else PlanError
        problems = _grouped(problems)
        if len(problems) == 1:
            raise kind(problems[0])
        raise kind(f"cannot plan this merge ({len(problems)} problems):\n  {_listed(problems)}")
    by_kernels = compiled and _compiled_sizing(method, sel.planned)
    sizing = _size(method, sel.planned, n_inputs=n_inputs, memory_budget=memory_budget,
                   unit_bytes=unit_bytes, compiled=by_kernels)
    entries, glued = layout_entries(sel.planned)  # a quantized tensor's parts in its place
    shards, where = lay_out_shards(entries, shard_size, glued)
    tensors, totals, one_row = _tensor_plans(method, sel.planned, sizing, where, out_format=out_format,
                                             chunk_rows=chunk_rows)
    notes: list[str] = []
    if one_row:
        notes.append(
            f"{len(one_row)} tensor(s) have rows too big for the budget and are processed one row "
            f"at a time: {', '.join(one_row[:5])}{' ...' if len(one_row) > 5 else ''}"
        )
    chunk_elems = min(totals.chunk_elems, BLOCK_ELEMS) if method.elementwise else totals.chunk_elems
    peak = (_IN_FLIGHT * totals.chunk_in + (sizing.working + sizing.temps) * chunk_elems * sizing.comp_elem
            + _IN_FLIGHT * totals.chunk_out)
    if peak > memory_budget:
        notes.append(
            f"buffers need {format_size(peak)}, above the {format_size(memory_budget)} budget, "
            "because single rows are that big"
        )
    side = cfg.base_model or cfg.models[0].model
    tok = cfg.tokenizer_source
    tok_source = side if tok in (None, "base") else tok
    return Plan(
        method=method.name, sources=roles.sources, tensors=tuple(tensors), shards=tuple(shards),
        units=tuple(make_units(tensors, unit_bytes)), memory_budget=memory_budget,
        working_copies=sizing.working, chunk_elems=chunk_elems, chunk_in_bytes=totals.chunk_in,
        chunk_out_bytes=totals.chunk_out, peak_bytes=peak, bytes_read=totals.bytes_read,
        bytes_written=totals.bytes_written, passes=totals.passes, warnings=sel.warnings,
        notes=tuple(notes), side_source=side, tokenizer_source=tok_source,
        config_hash=cfg.config_hash(), out_format=out_format, compiled_sizing=by_kernels,
    )


def _roles(cfg: MergeConfig, method: Method) -> _Roles:
    sources = tuple(cfg.model_locations())
    model_idx = input_models(cfg, method)
    inputs = tuple(sources.index(cfg.models[i].model) for i in model_idx)
    base = sources.index(cfg.base_model) if (method.base != "none" and cfg.base_model) else None
    used = ((base,) if base is not None else ()) + inputs
    return _Roles(sources=sources, model_idx=model_idx, inputs=inputs, base=base, used=used)


def _select(cfg: MergeConfig, method: Method, roles: _Roles, catalogs: Mapping[str, Mapping[str, TensorInfo]], *,
            seed: int, n_layers_hint: int | None, quant: Mapping[str, QuantSpec] | None,
            keep: Mapping[str, TensorInfo] | None) -> _Selection:
    """How each output tensor is made (a method, or a copy) from which stored tensors, in the
    first source's file order; and every problem found (missing, mismatched, bad parameters)."""
    sources, inputs, base, used = roles.sources, roles.inputs, roles.base, roles.used
    warnings: list[str] = []
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

    planned: list[PlannedTensor] = []
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
            planned.append(PlannedTensor(name=name, infos=(newest,), method="copy", out_dtype=newest.dtype,
                                         inputs=inputs[-1:], base=None))
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
            planned.append(PlannedTensor(name=name, infos=tuple(infos), method="copy", out_dtype=r.dtype,
                                         inputs=inputs, base=base))
            continue
        params, probs = resolve_tensor_params(method, cfg, roles.model_idx, name, n_layers, seed)
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
        planned.append(PlannedTensor(name=name, infos=tuple(infos), method=method.name, out_dtype=out_dtype,
                                     inputs=inputs, base=base, params=params, quant=q))

    for info in (keep or {}).values():
        planned.append(PlannedTensor(name=info.name, infos=(info,), method="copy", out_dtype=info.dtype,
                                     inputs=(0,), base=None))
    return _Selection(planned=tuple(planned), warnings=tuple(warnings), unsupported=tuple(unsupported),
                      missing=tuple(missing), mismatched=tuple(mismatched), param_problems=tuple(param_problems))


def _compiled_sizing(method: Method, planned: Sequence[PlannedTensor]) -> bool:
    """Whether every merged tensor's chunks take the method's compiled loops (methods/_fused.py
    `_stored`): the method has them, and each tensor's sources share one stored dtype, bf16 or
    float32, computed in float32."""
    if method.compiled_working_copies is None or method.elementwise:
        return False
    merged = [p for p in planned if p.method != "copy"]
    return bool(merged) and all(len({i.dtype for i in p.infos}) == 1 and p.infos[0].dtype in ("BF16", "F32")
                                and not _wide(p) for p in merged)


def _size(method: Method, planned: Sequence[PlannedTensor], *, n_inputs: int, memory_budget: int,
          unit_bytes: int, compiled: bool = False) -> _Sizing:
    """One global chunk size in elements, from the budget: every buffer is sized for it."""
    in_elem = max((sum(itemsize(i.dtype) for i in p.infos) for p in planned), default=1)
    # a quantized tensor's output buffer holds its float32 values and then its stored parts, and
    # the quantizer's float32 temporaries (a band of whole scale blocks, at most a chunk) come on top
    out_elem = max((itemsize(p.out_dtype) + (QUANT_EXTRA_PER_ELEM if p.quant else 0)
                    for p in planned), default=1)
    comp_elem = 8 if any(_wide(p) for p in planned) else 4
    working = max((method.working_copies(n_inputs) for p in planned if p.method != "copy"), default=0)
    temps = method.temporaries(n_inputs) if any(p.method != "copy" for p in planned) else 0
    if compiled and method.compiled_working_copies is not None:
        working, temps = method.compiled_working_copies(n_inputs), 0
    if method.elementwise:
        # compute buffers are fixed cache-sized blocks, not chunk-sized
        fixed = working * BLOCK_ELEMS * comp_elem
        per_elem = _IN_FLIGHT * in_elem + _IN_FLIGHT * out_elem
        chunk_cap = max(1, (memory_budget - fixed) // per_elem) if memory_budget > fixed else 1
        # a chunk is read whole by one task: no bigger than a work unit, so units stay bounded
        # (and a unit's worth of input is already far past where bigger reads go faster)
        chunk_cap = min(chunk_cap, max(1, unit_bytes // in_elem))
    else:
        chunk_cap = _budget_cap(planned, memory_budget, (working + temps) * comp_elem, unit_bytes)
    if method.elementwise:
        # chunking never costs an elementwise method a read: a few chunks per unit keep a
        # task's reads, math and writes overlapped (one-chunk tasks run them one after another)
        chunk_cap = min(chunk_cap, max(1, unit_bytes // in_elem // CHUNKS_PER_UNIT))
    return _Sizing(in_elem=in_elem, comp_elem=comp_elem, working=working, temps=temps, chunk_cap=chunk_cap,
                   compiled=compiled and method.compiled_working_copies is not None)


def _budget_cap(planned: Sequence[PlannedTensor], budget: int, slab_per_elem: int, unit_bytes: int) -> int:
    """The largest chunk size C (elements) whose buffers fit `budget`, each tensor's chunks
    holding min(its elements, C) (a row at least): the read and write buffers (_IN_FLIGHT of
    each) the largest chunk's input (as served) and output bytes, the compute buffers
    (`slab_per_elem` bytes an element) the largest merged chunk, and no chunk's reads (as
    stored: FP8 codes, not their float32 values) above a work unit (`unit_bytes`: units stay
    bounded, and bigger reads go no faster). Sized by the tensors
    themselves, not by the costliest element of any of them: a few small float32 tensors (the
    norms) no longer shrink the chunks of the big bf16 ones (ties over 3 x 4 GB at 512MB:
    whole tensors, so one read each instead of two)."""
    kinds: set[tuple[int, int, int, int, bool, float]] = set()
    for p in planned:
        rows, row_len = row_geometry(p.infos[0].shape)
        n = rows * row_len
        kinds.add((n, max(1, row_len), sum(itemsize(i.dtype) for i in p.infos),
                   itemsize(p.out_dtype) + (QUANT_EXTRA_PER_ELEM if p.quant else 0), p.method != "copy",
                   sum(i.read_nbytes for i in p.infos) / max(1, n)))  # as stored: a unit is what is read

    def fits(c: int) -> bool:
        rin = rout = slab = 0
        for n, row_len, in_t, out_t, merged, read_t in kinds:
            if min(n, c) * read_t > unit_bytes:
                return False
            e = min(n, max(c, row_len))
            rin, rout = max(rin, e * in_t), max(rout, e * out_t)
            if merged:
                slab = max(slab, e)
        return _IN_FLIGHT * (rin + rout) + slab * slab_per_elem <= budget

    lo, hi = 1, max((k[0] for k in kinds), default=1)
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) or lo == 1; not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _wide(p: PlannedTensor) -> bool:
    """A merged (not copied) tensor with F64 among its inputs or as its output: computed in F64."""
    return p.method != "copy" and ("F64" in {i.dtype for i in p.infos} or p.out_dtype == "F64")


@dataclass(slots=True)
class _Totals:
    """What the tensor plans add up to (largest chunks, bytes moved, extra passes)."""

    chunk_elems: int = 0
    chunk_in: int = 0
    chunk_out: int = 0
    passes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def _tensor_plans(method: Method, planned: Sequence[PlannedTensor], sizing: _Sizing,
                  where: Mapping[str, tuple[str, int]], *, out_format: str,
                  chunk_rows: int | None) -> tuple[list[TensorPlan], _Totals, list[str]]:
    """Each tensor's chunking and place in the output; the totals; the tensors whose rows
    (row groups) are too big for the budget, processed one at a time."""
    tensors: list[TensorPlan] = []
    totals = _Totals()
    one_row: list[str] = []
    # (row granularity, statistics passes) by (params, shape): the method decides both from
    # those alone, and a merge has a few dozen distinct pairs among 92k tensors (params are
    # shared objects, planner/params.py; they outlive this loop, so their ids are stable)
    declared: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
    for p in planned:
        r = p.infos[0]
        rows, row_len = row_geometry(r.shape)
        if p.method != "copy":
            key = (id(p.params), r.shape)
            got = declared.get(key)
            if got is None:
                tp = p.params or _COPY_PARAMS
                got = declared[key] = (method.row_granularity(r.shape, tp), len(method.passes(tp, r.shape)))
            gran, n_pass = got
        else:
            gran, n_pass = 1, 0
        # chunks fall on the scale blocks of every quantized input (io.quant: one band per read)
        gran = math.lcm(gran, *(max(1, i.row_align) for i in p.infos))
        if out_format == "zarr" and len(r.shape) >= 3:
            # Zarr chunks are slabs along dim 0: a chunk must hold whole dim-0 slices
            gran = math.lcm(gran, max(1, math.prod(r.shape[1:-1])))
        q = p.quant
        if q is not None:  # chunks are whole scale blocks
            gran = math.lcm(gran, chunk_align(q))
        rows_per_chunk, fits = chunk_rows_for(rows, row_len, gran, sizing.chunk_cap, chunk_rows)
        if not fits:  # even one row (group) is above the budget share: one at a time, and say so
            one_row.append(f"`{r.name}` ({format_size(row_len * sizing.in_elem * gran)} per row)")
        elems = rows_per_chunk * row_len
        in_bytes = sum(i.read_nbytes for i in p.infos)  # as stored: quantized parts, not served bytes
        totals.chunk_elems = max(totals.chunk_elems, elems if p.method != "copy" else 0)
        totals.chunk_in = max(totals.chunk_in, elems * sum(itemsize(i.dtype) for i in p.infos))
        totals.chunk_out = max(totals.chunk_out, elems * itemsize(p.out_dtype)
                               + (chunk_parts_bytes(q, rows_per_chunk) if q else 0))
        multi = rows > rows_per_chunk
        totals.passes += n_pass
        # a streamed tensor is read once per pass, or (the compiled selection loops: each pass's
        # histograms and windows from one read, methods/_selection.py) twice at most; measured
        # from /proc/diskstats: ties, dare_ties and breadcrumbs over 4.1 GB at 256MB read 8.2 GB
        reads = (min(1 + n_pass, 2) if sizing.compiled else 1 + n_pass) if multi else 1
        totals.bytes_read += in_bytes * reads
        totals.bytes_written += sum(x.nbytes for x in q.parts) if q else math.prod(r.shape) * itemsize(p.out_dtype)
        compute = "F64" if (sizing.comp_elem == 8 and _wide(p)) else "F32"
        fname, off = where[q.parts[0].name if q else p.name]
        renamed = any(i.name != p.name for i in p.infos)  # slices: a layer read under another index
        tensors.append(TensorPlan(
            name=p.name, shape=r.shape, rows=rows, row_len=row_len, method=p.method, inputs=p.inputs,
            base=p.base, in_dtypes=tuple(i.dtype for i in p.infos), out_dtype=p.out_dtype,
            compute_dtype=compute, params=p.params or _COPY_PARAMS,
            rows_per_chunk=rows_per_chunk, out_file=fname, out_offset=off,
            **({"quant": placed(q, where)} if q else {}),
            in_names=tuple(i.name for i in p.infos) if renamed else (),
            in_codecs=tuple(i.codec for i in p.infos) if any(i.codec for i in p.infos) else (),
        ))
    return tensors, totals, one_row


_COPY_PARAMS = TensorParams(per_input=(), glob={})


def chunk_rows_for(rows: int, row_len: int, gran: int, chunk_cap: int,
                   chunk_rows: int | None = None) -> tuple[int, bool]:
    """(rows per chunk, whether a row group fits) for a tensor of `rows` rows of `row_len`
    elements, chunks of at most `chunk_cap` elements in whole groups of `gran` rows, capped at
    `chunk_rows` when given. A group bigger than the cap is taken one at a time (False).

    Example: chunk_rows_for(10, 100, 1, 450) == (4, True).
    """
    fit = (chunk_cap // max(1, row_len)) // gran * gran
    if rows == 0:
        return 1, True
    if fit < gran:
        return gran, False
    n = min(fit, rows)
    if chunk_rows:
        n = min(n, max(gran, chunk_rows // gran * gran))
    return n, True


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
