"""The safetensors byte layout: build a header, parse and validate one (pure functions).

Layout (see formats.md): u64 little-endian header length N, N bytes of JSON padded with
spaces so that 8 + N is a multiple of 8, then the tensors packed back to back.
"""

from __future__ import annotations

import json
import math
import re
import struct
from sys import intern
from dataclasses import dataclass

from moemerge._gc import paused
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
    "parse_header_entries",
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


def parse_header(raw: bytes, *, file_size: int, where: str) -> ShardHeader:
    """Validate the JSON header of a file of `file_size` bytes; `raw` is the N header bytes.

    Checks every rule of formats.md: JSON object, known dtypes, shapes of non-negative
    ints, offsets matching shape x itemsize, no gaps or overlaps, data ending at end of file.
    """
    data_start, metadata, entries = parse_header_entries(raw, file_size=file_size, where=where)
    tensors = {name: TensorEntry(name=name, dtype=dtype, shape=shape, start=start, nbytes=nbytes)
               for name, dtype, shape, start, nbytes in entries}
    return ShardHeader(data_start=data_start, tensors=tensors, metadata=metadata)


#: (name, dtype, shape, absolute start, nbytes) of one tensor, in header order.
Entry = tuple[str, str, tuple[int, ...], int, int]
_INT = {int}
_DTYPE_NAMES = {name: name for name in DTYPES}


def parse_header_entries(raw: bytes, *, file_size: int, where: str,
                         shapes: dict[tuple[int, ...], tuple[int, ...]] | None = None,
                         ) -> tuple[int, dict[str, str], list[Entry]]:
    """`parse_header`'s checks, returning plain tuples: (data start, metadata, entries).

    For callers that keep their own per-tensor records (`Checkpoint`), at 92k tensors a
    second object per tensor costs seconds. `shapes` (a cache shared across shards) makes
    equal shapes one tuple: a checkpoint has a few dozen distinct shapes.
    """
    data_start = 8 + len(raw)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise CheckpointError(f"{where}: header does not start with '{{' (not a safetensors file)")
    # every tensor entry has one "data_offsets" key: counting them (C speed, ~0.1 s for 100 MB)
    # refuses a header of millions of tensors before decoding it (seconds and gigabytes)
    check_tensor_count(raw.count(b'"data_offsets"'), where=where)
    doc = _decode(raw, where)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    check_tensor_count(len(doc) - ("__metadata__" in doc), where=where)  # before per-tensor work
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: __metadata__ is not a map of strings")
    data_len = file_size - data_start
    entries: list[Entry] = []
    spans: list[tuple[int, int, str]] = []
    shapes = {} if shapes is None else shapes
    sizes = DTYPES
    for name, info in doc.items():
        # the common case tested with C-speed checks (types compared exactly: a bool is no
        # int, a float is no int); anything odd goes to `_bad_entry` for the message
        if type(info) is not dict:
            raise CheckpointError(f"{where}: tensor `{name}`: entry is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if (dtype not in sizes or type(shape) is not list or not set(map(type, shape)) <= _INT
                or (shape and min(shape) < 0) or type(offs) is not list or len(offs) != 2):
            raise _bad_entry(where, name, dtype, shape, offs)
        begin, end = offs
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            raise _bad_entry(where, name, dtype, shape, offs)
        expect = math.prod(shape) * sizes[dtype]
        if end - begin != expect:
            raise CheckpointError(
                f"{where}: tensor `{name}`: data_offsets {offs} span {end - begin} bytes but "
                f"{dtype}{shape} needs {expect} (corrupt header)"
            )
        if end > data_len:
            raise CheckpointError(
                f"{where}: tensor `{name}`: data ends at byte {data_start + end} but the file has "
                f"{file_size} bytes (truncated file; re-copy it)"
            )
        spans.append((begin, end, name))
        key = tuple(shape)
        # one string per dtype and per tensor name across every checkpoint opened, one tuple per
        # shape: about 60 MB less at 3 x 92k tensors (the JSON decoder makes each anew)
        entries.append((intern(name), _DTYPE_NAMES[dtype], shapes.setdefault(key, key), data_start + begin, expect))
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
    return data_start, dict(metadata), entries


def _decode(raw: bytes, where: str) -> object:
    """The header's JSON, refusing a repeated key in any object (JSON lets the last one win)."""
    try:
        text = raw.decode("utf-8")
        with paused():  # hundreds of thousands of objects, none in a cycle (moemerge._gc)
            doc = json.loads(text)
            if not _no_repeated_keys(raw, doc):  # decode again with the hook, which names the key
                doc = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as e:
        # JSON allows repeated keys (the last wins); safetensors readers must refuse them
        raise CheckpointError(
            f"{where}: header names `{e.key}` twice (a duplicate tensor name or field); the file is corrupt"
        ) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e}); the file is corrupt") from e
    return doc


#: Where a key ends in JSON text: its closing quote, optional JSON whitespace, a colon.
_KEY_END = re.compile(rb'"[ \t\n\r]*:')


def _no_repeated_keys(raw: bytes, doc: object) -> bool:
    """True when `doc`, decoded from `raw` without a hook, lost no repeated key (a C-speed
    check; the hook costs a Python call per object, half the decode at 92k tensors).

    Every key written in `raw` matches `_KEY_END` at its closing quote, so the matches are at
    least the keys written (more when a string value holds `":`). The keys kept in the top
    object and the objects one level down are at most the keys written, and fewer exactly when
    a key was repeated or sits deeper. Equal counts therefore prove no key was repeated; any
    doubt (a repeat, a deeper object, a value ending in a quote and a colon) returns False."""
    if not isinstance(doc, dict):
        return False
    kept = len(doc)
    for v in doc.values():
        if type(v) is dict:
            kept += len(v)
    return len(_KEY_END.findall(raw)) == kept


def _bad_entry(where: str, name: str, dtype: object, shape: object, offs: object) -> CheckpointError:
    """The error for an entry the fast checks refused, naming its first bad field."""
    bad = f"{where}: tensor `{name}`"
    if dtype not in DTYPES:
        return CheckpointError(f"{bad}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative ints")
    return CheckpointError(f"{bad}: data_offsets {offs!r} are not [begin, end] with begin <= end")
