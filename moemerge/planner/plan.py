"""Plan objects: what each output tensor is made of, how it is chunked, where it is written."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moemerge.io.checkpoint import TensorInfo
from moemerge.io.dtypes import itemsize
from moemerge.io.safetensors_format import ShardLayout
from moemerge.io.quant.base import QuantSpec
from moemerge.io.quant_out import OutQuant
from moemerge.io.writer import TensorPlacement
from moemerge.io.zarr_writer import ZarrArraySpec
from moemerge.methods.base import TensorParams

if TYPE_CHECKING:
    from moemerge.planner.estimate import Estimate

__all__ = ["PlannedTensor", "TensorPlan", "ShardLayout", "WorkUnit", "Plan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedTensor:
    """An output tensor as the planner decides it, before chunking and layout (`build_plan`)."""

    name: str
    infos: tuple[TensorInfo, ...]
    """Its stored tensor in each source read, in `TensorPlan.sources_used` order."""
    method: str
    """Registered method name, or `copy`."""
    out_dtype: str
    inputs: tuple[int, ...]
    """Source indices, as `TensorPlan.inputs`."""
    base: int | None
    params: TensorParams | None = None
    """Resolved parameters of a merged tensor; None for a copy."""
    quant: QuantSpec | None = None
    """Written quantized as this spec (`planner.quant`); None: written as `out_dtype`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorPlan:
    """One output tensor: inputs (indices into Plan.sources), method, chunking, output place."""

    name: str
    shape: tuple[int, ...]
    rows: int
    row_len: int
    method: str
    """Registered method name, or `copy` for non-floating tensors (must be equal in all inputs)."""
    inputs: tuple[int, ...]
    """Source indices, config order, base excluded. A `copy` taken from the newest snapshot
    (averages, `non_float: last`) has that one source only, so nothing else is read."""
    base: int | None
    """Source index of the base for methods that use one."""
    in_dtypes: tuple[str, ...]
    """Stored dtype per source in `sources_used` order (base first when present)."""
    out_dtype: str
    compute_dtype: str
    params: TensorParams
    rows_per_chunk: int
    out_file: str
    out_offset: int
    """Absolute byte offset of the tensor's data in `out_file` (a quantized one's first part)."""
    quant: OutQuant | None = None
    """Written quantized (`--quantize`): merged into `out_dtype` F32, then stored as these parts."""
    in_names: tuple[str, ...] = ()
    """The stored name read from each source, in `sources_used` order; empty: `name` in every
    source. Slices (planner/slices.py) read layer 2 of one model into output layer 7. Names on
    the plan rather than a renaming checkpoint view: one source is read under different names
    for different output tensors (a layer taken twice), and the plan travels to Dask workers."""
    in_codecs: tuple[str | None, ...] = ()
    """The quantization codec of each source's stored tensor (None: stored plain), in
    `sources_used` order; empty: none quantized. Only the time estimate reads it
    (planner/estimate.py: dequantizing costs CPU)."""

    def read_name(self, i: int) -> str:
        """The tensor name to read from the i-th source of `sources_used`."""
        return self.in_names[i] if self.in_names else self.name

    @property
    def sources_used(self) -> tuple[int, ...]:
        return ((self.base,) if self.base is not None else ()) + self.inputs

    @property
    def numel(self) -> int:
        return self.rows * self.row_len

    @property
    def chunks(self) -> list[tuple[int, int]]:
        step = max(1, self.rows_per_chunk)
        return [(r, min(r + step, self.rows)) for r in range(0, self.rows, step)]

    def out_bytes(self, rows: int) -> int:
        """Output buffer bytes for a chunk of `rows` rows (a quantized tensor: values, then parts)."""
        values = rows * self.row_len * itemsize(self.out_dtype)
        if self.quant is None:
            return values
        from moemerge.io.quant_out import parts_bytes

        return values + parts_bytes(self.quant, 0, min(rows, self.rows))

    def stored(self) -> list[tuple[str, str, str, tuple[int, ...]]]:
        """(name, file, dtype, shape) of each tensor this one is stored as in the output."""
        if self.quant is None:
            return [(self.name, self.out_file, self.out_dtype, self.shape)]
        return [(p.name, p.file, p.dtype, p.shape) for p in self.quant.places]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkUnit:
    """A bounded piece of work: row ranges `(tensor index, r0, r1)` of one or more tensors."""

    pieces: tuple[tuple[int, int, int], ...]
    in_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Everything the engine needs; built from headers only (no tensor data read)."""

    method: str
    sources: tuple[str, ...]
    """Checkpoint locations, indexed by TensorPlan.inputs / base."""
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardLayout, ...]
    units: tuple[WorkUnit, ...]
    memory_budget: int
    working_copies: int
    """Compute buffers the engine allocates (max over methods used)."""
    chunk_elems: int
    """Largest chunk (elements) of any tensor: compute buffers are this big."""
    chunk_in_bytes: int
    """Largest chunk's raw input bytes (all sources): read buffers are this big."""
    chunk_out_bytes: int
    peak_bytes: int
    """Bytes the engine's buffers take at most (the promise, below the budget when possible)."""
    bytes_read: int
    bytes_written: int
    passes: int
    """Extra statistics passes over tensor data (0 for elementwise methods)."""
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    side_source: str | None = None
    """The checkpoint whose config/tokenizer files are copied to the output."""
    tokenizer_source: str | None = None
    config_hash: str = ""
    out_format: str = "safetensors"
    """`safetensors` (sharded HF directory) or `zarr` (one array per tensor)."""
    compiled_sizing: bool = False
    """Chunks were sized for the method's compiled loops (`Method.compiled_working_copies`):
    the run checks they load before any work, and plans again without them where they do not."""
    quantize: str | None = None
    """The output quantization chosen (`--quantize` or its default, `planner.quant`): `none`,
    `like-input`, `fp8-block`, `mxfp4`; None when not decided (a plan from `build_plan` alone)."""
    quantization_config: dict[str, Any] | None = None
    """The output config.json's `quantization_config`; None: none (removed if the input had one)."""
    config_updates: tuple[tuple[str, Any], ...] = ()
    """Top-level config.json fields the output sets (`key`, value), applied in order at commit:
    what slices (`num_hidden_layers`, per-layer lists) and a rebuilt vocabulary (`vocab_size`)
    change. Empty: config.json as the side source has it (dtype and quantization retagged)."""

    def placements(self) -> dict[str, TensorPlacement]:
        """Where each planned tensor goes in a safetensors output."""
        out = {
            t.name: TensorPlacement(name=t.name, file=t.out_file, offset=t.out_offset, dtype=t.out_dtype,
                                    shape=t.shape, row_bytes=t.row_len * itemsize(t.out_dtype))
            for t in self.tensors if t.quant is None
        }
        for t in self.tensors:  # a quantized tensor is written as its parts
            for p in t.quant.places if t.quant is not None else ():
                out[p.name] = TensorPlacement(name=p.name, file=p.file, offset=p.offset, dtype=p.dtype,
                                              shape=p.shape, row_bytes=p.row_bytes)
        return out

    def zarr_arrays(self) -> list[ZarrArraySpec]:
        """Each planned tensor as a Zarr array (one engine chunk per Zarr chunk)."""
        return [ZarrArraySpec(name=t.name, shape=t.shape, dtype=t.out_dtype, rows_per_chunk=t.rows_per_chunk)
                for t in self.tensors]

    def output_id(self) -> str:
        """sha256 of what decides the output's bytes and their places: method, config, inputs,
        every tensor's shape, dtype and offset, every shard's header (the resume journal's key)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.method, self.config_hash, list(self.sources), self.out_format]).encode())
        for t in self.tensors:
            h.update(json.dumps([t.name, list(t.shape), t.out_dtype, t.out_file, t.out_offset, t.method]).encode())
        for sh in self.shards:
            h.update(sh.file.encode())
            h.update(hashlib.sha256(sh.header).digest())
        return h.hexdigest()

    def estimate(self, *, disk_speed: float | None = None, write_speed: float | None = None,
                 cores: int | None = None) -> Estimate:
        """Its wall-time estimate (planner/estimate.py): disk speed in bytes/s, default 1 GB/s."""
        from moemerge.planner.estimate import estimate

        return estimate(self, disk_speed=disk_speed, write_speed=write_speed, cores=cores)

    def summary(self, *, disk_speed: float | None = None) -> dict[str, object]:
        """The plan as a small JSON-able dict (what `moemerge plan --json` prints)."""
        return {
            "method": self.method,
            "inputs": list(self.sources),
            "tensors": len(self.tensors),
            "shards": [s.file for s in self.shards],
            "units": len(self.units),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "statistics_passes": self.passes,
            "memory_budget": self.memory_budget,
            "peak_buffer_bytes": self.peak_bytes,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "estimate": self.estimate(disk_speed=disk_speed).as_dict(),
            **({"quantize": self.quantize, "quantization_config": self.quantization_config}
               if self.quantize is not None else {}),
        }
