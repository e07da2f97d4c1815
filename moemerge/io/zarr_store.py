"""What moemerge's Zarr writer and reader share: store opening, array naming, dtype mapping.

A moemerge Zarr output is a Zarr v3 group. Its root attributes hold `moemerge` (format
version, sources, merge config); each tensor is one array directly under the root whose
attributes hold `moemerge: {name, dtype}` (the exact tensor name and its logical dtype).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import numpy as np

from moemerge.io import storage

__all__ = [
    "ATTR", "FORMAT_VERSION", "STORAGE_DTYPES", "array_path", "tensor_name", "open_store",
    "storage_dtype",
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


def open_store(url: str, storage_options: dict[str, Any] | None, *, read_only: bool) -> Any:
    """A zarr store for `url`: LocalStore for local paths, FsspecStore for any other URL."""
    from zarr.storage import FsspecStore, LocalStore

    fs, path = storage.resolve(url, storage_options)
    if storage.is_local(fs):
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
