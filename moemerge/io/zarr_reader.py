"""Read a moemerge Zarr output as a checkpoint (a CheckpointReader, io.formats).

Tensors come from the consolidated metadata (one read); row ranges are read lazily, only the
chunks they overlap, straight into the caller's buffer, with the logical dtype's bytes
(bf16/fp8 were stored as their raw bit patterns, so the bytes are the tensor's, bit for bit).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import numpy as np

from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint, TensorInfo
from moemerge.io.dtypes import DTYPES, itemsize
from moemerge.io.limits import check_tensor_count
from moemerge.io.manifest import MANIFEST_NAME, Manifest
from moemerge.io.zarr_store import ATTR, DAMAGED_STORE_HINT, open_store, storage_dtype, tensor_name

__all__ = ["ZarrCheckpoint"]

ZARR_JSON = "zarr.json"


class ZarrCheckpoint(Checkpoint):
    """A finished moemerge Zarr output, with the tensors in the order of the merge's plan.

    `TensorInfo.file` is the safetensors shard the merge planned for the tensor (what
    `moemerge export` writes it to) and `start` its position in plan order, so that a planner
    sorting by (file, start) sees the tensors in the order a safetensors output of the same
    merge has; `array(name)` is the Zarr array that holds the data.
    """

    def __init__(self, url: str, fs: Any, root: str, tensors: dict[str, TensorInfo],
                 storage_options: dict[str, Any] | None) -> None:
        super().__init__(url, fs, root, tensors, {})
        self.storage_options = storage_options
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._zlock = threading.Lock()
        self.paths: dict[str, str] = {}
        #: What a damaged-store error tells the user to do (a PMA state says how to rebuild it).
        self.damaged_hint = DAMAGED_STORE_HINT
        #: chunk key -> checksum recorded at write time (PMA states), verified on every read.
        self.chunk_checksums: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"ZarrCheckpoint({self.url!r}, tensors={len(self.tensors)})"

    @classmethod
    def open_store(cls, url: str, fs: Any, root: str, storage_options: dict[str, Any] | None = None) -> ZarrCheckpoint:
        """Read the root metadata of the store at `root` and list its tensors (no data read)."""
        where = f"{url.rstrip('/')}/{ZARR_JSON}"
        try:
            doc = json.loads(fs.cat_file(storage.join(root, ZARR_JSON)))
        except ValueError as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from e
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        if not isinstance(attrs, dict) or ATTR not in attrs:
            raise CheckpointError(
                f"{url}: a Zarr store not written by moemerge (no `{ATTR}` attribute at its root); "
                "only moemerge Zarr outputs can be read as models"
            )
        cons = doc.get("consolidated_metadata")
        if not isinstance(cons, dict) or not fs.isfile(storage.join(root, MANIFEST_NAME)):
            raise CheckpointError(
                f"{url}: this Zarr output is unfinished (no consolidated metadata or no "
                f"{MANIFEST_NAME}); the run that wrote it failed or was killed: run it again"
            )
        try:  # the tensors' plan order and shards; a damaged manifest leaves both to `verify`
            listed = dict(Manifest.from_json(fs.cat_file(storage.join(root, MANIFEST_NAME)),
                                             where=f"{url}/{MANIFEST_NAME}").tensors or {})
        except CheckpointError:
            listed = {}
        position = {n: i for i, n in enumerate(listed)}
        found: list[tuple[str, str, str, tuple[int, ...]]] = []
        check_tensor_count(len(cons.get("metadata") or {}), where=url)
        for path, meta in sorted((cons.get("metadata") or {}).items()):
            if not isinstance(meta, dict) or meta.get("node_type") != "array" or "/" in path:
                continue
            info = (meta.get("attributes") or {}).get(ATTR) or {}
            name = info.get("name", tensor_name(path))
            dtype = info.get("dtype")
            shape = tuple(int(d) for d in meta.get("shape", ()))
            if dtype not in DTYPES or str(np.dtype(str(meta.get("data_type")))) != str(storage_dtype(dtype)):
                raise CheckpointError(
                    f"{url}/{path}: array of {meta.get('data_type')} with logical dtype {dtype!r}; "
                    "not a moemerge tensor array (damaged store?)"
                )
            found.append((name, path, dtype, shape))
        if not found:
            raise CheckpointError(f"{url}: holds no tensors; nothing to merge (incomplete copy?)")
        found.sort(key=lambda f: (position.get(f[0], len(position)), f[0]))
        tensors: dict[str, TensorInfo] = {}
        for i, (name, path, dtype, shape) in enumerate(found):
            entry = listed.get(name)
            shard = entry.file if entry is not None else None
            tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape,
                                       file=shard if isinstance(shard, str) else path, start=i,
                                       nbytes=math.prod(shape) * itemsize(dtype))
        ckpt = cls(url, fs, root, tensors, storage_options)
        ckpt.paths = {name: path for name, path, _, _ in found}
        return ckpt

    def array(self, name: str) -> str:
        """The Zarr array (path under the root) holding tensor `name`."""
        return self.paths[name]

    def _array(self, name: str) -> Any:
        with self._zlock:
            arr = self._arrays.get(name)
            if arr is None:
                import zarr

                if self._group is None:
                    # missing chunks raise, never read as zeros (fill values are not weights)
                    store = open_store(self.url, self.storage_options, read_only=True,
                                       hint=self.damaged_hint, checksums=self.chunk_checksums)
                    self._group = zarr.open_group(store, mode="r", use_consolidated=True)
                arr = self._arrays[name] = self._group[self.paths[name]]
            return arr

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        """Read rows [r0, r1) of tensor `name` into `out`, reading only the chunks they overlap."""
        from zarr.core.buffer import default_buffer_prototype

        t = self.tensors[name]
        need = (r1 - r0) * t.row_bytes
        if len(out) < need:
            raise ValueError(f"buffer of {len(out)} bytes is too small for {need}")
        if need == 0:
            return
        flat = np.frombuffer(out, dtype=np.uint8, count=need)
        sdt = storage_dtype(t.dtype)
        proto = default_buffer_prototype()
        shape = t.shape

        def read() -> None:  # idempotent: a retry rewrites the same bytes
            arr = self._array(name)
            if len(shape) <= 2:
                view = flat.view(sdt).reshape((r1 - r0, *shape[1:]) if shape else ())
                sel: Any = (slice(r0, r1),) if shape else ()
                arr.get_basic_selection(sel, out=proto.nd_buffer.from_numpy_array(view))
                return
            s = math.prod(shape[1:-1])  # rows per dim-0 slice
            slice_bytes = s * t.row_bytes
            pos = r0
            while pos < r1:
                d, lo = divmod(pos, s)
                off = (pos - r0) * t.row_bytes
                if lo == 0 and r1 - pos >= s:  # whole slices: straight into the caller's buffer
                    n = (r1 - pos) // s
                    view = flat[off:off + n * slice_bytes].view(sdt).reshape((n, *shape[1:]))
                    arr.get_basic_selection((slice(d, d + n),), out=proto.nd_buffer.from_numpy_array(view))
                    pos += n * s
                else:  # part of one slice: read that slice, keep the rows asked for
                    hi = min(s, r1 - d * s)
                    whole = np.ascontiguousarray(arr[d]).view(np.uint8).reshape(-1)
                    flat[off:off + (hi - lo) * t.row_bytes] = whole[lo * t.row_bytes:hi * t.row_bytes]
                    pos += hi - lo

        # transient storage errors (a reset connection, a 503) are retried like every other read
        storage.with_retries(read, what=f"read rows {r0}..{r1} of tensor `{name}`",
                             url=f"{self.url}/{self.paths[name]}")

    def close(self) -> None:
        with self._zlock:
            self._arrays.clear()
            self._group = None
        super().close()
