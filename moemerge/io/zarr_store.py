"""What moemerge's Zarr writer and reader share: store opening, array naming, dtype mapping.

A moemerge Zarr output is a Zarr v3 group. Its root attributes hold `moemerge` (format
version, sources, merge config); each tensor is one array directly under the root whose
attributes hold `moemerge: {name, dtype}` (the exact tensor name and its logical dtype).
"""

from __future__ import annotations

import re
import urllib.parse
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from moemerge.errors import CheckpointError
from moemerge.io import storage

__all__ = [
    "ATTR", "FORMAT_VERSION", "STORAGE_DTYPES", "DAMAGED_STORE_HINT", "array_path", "tensor_name",
    "open_store", "storage_dtype", "chunk_checksum",
]

#: The attribute key under which moemerge records what it wrote (root and every array).
ATTR = "moemerge"
FORMAT_VERSION = 1

#: safetensors dtype -> the numpy dtype of the stored array. Zarr v3 has no bfloat16 and no
#: float8, so those keep their raw bit patterns in same-sized unsigned ints; the logical dtype
#: lives in the array's attributes and the reader restores it bit for bit.
STORAGE_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16",
    "BF16": "uint16", "F8_E4M3": "uint8", "F8_E5M2": "uint8",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}

#: Characters kept as-is in array names: every usual tensor name (`model.layers.0.mlp.w1`)
#: is its own array name; anything else (`/`, `%`, spaces...) is percent-encoded so that a
#: name never creates nested groups and decodes back exactly.
_SAFE = "-_.~"


def storage_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype a tensor of safetensors dtype `dtype` is stored as."""
    return np.dtype(STORAGE_DTYPES[dtype])


def array_path(name: str) -> str:
    """Tensor name -> Zarr array name: array_path('a.b/c') == 'a.b%2Fc'.

    Zarr v3 reserves names starting with `__` and the names `.`/`..`; their first character
    is encoded too.
    """
    path = urllib.parse.quote(name, safe=_SAFE)
    if path in ("", ".", "..") or path.startswith("__"):
        path = f"%{ord(path[0]):02X}{path[1:]}" if path else "%00"
    return path


def tensor_name(path: str) -> str:
    """The inverse of `array_path` (the reader prefers the name in the array's attributes)."""
    return "" if path == "%00" else urllib.parse.unquote(path)


#: What to do about a damaged moemerge Zarr store read as a model (a state says its own).
DAMAGED_STORE_HINT = "restore the missing object, or write the store again (re-run the merge that made it)"

#: A chunk key of an array directly under the root, v3 default encoding: `<array>/c/3/0`
#: (`<array>/c` for a 0-d array). Array names never hold `/` (array_path encodes it).
_CHUNK_KEY = re.compile(r"^(?P<array>[^/]+)/c(?:/(?P<coords>.+))?$")


def chunk_checksum(data: Any) -> str:
    """The checksum recorded for one stored chunk object (its bytes as stored, after codecs):
    crc32 as 8 hex digits, about 1 GB/s, enough to tell a damaged or swapped chunk."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def open_store(url: str, storage_options: dict[str, Any] | None, *, read_only: bool,
               hint: str | None = None, checksums: Mapping[str, str] | None = None,
               record: dict[str, str] | None = None) -> Any:
    """A zarr store for `url`: LocalStore for local paths, FsspecStore for any other URL.

    A read-only store refuses missing chunks (zarr 3.1 would return the fill value: zeros
    read as weights): reading one raises a CheckpointError naming the array and chunk and
    ending with `hint`. `checksums` (chunk key -> `chunk_checksum`) are verified on read.
    A writable store records the checksum of every chunk it stores into `record` if given.
    """
    from zarr.storage import FsspecStore, LocalStore

    fs, path = storage.resolve(url, storage_options)
    if storage.is_local(fs):
        store: Any = LocalStore(path, read_only=read_only)
    else:
        store = FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    if not read_only:
        # a writer's own reads (zarr merging a partial chunk) may find a chunk not yet written
        return store if record is None else _complete_store_class()(store, url=url, hint="", checksums=None,
                                                                    record=record, strict=False)
    return _complete_store_class()(store, url=url, hint=hint or DAMAGED_STORE_HINT, checksums=checksums)


_COMPLETE_STORE: Any = None


def _complete_store_class() -> Any:
    """`CompleteStore`, defined on first use so that zarr is imported only when needed."""
    global _COMPLETE_STORE
    if _COMPLETE_STORE is not None:
        return _COMPLETE_STORE
    from zarr.storage import WrapperStore

    class CompleteStore(WrapperStore[Any]):
        """A store whose chunk reads are complete or fail (and whose writes may be recorded).

        zarr 3.1.6 has no setting to raise on a missing chunk (zarr-python #486; a
        `MissingChunkError` option came later, in PR #3748), and treats `get` returning None
        as "fill with fill_value". This wrapper turns that None into an error, at no extra
        request: a missing chunk costs what zarr already does (one failed GET/open).
        """

        def __init__(self, store: Any, *, url: str, hint: str, checksums: Mapping[str, str] | None,
                     record: dict[str, str] | None = None, strict: bool = True) -> None:
            super().__init__(store)
            self.url, self.hint, self.checksums, self.record = url.rstrip("/"), hint, checksums, record
            self.strict = strict

        def _with_store(self, store: Any) -> Any:
            return type(self)(store, url=self.url, hint=self.hint, checksums=self.checksums, record=self.record,
                              strict=self.strict)

        async def set(self, key: str, value: Any) -> None:
            await self._store.set(key, value)
            if self.record is not None and _CHUNK_KEY.match(key):
                self.record[key] = chunk_checksum(value.as_numpy_array())

        def _check(self, key: str, buf: Any, byte_range: Any) -> Any:
            m = _CHUNK_KEY.match(key) if self.strict else None
            if m is None:
                return buf
            where = f"{self.url}/{m.group('array')}: chunk {(m.group('coords') or '').replace('/', '.') or '()'}"
            if buf is None:
                raise CheckpointError(f"{where} is missing (a deleted or unfinished object); "
                                      f"the store is damaged: {self.hint}")
            want = self.checksums.get(key) if self.checksums is not None and byte_range is None else None
            if want is not None and chunk_checksum(buf.as_numpy_array()) != want:
                raise CheckpointError(f"{where} does not match the checksum recorded when it was "
                                      f"written (a damaged or replaced object): {self.hint}")
            return buf

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            return self._check(key, await self._store.get(key, prototype, byte_range), byte_range)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            key_ranges = list(key_ranges)
            got = await self._store.get_partial_values(prototype, key_ranges)
            return [self._check(k, b, r) for (k, r), b in zip(key_ranges, got, strict=True)]

    _COMPLETE_STORE = CompleteStore
    return CompleteStore
