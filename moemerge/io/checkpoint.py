"""Read a safetensors checkpoint (a sharded directory, one model.safetensors, a bare file),
headers only; `Checkpoint.open(url)` opens any format (io.formats).

The safetensors reader reads the index and every shard header (two small reads per shard),
validates them, and then serves exact row ranges of any tensor into a caller's buffer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moemerge._gc import gc_paused
from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.dtypes import itemsize
from moemerge.io.limits import MAX_JSON_BYTES, check_tensor_count, loads_unique, read_limited
from moemerge.io.sidefiles import side_file_limit
from moemerge.io.safetensors_format import parse_header_entries, parse_header_length

if TYPE_CHECKING:
    from moemerge.names import DcpNames

__all__ = ["INDEX_NAME", "SINGLE_NAME", "RowShaped", "TensorInfo", "Checkpoint", "row_geometry", "shared_records",
           "shared_table", "sharing"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def row_geometry(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row) of the row-chunking view of a tensor.

    A row is a slice along the last dim, so rows run over all leading dims in order (a fused
    3-D expert tensor [E, H, C] has E*H rows of C): a row range is one contiguous byte range.
    A 1-D tensor has one element per row so that huge vectors still chunk; a scalar is 1 x 1.
    """
    if len(shape) >= 2:
        row_len = shape[-1]
        return (math.prod(shape[:-1]) if row_len else 0), row_len
    return (shape[0] if shape else 1), 1


