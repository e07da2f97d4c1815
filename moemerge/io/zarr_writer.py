"""Write a merge as a Zarr v3 group: one array per tensor, one engine chunk per Zarr chunk.

Each tensor is an array named `array_path(name)` under the root, with its true shape, chunked
along dim 0 so that one engine chunk (the plan's `rows_per_chunk` rows) is exactly one Zarr
chunk: `write_rows` writes whole chunks (the last one may be short, at the array's edge), so
zarr never reads a chunk back to merge into it, and chunks may arrive in any order.

Commit protocol (DESIGN promise 5): `prepare` writes an `.moemerge-incomplete` marker and the
root group and arrays (no consolidated metadata); `finish` writes the side files, then the
consolidated metadata, then `moemerge-manifest.json` (the commit), then drops the marker. The
reader accepts a store only with both consolidated metadata and manifest, so a failed or
killed run never looks finished.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moemerge.errors import OutputError
from moemerge.io import storage
from moemerge.io.manifest import MANIFEST_NAME, Manifest
from moemerge.io.writer import MARKER_NAME, as_manifest, atomic_write
from moemerge.io.zarr_store import ATTR, FORMAT_VERSION, array_path, open_store, storage_dtype

__all__ = ["ZarrArraySpec", "ZarrModelWriter", "zarr_chunks"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ZarrArraySpec:
    """One output tensor as the Zarr writer needs it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """Logical (safetensors) dtype name, e.g. `BF16`."""
    rows_per_chunk: int
    """Rows (of the row-chunking view, io.checkpoint.row_geometry) per engine chunk."""


def _slab(shape: tuple[int, ...]) -> int:
    """Rows per dim-0 slice: prod(shape[1:-1]) for >=3-D tensors, else 1."""
    return math.prod(shape[1:-1]) if len(shape) >= 3 else 1


