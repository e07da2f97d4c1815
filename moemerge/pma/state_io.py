"""The PMA state's chunks read and written straight to local files, past zarr's copies.

A nightly `pma update` moves every state value in and out once; through zarr each chunk read
allocates its stored bytes and then its decoded values afresh (page faults cost more than the
decoding on small VMs) before they are copied into the pipeline's buffer, and each chunk write
joins its encoded parts into one more fresh buffer. Here a whole chunk of a local format-2
state (`pma.state_codec`) is read into a reused per-thread buffer, checked against the
checksum its manifest recorded, and decoded straight into the caller's buffer; a chunk is
written as its encoded parts (`os.writev`) at the key zarr would use, its checksum recorded
as zarr's writer records it. The files are exactly those zarr writes and reads (the `bytes`
codec is a no-op for little-endian float64), so either side may be zarr. Anything else (a
format-1 or remote state, a read not on whole chunks, the short last chunk) goes through zarr.
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import Any

import numpy as np

from moemerge.errors import CheckpointError, OutputError
from moemerge.io import direct
from moemerge.io.zarr_store import DAMAGED_STORE_HINT, array_path, chunk_checksum
from moemerge.pma.state_codec import CODEC_NAME, decode, encode_into, encode_parts, encoded_bound

__all__ = ["FastStateReader", "FastStateWriter"]

#: os.writev takes at most IOV_MAX (1024 on Linux) buffers per call
_IOV = 512


def _chunk_key(array: str, index: int, ndim: int) -> str:
    """The store key of chunk `index` along dim 0 (v3 default encoding, `/` separator)."""
    return f"{array}/c/{index}" + "/0" * (ndim - 1)


def _split_codec(codecs: Any) -> bool:
    """Whether an array's codecs are `bytes` (little-endian) then the state codec, only."""
    names = [_codec_name(c) for c in codecs]
    return names == ["bytes", CODEC_NAME] and str(getattr(codecs[0], "endian", "")).endswith("little")


