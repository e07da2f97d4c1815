"""Where a DCP chunk's raw tensor bytes are inside its data file, found with small range reads.

The default DCP writer stores each chunk as a complete `torch.save` zip archive at (offset,
length) of a `.distcp` file; the tensor's storage is the archive entry `<name>/data/<key>`,
stored uncompressed. Its central directory (at the archive's end) and `data.pkl` (at its
start) are a few hundred bytes each, so a chunk is located with two reads. The safetensors
writer (`SerializationFormat.SAFETENSORS`) instead ends the file with one safetensors blob
holding every tensor of the file by key; the chunk's recorded offset is where that blob starts.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass

import torch

from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.dcp_pickle import ChunkMeta, StorageEntry, load_stored_tensor
from moemerge.io.dtypes import from_torch, itemsize
from moemerge.io.safetensors_format import ShardHeader, parse_header, parse_header_length

__all__ = ["st_dtype", "locate_chunk", "check_coverage", "RangeFile", "ZipEntry", "zip_entries",
           "zip_entries_fast"]

# torch.save puts data.pkl (~200 bytes), byteorder and the local header of data/0 in the first
# ~640 bytes, and the central directory with its end records in the last ~800: these windows
# hold them, so locating a chunk costs two small reads (a miss costs one more exact read).
_HEAD = 1024
_TAIL = 2048
_ZIP_MAGIC = b"PK\x03\x04"


def st_dtype(torch_name: str) -> str | None:
    """torch dtype name ('bfloat16') -> safetensors name ('BF16'); None if moemerge has none."""
    dt = getattr(torch, torch_name, None)
    if not isinstance(dt, torch.dtype):
        return None
    try:
        return from_torch(dt)
    except KeyError:
        return None


class RangeFile(io.RawIOBase):
    """Bytes [base, base + length) of a ByteSource as a seekable read-only file.

    The first `_HEAD` and last `_TAIL` bytes are fetched once, up front, and reads inside
    them are served from memory; any other read is one exact range read.
    """

    def __init__(self, src: storage.ByteSource, base: int, length: int) -> None:
        super().__init__()
        self._src = src
        self._base = base
        self._len = length
        self._pos = 0
        self._windows: list[tuple[int, bytes]] = []
        if length <= _HEAD + _TAIL:
            self._windows.append((0, storage.read_bytes(src, base, length)))
        else:
            self._windows.append((0, storage.read_bytes(src, base, _HEAD)))
            self._windows.append((length - _TAIL, storage.read_bytes(src, base + length - _TAIL, _TAIL)))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        if base + offset < 0:
            raise OSError(f"seek to {base + offset} before the start of the chunk")
        self._pos = base + offset
        return self._pos

    def pread(self, pos: int, n: int) -> bytes:
        """Up to `n` bytes at `pos` (fewer at the end of the range)."""
        n = max(0, min(n, self._len - pos))
        for start, data in self._windows:
            if start <= pos and pos + n <= start + len(data):
                return data[pos - start:pos - start + n]
        return storage.read_bytes(self._src, self._base + pos, n)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.pread(self._pos, len(b))
        memoryview(b)[:len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkPlace:
    """A located chunk: the absolute byte offset of its row-major data in its file."""

    start: int
    nbytes: int


def _row_major(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    if len(size) != len(stride):
        return False
    want = 1
    for d, s in zip(reversed(size), reversed(stride)):
        if d != 1 and s != want:
            return False
        want *= d
    return True


@dataclass(frozen=True, slots=True)
class ZipEntry:
    """One archive member, from the central directory."""

    header_offset: int
    method: int  # 0: stored
    size: int  # compressed size; equal to the data size when stored
    crc: int


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record, 56 bytes
_LOC64 = struct.Struct("<4sLQL")  # zip64 end of central directory locator, 20 bytes
_CDIR = struct.Struct("<4s6H3L5H2L")  # central directory file header, 46 bytes
_U32, _U16 = 0xFFFFFFFF, 0xFFFF


def _zip64_extra(extra: bytes, wanted: int) -> list[int] | None:
    """The 8-byte values of a zip64 extra field (id 1): size, compressed size, offset, in
    that order, only for the fields the fixed header saturated."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            if n < 8 * wanted:
                return None
            return list(struct.unpack_from(f"<{wanted}Q", extra, pos + 4))
        pos += 4 + n
    return None