def zarr_chunks(shape: tuple[int, ...], rows_per_chunk: int) -> tuple[int, ...]:
    """The Zarr chunk shape holding one engine chunk: zarr_chunks((8, 4, 16), 8) == (2, 4, 16)."""
    if not shape:
        return ()
    dim0 = max(1, rows_per_chunk // max(1, _slab(shape)))
    return (dim0, *(max(1, d) for d in shape[1:]))


class ZarrModelWriter:
    """A ModelWriter (io.writer) producing a Zarr v3 group at a local path or fsspec URL.

    The location is checked beforehand by io.writer.check_output (same rules as safetensors).

    `compressors` is passed to zarr as is (default None: no compression, the fastest to
    write, and the only layout whose chunks are the raw bytes).
    """

    def __init__(self, url: str, arrays: list[ZarrArraySpec], *, attributes: dict[str, Any],
                 overwrite: bool, storage_options: dict[str, Any] | None = None,
                 compressors: Any = None, checksums: bool = False) -> None:
        self.url = url
        self.arrays = {a.name: a for a in arrays}
        self.attributes = attributes
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.compressors = compressors
        #: chunk key -> zarr_store.chunk_checksum of the bytes stored, recorded when `checksums`
        #: (in this process only: an `attach`ed writer records nothing); finish() puts them in
        #: the manifest as `chunk_checksums`, and readers verify them.
        self.recorded: dict[str, str] | None = {} if checksums else None
        self.fs, root = storage.resolve(url, storage_options)
        self.root = os.path.abspath(root) if storage.is_local(self.fs) else root.rstrip("/")
        self._stage(overwrite)
        self._store: Any = None
        self._zarrs: dict[str, Any] = {}
        self._templates: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _stage(self, overwrite: bool) -> None:
        """Tidy what an interrupted overwrite left; overwriting a finished store, write the new
        one beside it (`<OUT>.moemerge-new`), swapped in by `finish` (io.swap)."""
        from moemerge.io import swap

        self.final_url, self.final_root, self.swapped = self.url, self.root, False
        if storage.is_local(self.fs):
            swap.recover(self.root)
            target = swap.target_for(self.root, overwrite=overwrite)
        else:
            swap.recover_remote(self.fs, self.root, self.url)
            target = swap.remote_target_for(self.fs, self.root, self.url, overwrite=overwrite)
        if target != self.root:
            self.url = target if storage.is_local(self.fs) else self.url.rstrip("/") + swap.NEW_SUFFIX
            self.root = target
        self.target = self.url if not storage.is_local(self.fs) else self.root

    def describe(self) -> str:
        """What is stored now, for a message after an interruption or failure."""
        from moemerge.io import swap

        if storage.is_local(self.fs):
            return swap.describe(self.final_root, self.root, swapped=self.swapped, resumable=False)
        if self.root != self.final_root and not self.swapped and not getattr(self, "committing", False):
            return f"the previous output at {self.final_url} is untouched"
        return f"{self.final_url} is not finished (no manifest); rerun"

    @classmethod
    def attach(cls, url: str, arrays: list[ZarrArraySpec], *,
               storage_options: dict[str, Any] | None = None, checksums: bool = False) -> ZarrModelWriter:
        """A writer into a store another process `prepare`d: writes chunks, never finishes (Dask).
        With `checksums`, it records those of the chunks it writes (`recorded`), for that process."""
        self = cls(url, arrays, attributes={}, overwrite=False, storage_options=storage_options, checksums=checksums)
        self._store = open_store(url, storage_options, read_only=False, record=self.recorded)
        return self

    def __repr__(self) -> str:
        return f"ZarrModelWriter({self.url!r}, arrays={len(self.arrays)})"

    def read_back(self, name: str) -> Iterator[memoryview]:
        """The logical bytes written for tensor `name`, in row order, one Zarr chunk at a time."""
        import zarr

        a = self.arrays[name]
        # a read-only store: a chunk that never arrived fails instead of hashing as zeros
        arr = zarr.open_array(open_store(self.url, self.storage_options, read_only=True),
                              path=array_path(name), mode="r", zarr_format=3)
        if not a.shape:
            yield np.ascontiguousarray(arr[()]).reshape(-1).data.cast("B")
            return
        step = zarr_chunks(a.shape, a.rows_per_chunk)[0]
        for d0 in range(0, a.shape[0], step):
            yield np.ascontiguousarray(arr[d0:d0 + step]).reshape(-1).data.cast("B")

    def _path(self, name: str) -> str:
        return storage.join(self.root, name)

    def _put(self, name: str, data: bytes) -> None:
        if storage.is_local(self.fs):
            atomic_write(self._path(name), data)
        else:  # one PUT: an object store shows the whole object or nothing
            self.fs.pipe_file(self._path(name), data)

    def prepare(self) -> None:
        """Mark the store incomplete, drop what an earlier run left, create the group and arrays."""
        import zarr

        try:
            if storage.is_local(self.fs):
                os.makedirs(self.root, exist_ok=True)
            try:
                entries = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
            except FileNotFoundError:
                entries = set()
            # what follows deletes everything here: only ever in an earlier moemerge output
            if entries and MANIFEST_NAME not in entries and MARKER_NAME not in entries:
                raise OutputError(f"{self.url}: is not empty and is not a moemerge output; choose a new or empty location")
            if MANIFEST_NAME in entries and not self.overwrite:
                raise OutputError(f"{self.url}: already holds a finished merge ({MANIFEST_NAME}); pass --overwrite to replace it")
            self._put(MARKER_NAME, b"")
            # an old finished output stops looking finished before anything else changes
            if self.fs.exists(self._path(MANIFEST_NAME)):
                self.fs.rm(self._path(MANIFEST_NAME))
            for p in self.fs.ls(self.root, detail=False):
                if p.rstrip("/").rsplit("/", 1)[-1] != MARKER_NAME:
                    self.fs.rm(p, recursive=True)
            self._store = open_store(self.url, self.storage_options, read_only=False, record=self.recorded)
            root_attrs = {ATTR: {"format": FORMAT_VERSION, **self.attributes}}
            zarr.create_group(self._store, attributes=root_attrs, zarr_format=3)
            self._write_array_metadata()
        except OutputError:
            raise
        except Exception as e:
            raise OutputError(f"{self.url}: cannot lay out the Zarr output ({e}); check space and permissions") from e

    def _template(self, dtype: str) -> dict[str, Any]:
        """zarr's own array metadata for `dtype` and our codecs, to fill in per tensor."""
        import zarr
        from zarr.storage import MemoryStore

        if dtype not in self._templates:
            docs: dict[str, Any] = {}
            zarr.create_array(MemoryStore(store_dict=docs), shape=(1,), chunks=(1,),
                              dtype=storage_dtype(dtype), compressors=self.compressors, filters=None,
                              fill_value=0, zarr_format=3)
            self._templates[dtype] = json.loads(docs["zarr.json"].to_bytes())
        return copy.deepcopy(self._templates[dtype])

    def _write_array_metadata(self) -> None:
        """Every array's zarr.json, written concurrently.

        Creating arrays one by one through zarr costs a few ms each locally (existence checks,
        metadata building) and several requests each on object storage: hours for a model of
        92,000 tensors. The metadata differs between tensors only in shape, chunk shape and
        attributes, so it is zarr's own document for the dtype with those three filled in.
        """
        docs: dict[str, bytes] = {}
        for a in self.arrays.values():
            doc = self._template(a.dtype)
            doc["shape"] = list(a.shape)
            doc["chunk_grid"]["configuration"]["chunk_shape"] = list(zarr_chunks(a.shape, a.rows_per_chunk))
            doc["attributes"] = {ATTR: {"name": a.name, "dtype": a.dtype}}
            docs[storage.join(self.root, array_path(a.name), "zarr.json")] = json.dumps(doc, indent=2).encode()
        if storage.is_local(self.fs):
            def put(item: tuple[str, bytes]) -> None:
                os.makedirs(os.path.dirname(item[0]), exist_ok=True)
                with open(item[0], "wb") as f:
                    f.write(item[1])

            with ThreadPoolExecutor(max_workers=16, thread_name_prefix="moemerge-zarr-meta") as pool:
                list(pool.map(put, docs.items()))
        else:  # fsspec batches these (s3fs: concurrent PUTs)
            items = list(docs.items())
            for i in range(0, len(items), 1000):
                self.fs.pipe(dict(items[i:i + 1000]))

    def _array(self, name: str) -> Any:
        arr = self._zarrs.get(name)
        if arr is None:
            import zarr

            with self._lock:
                arr = self._zarrs.get(name)
                if arr is None:
                    opened = zarr.open_array(self._store, path=array_path(name), mode="r+", zarr_format=3)
                    # every chunk is stored, even all-zero ones: -0.0 == 0 would otherwise drop a
                    # chunk of -0.0 and read back +0.0
                    arr = self._zarrs[name] = opened.with_config({"write_empty_chunks": True})
        return arr

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
        """Write one engine chunk (rows `row_start..`) of tensor `name` as one Zarr chunk."""
        a = self.arrays[name]
        values = np.frombuffer(data, dtype=storage_dtype(a.dtype))
        try:
            arr = self._array(name)
            if not a.shape:
                arr[()] = values.reshape(())
                return
            s = _slab(a.shape)
            row_len = a.shape[-1] if len(a.shape) >= 2 else 1
            n_rows = values.size // max(1, row_len)
            if row_start % s or n_rows % s:
                raise OutputError(
                    f"{self.url}: tensor `{name}`: rows {row_start}..{row_start + n_rows} are not whole "
                    f"dim-0 slices of {list(a.shape)}; plan the merge with out_format='zarr'"
                )
            d0, nd = row_start // s, n_rows // s
            arr[d0:d0 + nd] = values.reshape((nd, *a.shape[1:]))
        except OutputError:
            raise
        except Exception as e:
            raise OutputError(f"{self.url}: tensor `{name}`: writing rows from {row_start} failed ({e})") from e

    def finish(self, *, side_files: dict[str, bytes], index: dict[str, Any],
               manifest: Manifest | dict[str, Any]) -> None:
        """Side files, then consolidated metadata, then the manifest (the commit).

        `index` (the safetensors weight map) has no place in a Zarr store and is not written;
        the manifest records each tensor's array and the shard `moemerge export` puts it in.
        """
        import zarr

        del index
        given = as_manifest(manifest)
        arrays = {} if given.tensors is None else {
            "tensors": {n: replace(e, array=array_path(n)) for n, e in given.tensors.items()}}
        recorded = {} if self.recorded is None else {"chunk_checksums": dict(sorted(self.recorded.items()))}
        man = given.updated(format="zarr", files={}, **arrays, **recorded)
        try:
            for name, data in side_files.items():
                self._put(name, data)
            with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec yet"
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(self._store)
            self._put(MANIFEST_NAME, man.to_json())
            self.fs.rm(self._path(MARKER_NAME))
            if self.root != self.final_root:  # overwriting: swap the finished new store in
                from moemerge.io import swap

                self.close()
                if storage.is_local(self.fs):
                    swap.commit(self.root, self.final_root)
                else:
                    self.committing = True  # from here OUT changes: describe() says so
                    swap.commit_remote(self.fs, self.root, self.final_root)
                self.swapped = True
        except Exception as e:
            raise OutputError(f"{self.url}: cannot finish the Zarr output ({e})") from e
        finally:
            self.close()

    def close(self) -> None:
        self._zarrs.clear()
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass
            self._store = None