class RowShaped:
    """`rows` and `row_len` (the row-chunking view, `row_geometry`) of anything with a `shape`."""

    __slots__ = ()
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return row_geometry(self.shape)[0]

    @property
    def row_len(self) -> int:
        return row_geometry(self.shape)[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo(RowShaped):
    """Where one tensor of a checkpoint lives and what it is."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # file name inside the checkpoint directory
    start: int  # absolute byte offset in that file
    nbytes: int
    # a quantized tensor served dequantized (io.quant): its codec, the bytes its parts take on
    # disk (what reading it costs), and the rows a chunk boundary must fall on
    codec: str | None = None
    stored_nbytes: int | None = None
    row_align: int = 1

    @property
    def read_nbytes(self) -> int:
        """Bytes read from storage for the whole tensor."""
        return self.nbytes if self.stored_nbytes is None else self.stored_nbytes

    @property
    def row_bytes(self) -> int:
        return self.row_len * itemsize(self.dtype)


class Checkpoint:
    """A checkpoint directory: its tensors (from headers) and range reads of their rows."""

    def __init__(
        self, url: str, fs: Any, root: str, tensors: dict[str, TensorInfo], files: dict[str, int]
    ) -> None:
        self.url = url
        self.fs = fs
        self.root = root
        self.tensors = tensors
        self.files = files  # file name -> size in bytes
        self.header_digests: dict[str, str] = {}  # shard file name -> sha256 of its JSON header
        self._sources: dict[str, storage.ByteSource] = {}
        self._bare = False  # `url` is one .safetensors file, not a directory
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Checkpoint({self.url!r}, tensors={len(self.tensors)}, files={len(self.files)})"

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None, *,
             names: DcpNames | None = None) -> Checkpoint:
        """Open the checkpoint at `url` in whichever format it is (`io.formats.FORMATS`: a
        moemerge Zarr output, a .safetensors file, a Hugging Face safetensors directory, a
        PyTorch DCP directory), reading and validating its headers only.

        `names` picks and renames a DCP checkpoint's model keys (None: the `model.` keys, see
        `moemerge.names`).
        """
        from moemerge.io.formats import open_checkpoint

        return open_checkpoint(url, storage_options, names=names)

    @classmethod
    def open_file(cls, url: str, fs: Any, path: str) -> Checkpoint:
        """A bare .safetensors file at `path`: a one-shard checkpoint."""
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        ckpt = cls(url, fs, parent, {}, {})
        ckpt._bare = True
        return ckpt._loaded(lambda: {name: None})

    @classmethod
    def open_index(cls, url: str, fs: Any, root: str) -> Checkpoint:
        """A Hugging Face directory of shards listed in its model.safetensors.index.json."""
        ckpt = cls(url, fs, root, {}, {})
        return ckpt._loaded(lambda: ckpt._read_index(storage.join(root, INDEX_NAME)))

    @classmethod
    def open_single(cls, url: str, fs: Any, root: str) -> Checkpoint:
        """A Hugging Face directory holding one model.safetensors."""
        return cls(url, fs, root, {}, {})._loaded(lambda: {SINGLE_NAME: None})

    def _loaded(self, files: Callable[[], dict[str, list[str] | None]]) -> Checkpoint:
        """Load the shard headers `files()` names; close what was opened if any is bad."""
        try:
            self._load_shards(files())
            if not self.tensors:
                # an empty weight_map (or header) would "merge" into an empty model
                raise CheckpointError(f"{self.url}: holds no tensors; nothing to merge (incomplete copy?)")
        except BaseException:
            self.close()
            raise
        return self

    def _read_index(self, index_path: str) -> dict[str, list[str] | None]:
        where = f"{self.url}/{INDEX_NAME}"
        try:
            # size checked before reading; a repeated tensor name is refused, not "last wins"
            doc = loads_unique(storage.with_retries(
                lambda: read_limited(self.fs, index_path, where=where, limit=MAX_JSON_BYTES, what=INDEX_NAME),
                what=f"read {INDEX_NAME}", url=self.url) or b"", where=where)
        except ValueError as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from e
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()
        ):
            raise CheckpointError(f"{where}: has no 'weight_map' object of tensor name -> file name")
        check_tensor_count(len(wmap), where=where)
        by_file: dict[str, list[str] | None] = {}
        safe: dict[str, str] = {}  # each file name checked once, not once per tensor
        for tensor, fname in wmap.items():
            rel = safe.get(fname)
            if rel is None:
                rel = safe[fname] = storage.safe_relative(fname, where=where)
            names = by_file.setdefault(rel, [])
            assert names is not None
            names.append(tensor)
        return by_file

    @gc_paused  # a few objects per tensor, none in a cycle (moemerge._gc)
    def _load_shards(self, by_file: dict[str, list[str] | None]) -> None:
        shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # equal shapes share one tuple
        tensors = self.tensors
        for fname, expected in sorted(by_file.items()):
            path = storage.join(self.root, fname) if self.root else fname
            where = self.url if self._bare else f"{self.url.rstrip('/')}/{fname}"
            if not self.fs.isfile(path):
                raise CheckpointError(
                    f"{where}: shard named in {INDEX_NAME} does not exist (incomplete download "
                    "or copy?)"
                )
            src = storage.open_source(self.fs, path)
            self._sources[fname] = src
            n = parse_header_length(storage.read_bytes(src, 0, 8) if src.size >= 8 else b"",
                                    file_size=src.size, where=where)
            raw = storage.read_bytes(src, 8, n)
            digest = self.header_digests[fname] = hashlib.sha256(raw).hexdigest()  # the input's identity (io.identity)
            self.files[fname] = src.size
            infos = _parsed_shard(raw, digest, fname, src.size, where, shapes)
            check_tensor_count(len(tensors) + len(infos), where=self.url)  # all shards
            if expected is not None:  # the index lists this shard's tensors: exactly those, in its order
                at = {t.name: t for t in infos}
                for name in expected:
                    if name not in at:
                        raise CheckpointError(
                            f"{where}: tensor `{name}` is listed in {INDEX_NAME} for this shard "
                            "but the shard does not contain it"
                        )
                infos = tuple(at[name] for name in expected)
            for t in infos:
                if t.name in tensors:
                    raise CheckpointError(f"{where}: tensor `{t.name}` appears in two shards")
                tensors[t.name] = t

    # -- side files ------------------------------------------------------------------------

    def side_file(self, name: str) -> bytes | None:
        """Bytes of a small file beside the weights (config.json, tokenizer files), or None."""
        path = storage.join(self.root, name)
        try:
            return read_limited(self.fs, path, where=f"{self.url.rstrip('/')}/{name}",
                                limit=side_file_limit(name), what=name)
        except FileNotFoundError:
            return None

    def config(self) -> dict[str, Any] | None:
        raw = self.side_file("config.json")
        if raw is None:
            return None
        try:
            cfg = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"{self.url}/config.json: not valid JSON ({e})") from e
        return cfg if isinstance(cfg, dict) else None

    # -- data ------------------------------------------------------------------------------

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        """Read rows [r0, r1) of tensor `name` as one exact byte range into `out`."""
        t = self.tensors[name]
        rb = t.row_bytes
        need = (r1 - r0) * rb
        if len(out) < need:
            raise ValueError(f"buffer of {len(out)} bytes is too small for {need}")
        self._sources[t.file].read_into(t.start + r0 * rb, out[:need])

    def prefetch_rows(self, name: str, r0: int, r1: int) -> int:
        """Hint that rows [r0, r1) of tensor `name` are read soon: a local file starts reading
        them into the page cache (other storage: nothing). Returns the bytes hinted."""
        t = self.tensors.get(name)
        src = self._sources.get(t.file) if t is not None else None
        hint = getattr(src, "prefetch", None)
        if t is None or hint is None or t.stored_nbytes is not None:  # quantized: other byte ranges
            return 0
        rb = t.row_bytes
        hint(t.start + r0 * rb, (r1 - r0) * rb)
        return (r1 - r0) * rb

    def iter_rows(self, name: str, buf: bytearray) -> Iterator[tuple[int, memoryview]]:
        """Read tensor `name` in order, as many rows at a time as fit `buf`.

        Yields (first row, bytes); a single row bigger than `buf` gets a buffer of its own.
        """
        t = self.tensors[name]
        rows_per = max(1, len(buf) // max(1, t.row_bytes))
        for r0 in range(0, t.rows if t.nbytes else 0, rows_per):
            r1 = min(t.rows, r0 + rows_per)
            n = (r1 - r0) * t.row_bytes
            view = memoryview(buf)[:n] if n <= len(buf) else memoryview(bytearray(n))
            self.read_rows(name, r0, r1, view)
            yield r0, view

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()


#: Shards already parsed, by (header sha256, file name, file size): the inputs of a merge are
#: usually fine-tunes saved alike, whose shard headers are byte for byte the same; inside
#: `shared_records` each is parsed once and its records shared (frozen, so sharing is invisible).
_PARSED: dict[tuple[str, str, int], tuple[TensorInfo, ...]] = {}
#: The record of each (name, dtype, shape, start, nbytes, file) seen inside `shared_records`.
_RECORDS: dict[tuple[Any, ...], TensorInfo] = {}
_TABLES: list[dict[Any, Any]] = [_PARSED, _RECORDS]
_LOCK = threading.Lock()
_depth = 0


def shared_table() -> dict[Any, Any]:
    """A lookup table that `shared_records` empties when its outermost block ends (io.quant
    keeps the specs made for shared records in one)."""
    table: dict[Any, Any] = {}
    _TABLES.append(table)
    return table


def sharing() -> bool:
    """Inside a `shared_records` block."""
    return _depth > 0


@contextlib.contextmanager
def shared_records() -> Iterator[None]:
    """Checkpoints opened inside share the records of byte-identical shard headers (each parsed
    once: three DeepSeek-V3 inputs hold one set of 92k records, not three); the tables that
    find them are emptied when the outermost block ends, so nothing outlives the opening."""
    global _depth
    with _LOCK:
        _depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if not _depth:
                for table in _TABLES:
                    table.clear()


def _parsed_shard(raw: bytes, digest: str, fname: str, size: int, where: str,
                  shapes: dict[tuple[int, ...], tuple[int, ...]]) -> tuple[TensorInfo, ...]:
    """The tensors of one shard's header `raw` (validated by `parse_header_entries`), in header
    order; inside `shared_records`, the same records for the same header bytes, name and size."""
    key = (digest, fname, size)
    hit = _PARSED.get(key) if _depth else None
    if hit is not None:
        return hit
    _, _, entries = parse_header_entries(raw, file_size=size, where=where, shapes=shapes)
    if not _depth:
        return tuple(TensorInfo(name=name, dtype=dtype, shape=shape, file=fname, start=start, nbytes=nbytes)
                     for name, dtype, shape, start, nbytes in entries)
    # headers that differ (in their metadata, say) still describe mostly equal tensors: one
    # record per (entry, file), so that those inputs share records (and quantized specs) too
    records = _RECORDS
    infos = tuple(
        records.get(e + (fname,)) or records.setdefault(e + (fname,), TensorInfo(
            name=e[0], dtype=e[1], shape=e[2], file=fname, start=e[3], nbytes=e[4]))
        for e in entries)
    _PARSED[key] = infos
    return infos
