"""Restricted unpicklers for PyTorch DCP: the `.metadata` file and each chunk's `data.pkl`.

Unpickling calls whatever the pickle names, so a crafted file could run code (`os.system`
through `__reduce__`). These unpicklers resolve only the names DCP metadata and a saved plain
tensor use, each to a harmless stand-in of our own (no torch object is built), and refuse any
other name before anything is called.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moemerge.errors import CheckpointError

__all__ = [
    "ChunkMeta",
    "TensorMeta",
    "StorageEntry",
    "DcpMetadata",
    "StoredTensor",
    "load_metadata",
    "load_stored_tensor",
]


class _Record:
    """Stand-in for a pickled DCP dataclass: keeps the pickled state as attributes."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) state
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__}: unexpected pickled state {type(state).__name__}")
        self.__dict__.update(state)


class _Metadata(_Record): ...
class _TensorStorageMetadata(_Record): ...
class _BytesStorageMetadata(_Record): ...
class _ChunkStorageMetadata(_Record): ...
class _StorageMeta(_Record): ...
class _MetadataIndex(_Record): ...
class _StorageInfo(_Record): ...


class _TensorProperties(_Record):
    def __setstate__(self, state: Any) -> None:
        # torch pickles (dtype, layout, requires_grad, memory format code, pin_memory)
        if isinstance(state, tuple) and state and isinstance(state[0], _DType):
            self.__dict__["dtype"] = state[0]
            return
        super().__setstate__(state)


@dataclass(frozen=True, slots=True)
class _DType:
    """A pickled `torch.<dtype>` global, by name."""

    name: str


@dataclass(frozen=True, slots=True)
class _StorageType:
    """A pickled storage class (`torch.BFloat16Storage`, `torch.storage.UntypedStorage`)."""

    name: str


def _size(dims: Any = ()) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def _identity(value: Any = None) -> Any:
    return value


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