class FastStateReader:
    """Whole-chunk reads of one local ZarrCheckpoint of state sums (its `read_rows`, faster)."""

    def __init__(self, sums: Any, *, compiled: bool = True) -> None:
        self.sums, self.compiled = sums, compiled
        self.local = hasattr(sums, "root") and _is_local(sums)
        self._meta: dict[str, tuple[int, int] | None] = {}  # name -> (chunk rows, ndim); None: zarr
        self._lock = threading.Lock()
        #: read buffers free for reuse: as many as reads ran at once (one in a local update), each
        #: as big as the largest chunk read; within what the plan counts for zarr's own copies
        self._free: list[bytearray] = []

    def _geometry(self, name: str) -> tuple[int, int] | None:
        with self._lock:
            if name not in self._meta:
                geo = None
                try:
                    arr = self.sums._array(name)
                    if self.local and _split_codec(arr.metadata.codecs) and 1 <= len(arr.shape) <= 2:
                        geo = (int(arr.chunks[0]), len(arr.shape))
                except Exception:  # zarr's own read reports whatever is wrong
                    geo = None
                self._meta[name] = geo
            return self._meta[name]

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> bool:
        """Read rows [r0, r1) of `name` into `out` if they start on a stored chunk; False: not
        done (the caller reads through zarr)."""
        geo = self._geometry(name)
        t = self.sums.tensors[name]
        row_len = t.row_bytes // 8
        if geo is None or r1 <= r0 or row_len == 0 or r1 > t.rows or r0 % geo[0]:
            return False
        rows_per, ndim = geo
        if r1 % rows_per and r1 != t.rows:
            return False  # ends inside a chunk that goes on: zarr reads it
        dst = np.frombuffer(out, dtype="<f8", count=(r1 - r0) * row_len)
        array = self.sums.paths[name]
        for i in range(r0 // rows_per, -(-r1 // rows_per)):
            key = _chunk_key(array, i, ndim)
            data = self._read(key)
            a = (i * rows_per - r0) * row_len
            n = (min(r1, (i + 1) * rows_per) - i * rows_per) * row_len
            try:
                want = (self.sums.chunk_checksums or {}).get(key)
                if want is not None and chunk_checksum(data) != want:
                    coords = key.rsplit("/c/", 1)[1].replace("/", ".")  # as zarr's reads name it
                    raise CheckpointError(f"{self.sums.url}/{array}: chunk {coords} does not match the checksum "
                                          f"recorded when it was written (a damaged or replaced object): "
                                          f"{self._hint()}")
                if n == rows_per * row_len:
                    decode(data, out=dst[a:a + n], compiled=self.compiled)
                else:  # the last chunk is stored padded to the chunk shape: keep the rows there are
                    dst[a:a + n] = decode(data, compiled=self.compiled)[:n]
            finally:
                self._give(data.obj)  # type: ignore[arg-type]
        return True

    def _take(self, size: int) -> bytearray:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None or len(buf) < size:  # grown, then reused: its pages stay mapped
            buf = bytearray(max(size, 1 << 20))
        return buf

    def _give(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)

    def _hint(self) -> str:
        return getattr(self.sums, "damaged_hint", None) or DAMAGED_STORE_HINT

    def _read(self, key: str) -> memoryview:
        path = os.path.join(self.sums.root, *key.split("/"))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            where = key.rsplit("/c/", 1)
            raise CheckpointError(f"{self.sums.url}/{where[0]}: chunk {where[1].replace('/', '.')} is "
                                  f"missing (a deleted or unfinished object); the store is damaged: "
                                  f"{self._hint()}") from None
        try:
            size = os.fstat(fd).st_size
            buf = self._take(size)
            view = memoryview(buf)[:size]
            try:
                got = direct.read_once(fd, path, 0, view)  # around the page cache (io/direct.py)
                while got < size:
                    n = os.readv(fd, [view[got:]])
                    if n <= 0:
                        raise CheckpointError(f"{path}: short read ({got} of {size} bytes): {self._hint()}")
                    got += n
            except BaseException:
                self._give(buf)
                raise
            return view
        finally:
            os.close(fd)


class FastStateWriter:
    """A state version's writer (`ZarrModelWriter`) whose whole chunks of a local format-2
    version are written here; the rest by the writer itself."""

    def __init__(self, writer: Any, *, compiled: bool = True) -> None:
        self.writer, self.compiled = writer, compiled
        self.arrays = writer.arrays
        self.fast = _is_local(writer) and _uses_split(writer)
        self._dirs: set[str] = set()
        self._lock = threading.Lock()
        #: encode buffers free for reuse: as many as chunks were written at once (two per
        #: quantity: the engine's two output buffers), each as big as the largest chunk's bound
        self._free: list[np.ndarray] = []

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
        spec = self.arrays[name]
        row_len = spec.shape[1] if len(spec.shape) == 2 else 1
        per = spec.rows_per_chunk
        n_rows = len(data) // 8 // max(1, row_len)
        rows = spec.shape[0] if spec.shape else 0
        if (not self.fast or not 1 <= len(spec.shape) <= 2 or row_len == 0 or per < 1 or row_start % per or n_rows > per
                or (n_rows < per and row_start + n_rows != rows)):
            self.writer.write_rows(name, row_start, data)
            return
        values = np.frombuffer(data, dtype="<f8")
        if n_rows < per:  # the last chunk is stored padded to the chunk shape with the fill value, 0
            padded = np.zeros(per * row_len, dtype="<f8")
            padded[:values.size] = values
            values = padded
        fallback = self.writer.compressors[0].fallback
        buf = self._take(encoded_bound(values.size))
        try:
            used = encode_into(values, buf, fallback, self.compiled)  # one compiled pass into a reused buffer
            parts: list[bytes | memoryview] = ([buf[:used].data] if used is not None
                                               else encode_parts(values, fallback, self.compiled))
            self._write(name, row_start, spec, per, parts)
        finally:
            self._give(buf)

    def _take(self, size: int) -> np.ndarray:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None or buf.size < size:  # grown, then reused: its pages stay mapped
            buf = np.empty(max(size, 1 << 20), dtype=np.uint8)
        return buf

    def _give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)

    def _write(self, name: str, row_start: int, spec: Any, per: int, parts: list[bytes | memoryview]) -> None:
        key = _chunk_key(array_path(name), row_start // per, len(spec.shape))
        path = os.path.join(self.writer.root, *key.split("/"))
        folder = os.path.dirname(path)
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            with self._lock:
                self._dirs.add(folder)
        crc = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if sum(len(p) for p in parts) >= direct.DIRECT_MIN:  # around the page cache (io/direct.py)
                    whole = parts[0] if len(parts) == 1 else b"".join(parts)
                    if direct.write_once(fd, path, memoryview(whole), 0):
                        parts, crc = [], zlib.crc32(whole)
                for s in range(0, len(parts), _IOV):
                    group = parts[s:s + _IOV]
                    want = sum(len(p) for p in group)
                    done = os.writev(fd, group)
                    if done != want:  # a short write (rare): the rest one by one
                        rest = b"".join(bytes(p) for p in group)[done:]
                        while rest:
                            k = os.write(fd, rest)
                            rest = rest[k:]
                    for p in group:
                        crc = zlib.crc32(p, crc)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"{self.writer.url}: tensor `{name}`: writing rows from {row_start} failed ({e})") from e
        if self.writer.recorded is not None:
            with self._lock:
                self.writer.recorded[key] = f"{crc & 0xFFFFFFFF:08x}"


def _is_local(obj: Any) -> bool:
    from moemerge.io import storage

    fs = getattr(obj, "fs", None)
    return fs is not None and storage.is_local(fs)


def _uses_split(writer: Any) -> bool:
    comps = getattr(writer, "compressors", None) or []
    return len(comps) == 1 and _codec_name(comps[0]) == CODEC_NAME


def _codec_name(codec: Any) -> Any:
    doc = codec.to_dict() if hasattr(codec, "to_dict") else {}
    return doc.get("name") if isinstance(doc, dict) else None
