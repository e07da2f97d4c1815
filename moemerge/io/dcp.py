"""Read a PyTorch Distributed Checkpoint (DCP; also Megatron `torch_dist`) as a checkpoint.

`DcpCheckpoint.open_dir` unpickles `.metadata` with a restricted unpickler, keeps the model keys
(never optimizer state; see `moemerge.names`), checks that each tensor's chunks tile its global
shape and locates every chunk's raw bytes (two small reads per chunk). `read_rows` then reads
exactly the bytes of the requested rows from each chunk that holds part of them and places
them in row-major order. Only bytes of model chunks are ever read.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint, TensorInfo
from moemerge.io.dcp_layout import check_coverage, locate_chunk, st_dtype
from moemerge.io.dcp_pickle import ChunkMeta, DcpMetadata, StorageEntry, TensorMeta, load_metadata
from moemerge.io.dtypes import itemsize
from moemerge.io.limits import check_tensor_count
from moemerge.io.safetensors_format import ShardHeader
from moemerge.names import DcpNames, select_names

__all__ = ["METADATA_NAME", "EXTRA_STATE", "DcpCheckpoint"]

METADATA_NAME = ".metadata"
#: Suffix of TransformerEngine's opaque per-module state: exposed as bytes, copied, never averaged.
EXTRA_STATE = "_extra_state"
#: A .metadata above this is not metadata (a 1T-parameter run with 10^6 chunks is ~200 MB).
MAX_METADATA_BYTES = 2**30
#: Scratch for chunks that hold part of each row (split along the last dim): read in pieces
#: of at most this many bytes, then scattered into the caller's buffer.
SCRATCH_BYTES = 8 << 20
#: Data files kept open per checkpoint (a large run has thousands of .distcp files).
MAX_OPEN_FILES = 64


@dataclass(frozen=True, slots=True)
class _Piece:
    """A chunk in the row view: offsets/sizes over (leading dims..., columns); data start."""

    file: str
    start: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Layout:
    lead: tuple[int, ...]  # leading dims of the row view (rows run over them in order)
    cols: int
    pieces: tuple[_Piece, ...]


def _row_view(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Leading dims and row length, matching `row_geometry` (1-D: n x 1, scalar: 1 x 1)."""
    if len(shape) >= 2:
        return shape[:-1], shape[-1]
    return ((shape[0],) if shape else (1,)), 1


def _piece_box(shape: tuple[int, ...], c: ChunkMeta) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(shape) >= 2:
        return c.offsets, c.sizes
    if len(shape) == 1:
        return (c.offsets[0], 0), (c.sizes[0], 1)
    return (0, 0), (1, 1)


