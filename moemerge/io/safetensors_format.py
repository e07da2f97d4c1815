"""The safetensors byte layout: build a header, parse and validate one (pure functions).

Layout (see formats.md): u64 little-endian header length N, N bytes of JSON padded with
spaces so that 8 + N is a multiple of 8, then the tensors packed back to back.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from moemerge.errors import CheckpointError
from moemerge.io.dtypes import DTYPES, itemsize
from moemerge.io.limits import DuplicateKey, check_tensor_count, no_duplicate_keys

__all__ = [
    "MAX_HEADER_BYTES",
    "TensorEntry",
    "ShardHeader",
    "ShardLayout",
    "build_header",
    "parse_header_length",
    "parse_header",
]

#: Readers refuse headers above 100 MB (the safetensors reference limit): a corrupt length
#: field must not make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are, relative to the file start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardHeader:
    """A parsed and validated safetensors header."""

    data_start: int  # 8 + N
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardLayout:
    """One output safetensors file, fully laid out before compute."""

    file: str
    header: bytes
    size: int
    tensors: tuple[str, ...]



def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """Lay out `(name, dtype, shape)` tensors back to back in the given order.

    Returns the header bytes (length prefix included, padded to a multiple of 8) and each
    tensor's absolute byte offset in the file. Example: one F32 tensor of shape (2, 3) gives
    offsets {"x": len(header)} and a file of len(header) + 24 bytes.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    rel: dict[str, int] = {}
    for name, dtype, shape in tensors:
        n = math.prod(shape) * itemsize(dtype)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        rel[name] = pos
        pos += n
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * ((-(8 + len(body))) % 8)
    data_start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, {k: data_start + v for k, v in rel.items()}


def parse_header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """Read N from the first 8 bytes and check it against the file size and the limit."""
    if len(prefix) < 8 or file_size < 8:
        raise CheckpointError(
            f"{where}: file is {file_size} bytes, too short to be safetensors "
            "(truncated download? re-copy the file)"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{where}: header length field says {n} bytes, above the {MAX_HEADER_BYTES} limit "
            "(corrupt or not a safetensors file)"
        )
    if 8 + n > file_size:
        raise CheckpointError(
            f"{where}: header length {n} runs past the end of the {file_size}-byte file "
            "(truncated or corrupt; re-copy the file)"
        )
    return int(n)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a header is decoded: it allocates millions of objects, each batch
    triggering a full collection over all of them (3x the decode time measured at 1M tensors);
    a JSON document has no reference cycles to collect."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_header(raw: bytes, *, file_size: int, where: str) -> ShardHeader:
    """Validate the JSON header of a file of `file_size` bytes; `raw` is the N header bytes.

    Checks every rule of formats.md: JSON object, known dtypes, shapes of non-negative
    ints, offsets matching shape x itemsize, no gaps or overlaps, data ending at end of file.
    """
    data_start = 8 + len(raw)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise CheckpointError(f"{where}: header does not start with '{{' (not a safetensors file)")
    # every tensor entry has one "data_offsets" key: counting them (C speed, ~0.1 s for 100 MB)
    # refuses a header of millions of tensors before decoding it (seconds and gigabytes)
    check_tensor_count(raw.count(b'"data_offsets"'), where=where)
    try:
        with _gc_paused():
            doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as e:
        # JSON allows repeated keys (the last wins); safetensors readers must refuse them
        raise CheckpointError(
            f"{where}: header names `{e.key}` twice (a duplicate tensor name or field); the file is corrupt"
        ) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    check_tensor_count(len(doc) - ("__metadata__" in doc), where=where)  # before per-tensor work
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: __metadata__ is not a map of strings")
    data_len = file_size - data_start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        bad = f"{where}: tensor `{name}`"
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad}: entry is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(f"{bad}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative ints")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(f"{bad}: data_offsets {offs!r} are not [begin, end] with begin <= end")
        expect = math.prod(shape) * itemsize(dtype)
        if offs[1] - offs[0] != expect:
            raise CheckpointError(
                f"{bad}: data_offsets {offs} span {offs[1] - offs[0]} bytes but "
                f"{dtype}{shape} needs {expect} (corrupt header)"
            )
        if offs[1] > data_len:
            raise CheckpointError(
                f"{bad}: data ends at byte {data_start + offs[1]} but the file has "
                f"{file_size} bytes (truncated file; re-copy it)"
            )
        spans.append((offs[0], offs[1], name))
        tensors[name] = TensorEntry(
            name=name, dtype=dtype, shape=tuple(shape), start=data_start + offs[0], nbytes=expect
        )
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise CheckpointError(f"{where}: tensor `{name}` (data_offsets [{begin}, {end}]) {kind}; corrupt header")
        pos = end
    if pos != data_len:
        raise CheckpointError(
            f"{where}: tensors end at data byte {pos} but the file holds {data_len} data bytes "
            "(trailing garbage or truncated; re-copy the file)"
        )
    return ShardHeader(data_start=data_start, tensors=tensors, metadata=dict(metadata))
