"""Write a merge as a PyTorch Distributed Checkpoint (`--format dcp`) that
`torch.distributed.checkpoint.load` reads into the training model's state dict (PMA-init).

Layout: every tensor is one chunk (offsets 0), stored as DCP's default writer stores it, a
`torch.save` archive (io.dcp_archive) at a fixed offset of a data file `__0_{i}.distcp` (one per
planned shard, so `--shard-size` bounds the files). Archives are laid out in `prepare`; rows
are written in place in any order; `finish` patches each tensor's CRC-32, flushes, writes the
side files, then `.metadata` (the DCP commit: torch's own classes, pickled as FileSystemWriter
does), then the manifest (moemerge's commit). Until then the directory has the
`.moemerge-incomplete` marker and no `.metadata`, so neither DCP nor moemerge loads it.
Overwrites, locks and the manifest follow io.writer / io.swap, as for safetensors.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from moemerge.errors import OutputError
from moemerge.io import storage
from moemerge.io.checkpoint import INDEX_NAME
from moemerge.io.manifest import MANIFEST_NAME, Manifest, TensorEntry
from moemerge.io.sidefiles import MODEL_FILES, is_tokenizer_file
from moemerge.io.writer import (MARKER_NAME, OWN_SIDE_FILES, TensorPlacement, as_manifest, atomic_write, close_fds, flush_fds, open_laid_out,
                                check_output, start_writeback)
from moemerge.names import DcpNames, parse_dcp_names, stored_keys

__all__ = ["METADATA_NAME", "DcpModelWriter", "data_file_name", "output_names"]

METADATA_NAME = ".metadata"
_READ_BLOCK = 16 << 20  # read-back block when a tensor's CRC must be computed from disk


def data_file_name(i: int) -> str:
    """The i-th data file, named as torch's FileSystemWriter names rank 0's files."""
    return f"__0_{i}.distcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Slot:
    """Where a tensor's archive lies: its data file, the archive's start and length, the
    absolute offset of its data, and the absolute offsets of the CRC fields."""

    name: str
    key: str
    file: str
    start: int
    length: int
    data: int
    nbytes: int
    row_bytes: int
    crc_at: tuple[int, ...]
    raw: bool = False
    """Stored as raw bytes (a BYTE_IO item: TransformerEngine `_extra_state`), not an archive."""


def _is_extra_state(name: str, p: TensorPlacement) -> bool:
    """An `_extra_state` entry read from DCP as bytes (io.dcp serves it as a U8 vector)."""
    from moemerge.io.dcp import EXTRA_STATE

    return (name == EXTRA_STATE or name.endswith("." + EXTRA_STATE)) and p.dtype == "U8" and len(p.shape) == 1


def output_names(out: str) -> DcpNames | None:
    """The DcpNames a moemerge DCP output at `out` was written with (its manifest's `dcp`), so
    that reading it (verify) gives the merged names back; None for any other output."""
    path = os.path.join(storage.resolve(out)[1], MANIFEST_NAME) if "://" not in out else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            m = Manifest.from_json(f.read(), where=path)
    except Exception:
        return None  # verify reports a damaged manifest itself
    doc = m.extra.get("dcp") if m.format == "dcp" else None
    return parse_dcp_names(doc, where=path) if isinstance(doc, dict) else None


def names_from(attributes: Mapping[str, Any] | None) -> DcpNames | None:
    """The `dcp:` mapping of the config the writer is given (`open_writer(attributes={"config"})`)."""
    config = (attributes or {}).get("config")
    doc = config.get("dcp") if isinstance(config, Mapping) else None
    return parse_dcp_names(doc, where="dcp") if doc is not None else None


def _layout(url: str, placements: Mapping[str, TensorPlacement], names: DcpNames | None) -> tuple[dict[str, _Slot], dict[str, int], DcpNames]:
    """Slots for every tensor (in plan order; a data file per planned shard) and file sizes."""
    from moemerge.io.dcp_archive import ALIGN, storage_type_name, tensor_archive
    from moemerge.io.dtypes import to_torch

    names = names or DcpNames()
    keys = stored_keys(placements, names, where=url)
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    slots: dict[str, _Slot] = {}
    for name, p in placements.items():
        fname = files.setdefault(p.file, data_file_name(len(files)))
        start = sizes.get(fname, 0)
        if _is_extra_state(name, p):  # written as DCP writes BYTE_IO items: the bytes themselves
            slots[name] = _Slot(name=name, key=keys[name], file=fname, start=start, length=p.nbytes, data=start,
                                nbytes=p.nbytes, row_bytes=p.row_bytes, crc_at=(), raw=True)
            sizes[fname] = start + p.nbytes + (-p.nbytes) % ALIGN
            continue
        dt = to_torch(p.dtype)
        if storage_type_name(dt) is None:
            raise OutputError(f"{url}: tensor `{name}` is {p.dtype}, which DCP's torch.save format cannot store "
                              "as one; choose another --out-dtype or --format safetensors")
        arch = tensor_archive(dt, p.shape, ident=keys[name])
        slots[name] = _Slot(name=name, key=keys[name], file=fname, start=start, length=arch.length,
                            data=start + arch.data_offset, nbytes=arch.nbytes, row_bytes=p.row_bytes,
                            crc_at=tuple(start + c for c in arch.crc_at))
        sizes[fname] = start + arch.length + (-arch.length) % ALIGN  # next archive ALIGN-aligned
    return slots, sizes, DcpNames(prefix=(names.prefix if names.prefix is not None else "model").rstrip("."),
                                  rename=names.rename)


class DcpModelWriter:
    """A ModelWriter (io.writer) producing a DCP directory on a local or shared filesystem.

    Thread-safe: writes are positional (`pwrite`); each chunk's CRC-32 is kept (8 bytes a
    chunk) and combined in `finish`, so no tensor is read back unless another process wrote it.
    """

    def __init__(self, url: str, placements: Mapping[str, TensorPlacement], *, overwrite: bool,
                 names: DcpNames | None = None) -> None:
        self.url = url
        fs, path = storage.resolve(url)
        if not storage.is_local(fs):
            raise OutputError(f"{url}: --format dcp writes to a local or shared filesystem; write it there "
                              "and copy it, or use --format safetensors for object storage")
        from moemerge.io import swap

        path = os.path.abspath(path)
        if not os.path.isfile(path):
            swap.recover(path)
        self.final = check_output(url, overwrite=overwrite)
        self.path = self.target = swap.target_for(self.final, overwrite=overwrite)
        self.swapped = False
        self.placements = dict(placements)
        self.slots, self.sizes, self.names = _layout(url, self.placements, names)
        self._fds: dict[str, int] = {}
        self._crcs: dict[str, dict[int, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, url: str, placements: Mapping[str, TensorPlacement], *,
               names: DcpNames | None = None) -> DcpModelWriter:
        """A writer into an output another process `prepare`d (a Dask worker): rows only."""
        self = cls.__new__(cls)
        self.url = url
        self.path = self.final = self.target = os.path.abspath(storage.resolve(url)[1])
        self.swapped = False
        self.placements = dict(placements)
        self.slots, self.sizes, self.names = _layout(url, self.placements, names)
        self._fds, self._crcs, self._lock = {}, {}, threading.Lock()
        return self

    def __repr__(self) -> str:
        return f"DcpModelWriter({self.url!r}, tensors={len(self.slots)}, files={len(self.sizes)})"

    # -- files -----------------------------------------------------------------------------

    def _fd(self, file: str) -> int:
        return open_laid_out(self._fds, self._lock, self.path, file, url=self.url, what="data file")

    def _pwrite(self, fd: int, data: memoryview | bytes, offset: int, file: str) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as e:
                raise OutputError(f"{self.url}/{file}: write failed at byte {offset + done} ({e.strerror}); "
                                  "is the disk full?") from e

    # -- the ModelWriter verbs -------------------------------------------------------------

    def prepare(self) -> None:
        """Mark the directory incomplete, drop old commit and stale files, lay out every archive."""
        from moemerge.io.dcp_archive import tensor_archive
        from moemerge.io.dtypes import to_torch

        try:
            os.makedirs(self.path, exist_ok=True)
            open(os.path.join(self.path, MARKER_NAME), "w").close()
            for name in (MANIFEST_NAME, METADATA_NAME, INDEX_NAME):  # stop looking finished first
                old = os.path.join(self.path, name)
                if os.path.exists(old):
                    os.remove(old)
            for name in os.listdir(self.path):
                stale = (name.endswith((".distcp", ".safetensors")) and name not in self.sizes)
                side = name in MODEL_FILES or name in OWN_SIDE_FILES or is_tokenizer_file(name)
                if (stale or side) and os.path.isfile(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
            for fname, size in self.sizes.items():
                fd = os.open(os.path.join(self.path, fname), os.O_RDWR | os.O_CREAT, 0o644)
                self._fds[fname] = fd
                os.ftruncate(fd, size)
            for name, s in self.slots.items():
                if s.raw:
                    continue
                p = self.placements[name]
                arch = tensor_archive(to_torch(p.dtype), p.shape, ident=s.key)
                fd = self._fds[s.file]
                self._pwrite(fd, arch.head, s.start, s.file)
                self._pwrite(fd, arch.tail, s.data + s.nbytes, s.file)
        except OSError as e:
            self.close()
            raise OutputError(f"{self.url}: cannot lay out the output ({e.strerror or e}); check space and permissions") from e

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
        s = self.slots[name]
        offset = s.data + row_start * s.row_bytes
        if offset + len(data) > s.data + s.nbytes:
            raise OutputError(f"{self.url}: rows from {row_start} of tensor `{name}` run past its end "
                              f"({len(data)} bytes); this is a bug")
        fd = self._fd(s.file)
        self._pwrite(fd, data, offset, s.file)
        start_writeback(fd, offset, len(data))
        crc = zlib.crc32(data)
        with self._lock:
            self._crcs.setdefault(name, {})[row_start * s.row_bytes] = (crc, len(data))

    def flush(self) -> None:
        """Put what this writer wrote on disk (a worker's part, before another process commits)."""
        flush_fds(self._fds, url=self.url, what="data file")

    def read_back(self, name: str, block: int = 64 << 20) -> Iterator[memoryview]:
        """The bytes written for tensor `name`, in order, `block` bytes at a time."""
        s = self.slots[name]
        fd = self._fd(s.file)
        buf = bytearray(min(block, max(1, s.nbytes)))
        pos = 0
        while pos < s.nbytes:
            n = os.preadv(fd, [memoryview(buf)[:min(block, s.nbytes - pos)]], s.data + pos)
            if n <= 0:
                raise OutputError(f"{self.url}/{s.file}: tensor `{name}` ends early when read back")
            yield memoryview(buf)[:n]
            pos += n

    def _crc(self, name: str) -> int:
        """The tensor's CRC-32: its chunks' combined when they cover it, else read from disk
        (rows written by another process)."""
        from moemerge.io.dcp_archive import crc32_combine

        s = self.slots[name]
        pieces = sorted(self._crcs.get(name, {}).items())
        crc, pos = 0, 0
        for start, (c, n) in pieces:
            if start != pos:
                break
            crc, pos = crc32_combine(crc, c, n), pos + n
        if pos == s.nbytes:
            return crc
        crc = 0
        for view in self.read_back(name, block=_READ_BLOCK):
            crc = zlib.crc32(view, crc)
        return crc

    def _metadata(self) -> bytes:
        """`.metadata`: torch's Metadata of every tensor as one chunk, pickled as FileSystemWriter does."""
        import torch
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                           MetadataIndex, TensorProperties, TensorStorageMetadata)

        from moemerge.io.dtypes import to_torch

        state: dict[str, Any] = {}
        storage_data: dict[Any, Any] = {}
        planner: dict[str, tuple[str, ...]] = {}
        prefix = self.names.prefix or ""
        for name, s in self.slots.items():
            # how dcp.save records a key of `{prefix: state_dict}`: the path of nested dict keys
            planner[s.key] = (prefix, s.key[len(prefix) + 1:]) if prefix else (s.key,)
            if s.raw:
                state[s.key] = BytesStorageMetadata()
                storage_data[MetadataIndex(fqn=s.key)] = _StorageInfo(relative_path=s.file, offset=s.start,
                                                                      length=s.length)
                continue
            p = self.placements[name]
            size = torch.Size(p.shape)
            zeros = torch.Size([0] * len(p.shape))
            state[s.key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=to_torch(p.dtype)), size=size,
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=size)])
            storage_data[MetadataIndex(fqn=s.key, offset=zeros, index=0)] = _StorageInfo(
                relative_path=s.file, offset=s.start, length=s.length)
        md = Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage_data,
                      storage_meta=None, version="1.0.0")
        return pickle.dumps(md)

    def finish(self, *, side_files: dict[str, bytes], index: dict[str, Any],
               manifest: Manifest | dict[str, Any]) -> None:
        """CRCs, flush, side files, `.metadata` (DCP's commit), then the manifest (moemerge's).

        `index` (a safetensors index) has no place in a DCP directory and is not written.
        """
        manifest = as_manifest(manifest)
        try:
            for name, s in self.slots.items():
                if s.raw:
                    continue
                raw = struct.pack("<I", self._crc(name))
                for at in s.crc_at:
                    self._pwrite(self._fd(s.file), raw, at, s.file)
            self.flush()
            self.close()
            for name, data in side_files.items():
                atomic_write(os.path.join(self.path, name), data)
            atomic_write(os.path.join(self.path, METADATA_NAME), self._metadata())
            atomic_write(os.path.join(self.path, MANIFEST_NAME), self._manifest(manifest).to_json())
            os.remove(os.path.join(self.path, MARKER_NAME))
            if self.path != self.final:
                from moemerge.io import swap

                swap.commit(self.path, self.final)
                self.swapped = True
        except OSError as e:
            raise OutputError(f"{self.url}: cannot finish the output ({e.strerror or e})") from e

    def _manifest(self, m: Manifest) -> Manifest:
        """The engine's manifest with the DCP files, each tensor's data file and DCP key, and the
        names used (`output_names` reads them back)."""
        tensors = {n: TensorEntry(file=self.slots[n].file if n in self.slots else e.file, dtype=e.dtype,
                                  shape=e.shape, sha256=e.sha256,
                                  extra={**e.extra, **({"key": self.slots[n].key} if n in self.slots else {})})
                   for n, e in (m.tensors or {}).items()}
        dcp = {"prefix": self.names.prefix, "rename": [list(p) for p in self.names.rename]}
        return m.updated(format="dcp", files=dict(self.sizes), tensors=tensors, dcp=dcp)

    def describe(self) -> str:
        """What is on disk now, for a message after an interruption or failure."""
        from moemerge.io import swap

        return swap.describe(self.final, self.path, swapped=self.swapped, resumable=False)

    def close(self) -> None:
        close_fds(self._fds, self._lock)