def _rows_below(r: int, lead: tuple[int, ...], offs: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """How many rows of the box (offs, sizes) over `lead` come before global row `r`.

    Rows of a box map to global rows in increasing order, so the box rows inside a global
    row range [r0, r1) are the contiguous range [below(r0), below(r1)).
    """
    if r <= 0:
        return 0
    if r >= math.prod(lead):
        return math.prod(sizes[:len(lead)])
    digits = np.unravel_index(r, lead)
    count = 0
    for k in range(len(lead)):
        o, s, g = offs[k], sizes[k], int(digits[k])
        count += min(max(g - o, 0), s) * math.prod(sizes[k + 1:len(lead)])
        if not o <= g < o + s:
            break
    return count


class DcpCheckpoint(Checkpoint):
    """A DCP directory: its model tensors (global shapes) and row-range reads across chunks.

    `TensorInfo.file`/`start` name the data file and byte offset of the tensor's first chunk.
    """

    def __init__(self, url: str, fs: Any, root: str, tensors: dict[str, TensorInfo],
                 layouts: dict[str, _Layout], files: dict[str, int]) -> None:
        super().__init__(url, fs, root, tensors, files)
        self._layouts = layouts
        self._open: OrderedDict[str, storage.ByteSource] = OrderedDict()
        self._users: dict[str, int] = {}
        self._olock = threading.Lock()

    def __repr__(self) -> str:
        return f"DcpCheckpoint({self.url!r}, tensors={len(self.tensors)}, files={len(self.files)})"

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open_dir(cls, url: str, fs: Any, root: str, names: DcpNames | None = None) -> DcpCheckpoint:
        """Read `.metadata`, select and validate the model tensors, locate every chunk."""
        base = url.rstrip("/")
        md = _read_metadata(fs, root, f"{base}/{METADATA_NAME}", url)
        extra = [k for k in md.byte_keys if k.endswith("." + EXTRA_STATE) or k == EXTRA_STATE]
        mapping = select_names([*md.tensors, *extra], names, where=url)
        check_tensor_count(len(mapping), where=url)  # before per-tensor work (io.limits)
        places: dict[str, list[tuple[ChunkMeta, StorageEntry]]] = {}
        problems: list[str] = []
        for key in mapping:
            try:
                places[key] = _chunk_entries(md, key, base)
            except CheckpointError as e:
                problems.append(e.message)
        if problems:
            raise CheckpointError(problems[0] if len(problems) == 1 else
                                  f"{url}: {len(problems)} problems:\n  " + "\n  ".join(problems))
        by_file: dict[str, list[tuple[str, ChunkMeta, StorageEntry]]] = {}
        for key, entries in places.items():
            for chunk, entry in entries:
                by_file.setdefault(entry.path, []).append((key, chunk, entry))
        starts: dict[tuple[str, tuple[int, ...] | None], int] = {}
        sizes: dict[str, int] = {}

        def scan(fname: str) -> None:
            found, size = _scan_file(fs, root, base, fname, by_file[fname], md)
            starts.update(found)
            sizes[fname] = size

        files = sorted(by_file)
        if storage.is_local(fs) or len(files) <= 1:
            for f in files:
                scan(f)
        else:  # remote: each chunk costs round trips, so files are scanned side by side
            with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
                for _ in pool.map(scan, files):
                    pass
        tensors: dict[str, TensorInfo] = {}
        layouts: dict[str, _Layout] = {}
        for key, name in mapping.items():
            tm = md.tensors.get(key)
            shape = tm.size if tm is not None else (places[key][0][1].length,)
            dtype = st_dtype(tm.dtype) if tm is not None else "U8"
            assert dtype is not None
            lead, cols = _row_view(shape)
            pieces = []
            for chunk, entry in places[key]:
                start = starts[(key, chunk.offsets if tm is not None else None)]
                offs, szs = _piece_box(shape, chunk)
                pieces.append(_Piece(entry.path, start, offs, szs))
            first = min(pieces, key=lambda p: (p.file, p.start), default=_Piece("", 0, (), ()))  # empty: no chunks
            tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape, file=first.file, start=first.start,
                                       nbytes=math.prod(shape) * itemsize(dtype))
            layouts[name] = _Layout(lead=lead, cols=cols, pieces=tuple(pieces))
        return cls(url, fs, root, tensors, layouts, sizes)

    # -- data ------------------------------------------------------------------------------

    @contextmanager
    def _source(self, fname: str) -> Iterator[storage.ByteSource]:
        """The open data file `fname`; at most MAX_OPEN_FILES idle ones stay open."""
        with self._olock:
            src = self._open.get(fname)
            if src is not None:
                self._open.move_to_end(fname)
                self._users[fname] += 1
        if src is None:
            fresh = storage.open_source(self.fs, storage.join(self.root, fname))
            with self._olock:
                src = self._open.get(fname)
                if src is None:
                    src = self._open[fname] = fresh
                    self._users[fname] = 0
                else:
                    fresh.close()  # another thread opened it meanwhile
                self._users[fname] += 1
        try:
            yield src
        finally:
            with self._olock:
                self._users[fname] -= 1
                idle = [f for f in self._open if self._users[f] == 0]
                for f in idle[:max(0, len(self._open) - MAX_OPEN_FILES)]:
                    self._open.pop(f).close()
                    del self._users[f]

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        """Read rows [r0, r1) of tensor `name` into `out`: from each chunk holding part of
        them, the exact byte range of its rows inside [r0, r1)."""
        t = self.tensors[name]
        rb = t.row_bytes
        need = (r1 - r0) * rb
        if len(out) < need:
            raise ValueError(f"buffer of {len(out)} bytes is too small for {need}")
        if need == 0:
            return
        mv = out if (out.format == "B" and out.ndim == 1) else out.cast("B")
        lay = self._layouts[name]
        isz = itemsize(t.dtype)
        inner = math.prod(lay.lead[1:])
        first, last = r0 // inner, (r1 - 1) // inner  # dim-0 indices the rows touch
        dst: np.ndarray | None = None
        for p in lay.pieces:
            if p.offsets[0] > last or p.offsets[0] + p.sizes[0] <= first or not p.sizes[-1]:
                continue
            c0 = _rows_below(r0, lay.lead, p.offsets, p.sizes)
            c1 = _rows_below(r1, lay.lead, p.offsets, p.sizes)
            if c1 <= c0:
                continue
            crb = p.sizes[-1] * isz
            consecutive = p.sizes[1:-1] == lay.lead[1:]  # box rows are consecutive global rows
            with self._source(p.file) as src:
                if consecutive and p.sizes[-1] == lay.cols:  # whole rows: straight into `out`
                    g0 = p.offsets[0] * inner + c0 - r0
                    src.read_into(p.start + c0 * crb, mv[g0 * rb:(g0 + c1 - c0) * rb])
                    continue
                if dst is None:
                    dst = np.frombuffer(mv, dtype=np.uint8, count=need).reshape(r1 - r0, rb)
                step = max(1, SCRATCH_BYTES // crb)
                scratch = bytearray(min(c1 - c0, step) * crb)
                col = slice(p.offsets[-1] * isz, p.offsets[-1] * isz + crb)
                for a in range(c0, c1, step):
                    b = min(c1, a + step)
                    view = memoryview(scratch)[:(b - a) * crb]
                    src.read_into(p.start + a * crb, view)
                    block = np.frombuffer(view, dtype=np.uint8).reshape(b - a, crb)
                    if consecutive:
                        g = p.offsets[0] * inner + a - r0
                        dst[g:g + b - a, col] = block
                    else:
                        idx = np.unravel_index(np.arange(a, b), p.sizes[:-1])
                        rows = np.ravel_multi_index(tuple(i + o for i, o in zip(idx, p.offsets[:-1])), lay.lead)
                        dst[rows - r0, col] = block

    def close(self) -> None:
        with self._olock:
            for src in self._open.values():
                src.close()
            self._open.clear()
            self._users.clear()
        super().close()


def _read_metadata(fs: Any, root: str, where: str, url: str) -> DcpMetadata:
    path = storage.join(root, METADATA_NAME)
    src = storage.open_source(fs, path)
    try:
        if src.size > MAX_METADATA_BYTES:
            raise CheckpointError(f"{where}: {src.size} bytes, above the {MAX_METADATA_BYTES}-byte limit for "
                                  "DCP metadata (not a DCP .metadata file?)")
        raw = storage.read_bytes(src, 0, src.size)
    finally:
        src.close()
    return load_metadata(raw, where=where)


def _chunk_entries(md: DcpMetadata, key: str, base: str) -> list[tuple[ChunkMeta, StorageEntry]]:
    """Each stored chunk of `key` with its storage location; checks coverage and dtype."""
    where = f"{base}/{METADATA_NAME}: tensor `{key}`"
    tm: TensorMeta | None = md.tensors.get(key)
    if tm is None:  # a byte entry (_extra_state): one blob, read as a 1-D uint8 tensor
        entry = md.storage.get((key, None))
        if entry is None:
            raise CheckpointError(f"{where}: no storage entry for this byte entry (corrupt .metadata)")
        chunks = [ChunkMeta(offsets=(0,), sizes=(entry.length,))]
    else:
        if st_dtype(tm.dtype) is None:
            raise CheckpointError(f"{where}: dtype torch.{tm.dtype} is not supported (supported: float64, "
                                  "float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, integers, bool)")
        check_coverage(tm.size, tm.chunks, where=where)
        chunks = list(tm.chunks)
    out = []
    for c in chunks:
        entry = md.storage.get((key, c.offsets)) if tm is not None else md.storage[(key, None)]
        if entry is None:
            raise CheckpointError(f"{where}: chunk at offsets {list(c.offsets)} has no storage entry "
                                  "(corrupt .metadata)")
        if entry.transforms:
            raise CheckpointError(f"{where}: stored through DCP extensions {list(entry.transforms)} (e.g. "
                                  "compression); only plain DCP files can be read by byte ranges")
        storage.safe_relative(entry.path, where=where)
        out.append((c, entry))
    return out


def _scan_file(fs: Any, root: str, base: str, fname: str, chunks: list[tuple[str, ChunkMeta, StorageEntry]],
               md: DcpMetadata) -> tuple[dict[tuple[str, tuple[int, ...] | None], int], int]:
    """Locate the data of `chunks` (all in data file `fname`); returns their starts and the file size."""
    where = f"{base}/{fname}"
    path = storage.join(root, fname)
    first_key = chunks[0][0]
    if not fs.isfile(path):
        raise CheckpointError(f"{where}: data file of tensor `{first_key}` named in {METADATA_NAME} does not "
                              "exist (incomplete copy, or the checkpoint is still being written)")
    src = storage.open_source(fs, path)
    try:
        found: dict[tuple[str, tuple[int, ...] | None], int] = {}
        headers: dict[int, ShardHeader] = {}
        for key, chunk, entry in sorted(chunks, key=lambda c: c[2].offset):
            if entry.offset + entry.length > src.size:
                raise CheckpointError(
                    f"{where}: tensor `{key}` is stored at bytes {entry.offset}..{entry.offset + entry.length} "
                    f"but the file has {src.size} bytes (truncated file; re-copy it)"
                )
            tm = md.tensors.get(key)
            if tm is None:
                found[(key, None)] = entry.offset
                continue
            cw = f"{where}: tensor `{key}` chunk at offsets {list(chunk.offsets)}"
            place = locate_chunk(src, key, entry, chunk, tm.dtype, where=cw, st_headers=headers)
            found[(key, chunk.offsets)] = place.start
        return found, src.size
    finally:
        src.close()