def zip_entries_fast(rf: RangeFile) -> dict[str, ZipEntry] | None:
    """The central directory of a comment-free single-disk archive (what torch.save writes,
    zip64 records included), or None when it is anything else.

    Parsed directly because zipfile's parse costs more than the reads when a checkpoint has
    10^5 chunks; None sends the caller to zipfile.
    """
    n = rf.seek(0, 2)
    end = rf.pread(n - _EOCD.size, _EOCD.size) if n >= _EOCD.size else b""
    if len(end) != _EOCD.size:
        return None
    sig, disk, cd_disk, count, total, cd_size, cd_at, comment = _EOCD.unpack(end)
    if sig != b"PK\x05\x06" or comment or disk or cd_disk or count != total:
        return None
    cd_end = n - _EOCD.size
    loc_at = cd_end - _LOC64.size
    loc = rf.pread(loc_at, _LOC64.size) if loc_at >= 0 else b""
    if len(loc) == _LOC64.size and loc[:4] == b"PK\x06\x07":
        _, _, rec_at, _ = _LOC64.unpack(loc)
        rec = rf.pread(rec_at, _EOCD64.size)
        if len(rec) != _EOCD64.size or rec[:4] != b"PK\x06\x06":
            return None
        f64 = _EOCD64.unpack(rec)
        count, cd_size, cd_at, cd_end = f64[7], f64[8], f64[9], rec_at
    elif _U16 in (count, total) or _U32 in (cd_size, cd_at):
        return None
    if cd_at + cd_size != cd_end:
        return None
    raw = rf.pread(cd_at, cd_size)
    out: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(count):
        if pos + _CDIR.size > len(raw):
            return None
        f = _CDIR.unpack_from(raw, pos)
        if f[0] != b"PK\x01\x02":
            return None
        method, crc, csize, usize, nlen, xlen, clen, at = f[4], f[7], f[8], f[9], f[10], f[11], f[12], f[16]
        name = raw[pos + _CDIR.size:pos + _CDIR.size + nlen].decode("utf-8", "replace")
        big = [v == _U32 for v in (usize, csize, at)]
        if any(big):
            vals = _zip64_extra(raw[pos + _CDIR.size + nlen:pos + _CDIR.size + nlen + xlen], sum(big))
            if vals is None:
                return None
            it = iter(vals)
            usize, csize, at = (next(it) if b else v for b, v in zip(big, (usize, csize, at)))
        out[name] = ZipEntry(at, method, csize, crc)
        pos += _CDIR.size + nlen + xlen + clen
    return out


def zip_entries(rf: RangeFile) -> dict[str, ZipEntry]:
    """The archive's members: the direct parse, else zipfile's (zip64, comments)."""
    fast = zip_entries_fast(rf)
    if fast is not None:
        return fast
    zf = zipfile.ZipFile(rf)  # reads only the end records and the central directory
    return {i.filename: ZipEntry(i.header_offset, i.compress_type, i.compress_size, i.CRC) for i in zf.infolist()}