_DTYPE_NAMES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))
_DCP = "torch.distributed.checkpoint.metadata"
_META_NAMES: dict[tuple[str, str], Any] = {
    (_DCP, "Metadata"): _Metadata,
    (_DCP, "TensorStorageMetadata"): _TensorStorageMetadata,
    (_DCP, "BytesStorageMetadata"): _BytesStorageMetadata,
    (_DCP, "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (_DCP, "TensorProperties"): _TensorProperties,
    (_DCP, "StorageMeta"): _StorageMeta,
    (_DCP, "MetadataIndex"): _MetadataIndex,
    (_DCP, "_MEM_FORMAT_ENCODING"): _identity,  # an enum, rebuilt from its int value
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    # torch < 2.2 pickled the sharded-tensor TensorProperties in DCP metadata
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"): _TensorProperties,
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _identity,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _identity,  # layout by name: "torch.strided"
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("pathlib", n): _path for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")},
}


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPE_NAMES:
            return _DType(name)
        if module == "torch" and name in ("strided", "sparse_coo"):
            return name
        found = _META_NAMES.get((module, name))
        if found is None:
            raise _Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in DCP metadata")


# -- the metadata, as plain records -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkMeta:
    """One stored box of a tensor: its offsets and sizes in the global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorMeta:
    """A tensor key of the checkpoint: torch dtype name, global size, stored chunks."""

    dtype: str  # torch name: "bfloat16"
    size: tuple[int, ...]
    chunks: tuple[ChunkMeta, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageEntry:
    """Where one chunk (or byte entry) is stored: a file of the checkpoint, a byte range."""

    path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DcpMetadata:
    """`.metadata` reduced to what a reader needs."""

    tensors: dict[str, TensorMeta]
    byte_keys: tuple[str, ...]
    storage: dict[tuple[str, tuple[int, ...] | None], StorageEntry]  # (key, chunk offsets)
    version: str | None


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} is {v!r}, not a non-negative integer")
    return v


def _dims(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple | list):
        raise ValueError(f"{what} is {v!r}, not a size")
    return tuple(_int(d, what) for d in v)


def _convert(md: Any) -> DcpMetadata:
    sdm = getattr(md, "state_dict_metadata", None) if isinstance(md, _Metadata) else None
    if not isinstance(sdm, dict):
        raise ValueError("it does not hold a DCP Metadata object with a state_dict_metadata mapping")
    tensors: dict[str, TensorMeta] = {}
    byte_keys: list[str] = []
    for key, entry in sdm.items():
        if not isinstance(key, str):
            raise ValueError(f"key {key!r} is not a string")
        if isinstance(entry, _BytesStorageMetadata):
            byte_keys.append(key)
            continue
        if not isinstance(entry, _TensorStorageMetadata):
            raise ValueError(f"key `{key}`: entry of type {type(entry).__name__}, not tensor or bytes metadata")
        props = getattr(entry, "properties", None)
        dtype = getattr(props, "dtype", None)
        if not isinstance(dtype, _DType):
            raise ValueError(f"key `{key}`: no dtype in its properties")
        size = _dims(getattr(entry, "size", None), f"key `{key}`: size")
        chunks = []
        for c in getattr(entry, "chunks", None) or ():
            if not isinstance(c, _ChunkStorageMetadata):
                raise ValueError(f"key `{key}`: a chunk of type {type(c).__name__}")
            offs = _dims(getattr(c, "offsets", None), f"key `{key}`: chunk offsets")
            sizes = _dims(getattr(c, "sizes", None), f"key `{key}`: chunk sizes")
            chunks.append(ChunkMeta(offsets=offs, sizes=sizes))
        tensors[key] = TensorMeta(dtype=dtype.name, size=size, chunks=tuple(chunks))
    storage: dict[tuple[str, tuple[int, ...] | None], StorageEntry] = {}
    raw = getattr(md, "storage_data", None)
    if not isinstance(raw, dict):
        raise ValueError("its storage_data is not a mapping of chunk -> file location")
    for index, info in raw.items():
        if not isinstance(index, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise ValueError(f"storage_data holds {type(index).__name__} -> {type(info).__name__}, "
                             "not MetadataIndex -> _StorageInfo (a storage layout this reader does not know)")
        fqn = getattr(index, "fqn", None)
        offset = getattr(index, "offset", None)
        path = getattr(info, "relative_path", None)
        if not isinstance(fqn, str) or not isinstance(path, str):
            raise ValueError("a storage_data entry has no key or no relative_path")
        transforms = getattr(info, "transform_descriptors", None) or ()
        storage[(fqn, None if offset is None else _dims(offset, f"key `{fqn}`: offset"))] = StorageEntry(
            path=path, offset=_int(getattr(info, "offset", None), f"key `{fqn}`: storage offset"),
            length=_int(getattr(info, "length", None), f"key `{fqn}`: storage length"),
            transforms=tuple(str(t) for t in transforms),
        )
    version = getattr(md, "version", None)
    return DcpMetadata(tensors=tensors, byte_keys=tuple(byte_keys), storage=storage,
                       version=version if isinstance(version, str) else None)


def _load(unpickler: type[pickle.Unpickler], raw: bytes, *, refused: Callable[[str], str],
          unreadable: Callable[[Exception], str]) -> Any:
    """Unpickle `raw` with a restricted unpickler; both failures become a CheckpointError."""
    try:
        return unpickler(io.BytesIO(raw)).load()
    except _Refused as e:
        raise CheckpointError(refused(e.what)) from None
    except Exception as e:  # truncated, not a pickle, a stand-in given odd arguments
        raise CheckpointError(unreadable(e)) from None


def load_metadata(raw: bytes, *, where: str) -> DcpMetadata:
    """Parse the bytes of a DCP `.metadata` file; refuse any pickled name outside DCP metadata."""
    md = _load(
        _MetadataUnpickler, raw,
        refused=lambda what: (
            f"{where}: refers to `{what}`, which is not part of PyTorch DCP metadata; refusing to "
            "unpickle it (a crafted .metadata could run code). Use checkpoints from sources you trust."),
        unreadable=lambda e: (
            f"{where}: not a readable DCP metadata pickle ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt, or the checkpoint is still being written"),
    )
    try:
        return _convert(md)
    except ValueError as e:
        raise CheckpointError(f"{where}: malformed DCP metadata: {e}") from None


# -- a chunk's data.pkl (torch.save of one plain tensor) ---------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredTensor:
    """What `torch.save` recorded for one tensor: dtype, storage record key, view geometry."""

    dtype: str  # torch name
    key: str  # the archive entry `data/<key>` holding the storage bytes
    storage_offset: int  # in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _StorageRef:
    type: _StorageType
    key: str


_LEGACY_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


def _rebuild_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> StoredTensor:
    if not isinstance(storage, _StorageRef) or storage.type.name not in _LEGACY_STORAGE_DTYPES:
        raise pickle.UnpicklingError(f"tensor storage {storage!r} is not a typed storage")
    return StoredTensor(dtype=_LEGACY_STORAGE_DTYPES[storage.type.name], key=storage.key,
                        storage_offset=int(storage_offset), size=_size(size), stride=_size(stride))


def _rebuild_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                hooks: Any, dtype: Any, *rest: Any) -> StoredTensor:
    if not isinstance(storage, _StorageRef) or not isinstance(dtype, _DType):
        raise pickle.UnpicklingError("tensor rebuilt without an untyped storage and a dtype")
    return StoredTensor(dtype=dtype.name, key=storage.key, storage_offset=int(storage_offset),
                        size=_size(size), stride=_size(stride))


_TENSOR_NAMES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPE_NAMES:
            return _DType(name)
        if module == "torch" and name in _LEGACY_STORAGE_DTYPES:
            return _StorageType(name)
        found = _TENSOR_NAMES.get((module, name))
        if found is None:
            raise _Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage type, key, location, numel)
        if (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            return _StorageRef(pid[1], pid[2])
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def load_stored_tensor(raw: bytes, *, where: str) -> StoredTensor:
    """Parse a chunk archive's `data.pkl`: one plain tensor, or a clear CheckpointError."""
    obj = _load(
        _TensorUnpickler, raw,
        refused=lambda what: (
            f"{where}: the stored chunk refers to `{what}`; only plain tensors saved by DCP can be "
            "read (refusing to unpickle anything else, as it could run code)"),
        unreadable=lambda e: (
            f"{where}: the stored chunk's data.pkl is unreadable ({type(e).__name__}: {e}); the file is corrupt"),
    )
    if not isinstance(obj, StoredTensor):
        raise CheckpointError(f"{where}: the stored chunk holds a {type(obj).__name__}, not a tensor")
    return obj