def _data_at(rf: RangeFile, e: ZipEntry) -> int:
    """Offset of a member's data in the archive, from its local header."""
    header = rf.pread(e.header_offset, 30)
    if len(header) < 30 or header[:4] != _ZIP_MAGIC:
        raise zipfile.BadZipFile(f"no local file header at byte {e.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return int(e.header_offset + 30 + name_len + extra_len)


def _member(rf: RangeFile, e: ZipEntry) -> bytes:
    """A small stored member's bytes, CRC-checked."""
    if e.method != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile("a compressed member")
    data = rf.pread(_data_at(rf, e), e.size)
    if len(data) != e.size or zlib.crc32(data) != e.crc:
        raise zipfile.BadZipFile("a member fails its CRC check")
    return data


def _locate_zip(rf: RangeFile, entry: StorageEntry, chunk: ChunkMeta, dtype: str, where: str) -> ChunkPlace:
    try:
        members = zip_entries(rf)
        pkl = [n for n in members if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{where}: the chunk archive has {len(pkl)} data.pkl entries, expected 1 (corrupt file)")
        prefix = pkl[0][: -len("data.pkl")]
        stored = load_stored_tensor(_member(rf, members[pkl[0]]), where=where)
        order = members.get(f"{prefix}byteorder")
        if order is not None and _member(rf, order).strip() != b"little":
            raise CheckpointError(f"{where}: the chunk was saved on a big-endian machine; only little-endian "
                                  "checkpoints can be read")
        info = members.get(f"{prefix}data/{stored.key}")
        if info is None:
            raise CheckpointError(f"{where}: the chunk archive has no entry `data/{stored.key}` for its storage "
                                  "(corrupt file)")
        data_at = _data_at(rf, info)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as e:
        raise CheckpointError(
            f"{where}: bytes {entry.offset}..{entry.offset + entry.length} are not a readable torch.save "
            f"archive ({e}); the file is corrupt or truncated (re-copy it)"
        ) from e
    if stored.dtype != dtype:
        raise CheckpointError(f"{where}: the chunk is stored as {stored.dtype} but .metadata says {dtype} (corrupt checkpoint)")
    if stored.size != chunk.sizes:
        raise CheckpointError(f"{where}: the chunk is stored with shape {list(stored.size)} but .metadata says "
                              f"{list(chunk.sizes)} (corrupt checkpoint)")
    if not _row_major(stored.size, stored.stride):
        raise CheckpointError(f"{where}: the chunk is stored with strides {list(stored.stride)}, not row-major; "
                              "such chunks cannot be read by row ranges (save contiguous tensors)")
    if info.method != zipfile.ZIP_STORED:
        raise CheckpointError(f"{where}: the chunk's data is compressed in its archive; only stored "
                              "(uncompressed) torch.save archives can be read by byte ranges")
    isz = itemsize(st_dtype(dtype) or "U8")
    nbytes = math.prod(chunk.sizes) * isz
    if stored.storage_offset * isz + nbytes > info.size or data_at + info.size > entry.length:
        raise CheckpointError(f"{where}: the chunk's data entry is shorter than its shape needs (corrupt or "
                              "truncated file)")
    return ChunkPlace(start=entry.offset + data_at + stored.storage_offset * isz, nbytes=nbytes)


def _locate_safetensors(header: ShardHeader, key: str, entry: StorageEntry, chunk: ChunkMeta, dtype: str,
                        where: str) -> ChunkPlace:
    t = header.tensors.get(key)
    if t is None:
        raise CheckpointError(f"{where}: neither a torch.save archive nor a safetensors entry named `{key}` "
                              f"at byte {entry.offset} (corrupt file, or a storage layout this reader does not know)")
    if t.dtype != st_dtype(dtype) or t.shape != chunk.sizes:
        raise CheckpointError(f"{where}: stored as {t.dtype}{list(t.shape)} but .metadata says {dtype}"
                              f"{list(chunk.sizes)} (corrupt checkpoint)")
    info = header.metadata.get("DCP_SHARDING_INFO")
    try:
        saved = json.loads(info)[key]["saved_offsets"] if info else None
    except (ValueError, KeyError, TypeError):
        saved = None
    if saved is not None and tuple(saved) != chunk.offsets:
        # the safetensors writer keys tensors by name, so a file holds one chunk per key
        raise CheckpointError(f"{where}: this file holds the chunk at offsets {saved}, not {list(chunk.offsets)}; "
                              "two chunks of one key were written to one safetensors file (unreadable)")
    return ChunkPlace(start=entry.offset + t.start, nbytes=t.nbytes)


def read_safetensors_header(src: storage.ByteSource, offset: int, where: str) -> ShardHeader:
    """The safetensors header of a blob starting at `offset` and running to the end of the file."""
    size = src.size - offset
    n = parse_header_length(storage.read_bytes(src, offset, 8) if size >= 8 else b"", file_size=size, where=where)
    return parse_header(storage.read_bytes(src, offset + 8, n), file_size=size, where=where)


def locate_chunk(src: storage.ByteSource, key: str, entry: StorageEntry, chunk: ChunkMeta, dtype: str, *,
                 where: str, st_headers: dict[int, ShardHeader]) -> ChunkPlace:
    """Find where the row-major bytes of chunk `chunk` of tensor `key` start in `src`.

    `st_headers` caches parsed safetensors headers of this file by blob offset.
    """
    if entry.length >= 4:
        rf = RangeFile(src, entry.offset, entry.length)
        if rf.pread(0, 4) == _ZIP_MAGIC:
            return _locate_zip(rf, entry, chunk, dtype, where)
    header = st_headers.get(entry.offset)
    if header is None:
        try:
            header = read_safetensors_header(src, entry.offset, where)
        except CheckpointError as e:
            raise CheckpointError(
                f"{where}: bytes at {entry.offset} are neither a torch.save archive nor a safetensors "
                f"blob ({e.message}); the file is corrupt, or written by a DCP storage layout this "
                "reader does not know"
            ) from None
        st_headers[entry.offset] = header
    return _locate_safetensors(header, key, entry, chunk, dtype, where)


def check_coverage(size: tuple[int, ...], chunks: tuple[ChunkMeta, ...], *, where: str) -> None:
    """Chunks must tile the global shape exactly: inside it, no overlap, volumes adding up."""
    total = math.prod(size)
    vol = 0
    for c in chunks:
        if len(c.offsets) != len(size) or len(c.sizes) != len(size) or any(
                o + s > d for o, s, d in zip(c.offsets, c.sizes, size)):
            raise CheckpointError(f"{where}: chunk at offsets {list(c.offsets)} of sizes {list(c.sizes)} lies "
                                  f"outside the tensor's shape {list(size)} (corrupt .metadata)")
        vol += math.prod(c.sizes)
    boxes = [c for c in chunks if math.prod(c.sizes)]
    if size:
        # sweep along the largest dim; only boxes whose ranges there intersect can overlap
        dim = max(range(len(size)), key=lambda d: size[d])
        boxes.sort(key=lambda c: (c.offsets[dim], c.offsets))
        active: list[ChunkMeta] = []
        for c in boxes:
            active = [a for a in active if a.offsets[dim] + a.sizes[dim] > c.offsets[dim]]
            for a in active:
                if all(max(ao, co) < min(ao + asz, co + csz)
                       for ao, asz, co, csz in zip(a.offsets, a.sizes, c.offsets, c.sizes)):
                    raise CheckpointError(f"{where}: chunks at offsets {list(a.offsets)} and {list(c.offsets)} "
                                          "overlap (corrupt .metadata)")
            active.append(c)
    elif len(boxes) > 1:
        raise CheckpointError(f"{where}: a scalar stored {len(boxes)} times (corrupt .metadata)")
    if vol != total:
        raise CheckpointError(f"{where}: its chunks hold {vol} of its {total} elements (shape {list(size)}); "
                              "part of the tensor is missing from .metadata (incomplete or corrupt checkpoint)")
