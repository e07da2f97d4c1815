"""One tensor as the `torch.save` archive DCP's default writer stores per chunk, laid out before
its bytes exist: everything but the data and its CRC-32 follows from dtype and shape, so the
data can be written in row chunks, in any order, at fixed offsets (io.dcp_writer).

The layout copies what `torch.save` (PyTorch's miniz writer) writes to a stream: uncompressed
records under `archive/`, each record's data 64-byte aligned by an `FB` padding extra field,
sizes and CRC in a data descriptor after the data (flag bit 3), a central directory, and the
zip64 end records; zip64 extra fields where a size or offset needs 64 bits.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["ALIGN", "ArchiveLayout", "tensor_archive", "storage_type_name", "crc32_combine"]

#: Record data alignment inside an archive (torch.save's `kFieldAlignment`); archives also
#: start on this boundary in their data file.
ALIGN = 64
_U32 = 0xFFFFFFFF
_FLAGS = 0x0808  # bit 3: sizes and CRC in a data descriptor; bit 11: UTF-8 names (as torch)
_DATA = "data/0"


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveLayout:
    """A tensor's archive: `head` + the tensor's `nbytes` raw bytes + `tail`. The data's CRC-32
    goes at the offsets `crc_at` (relative to the archive's start; zero until patched)."""

    head: bytes
    tail: bytes
    nbytes: int
    crc_at: tuple[int, ...]

    @property
    def data_offset(self) -> int:
        return len(self.head)

    @property
    def length(self) -> int:
        return len(self.head) + self.nbytes + len(self.tail)


def storage_type_name(dtype: Any) -> str | None:
    """The legacy storage class torch.save pickles for `dtype` ('FloatStorage'), or None when
    torch.save would not write this dtype with one (fp8, the unsigned ints beyond uint8)."""
    import torch

    name = torch.storage._dtype_to_storage_type_map().get(dtype)
    return str(name) if name is not None else None


class _StorageMarker:
    """Stands for the tensor's storage in the pickle; becomes the persistent id torch uses."""


class _TensorRecipe:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`."""

    def __init__(self, marker: _StorageMarker, shape: tuple[int, ...]) -> None:
        self.marker, self.shape = marker, shape

    def __reduce__(self) -> tuple[Any, ...]:
        import torch._utils

        stride = []
        acc = 1
        for d in reversed(self.shape):  # row-major (contiguous) strides
            stride.append(acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.marker, 0, tuple(self.shape), tuple(reversed(stride)), False, OrderedDict()))


def _data_pkl(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """`archive/data.pkl` as torch.save writes it for a contiguous CPU tensor (protocol 2)."""
    import io

    import torch

    name = storage_type_name(dtype)
    if name is None:
        raise ValueError(f"torch.save has no storage type for {dtype}")
    storage_type = getattr(torch, name)
    marker = _StorageMarker()
    numel = math.prod(shape)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if obj is marker:
                return ("storage", storage_type, "0", "cpu", numel)
            return None

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_TensorRecipe(marker, shape))
    return buf.getvalue()


def _zip64_extra(usize: int | None, offset: int | None) -> bytes:
    """A zip64 extended-information extra field (id 1) with the values given, in spec order."""
    body = b""
    if usize is not None:
        body += struct.pack("<QQ", usize, usize)  # uncompressed, compressed (stored: equal)
    if offset is not None:
        body += struct.pack("<Q", offset)
    return struct.pack("<HH", 1, len(body)) + body if body else b""


def tensor_archive(dtype: Any, shape: tuple[int, ...], *, ident: str, force_zip64: bool = False) -> ArchiveLayout:
    """The archive of a contiguous tensor of `dtype` (a torch dtype) and `shape`.

    `ident` makes the (deterministic) serialization id. Alignment is counted from the archive's
    start, as torch counts from its stream's start (archives start ALIGN-aligned in their file,
    so the data is aligned in the file too). `force_zip64` writes zip64 fields everywhere (tests).
    Example: a = tensor_archive(torch.float32, (3, 4), ident="w"); a.head + raw_bytes + a.tail
    (with the data's CRC-32 at `a.crc_at`) is what `torch.load` reads as that tensor.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    digits = str(int.from_bytes(hashlib.sha256(ident.encode()).digest()[:17], "big")).rjust(40, "0")[-40:]
    records: list[tuple[str, bytes | None]] = [
        ("data.pkl", _data_pkl(dtype, shape)), (".format_version", b"1"), (".storage_alignment", str(ALIGN).encode()),
        ("byteorder", b"little"), (_DATA, None), ("version", b"3\n"), (".data/serialization_id", digits.encode()),
    ]
    out = bytearray()
    head = b""
    pos = 0  # archive-relative position
    central: list[bytes] = []
    crc_at: list[int] = []
    data_cd_entry = -1
    for rec, payload in records:
        name = f"archive/{rec}".encode()
        size = nbytes if payload is None else len(payload)
        big_size = force_zip64 or size >= _U32
        big_off = force_zip64 or pos >= _U32
        local64 = _zip64_extra(size if big_size else None, pos if big_off else None) if (big_size or big_off) else b""
        start = pos + 30 + len(name) + 4 + len(local64)
        pad = (-start) % ALIGN
        extra = local64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra
        crc = 0
        if payload is None:
            out += local
            head = bytes(out)
            out = bytearray()  # the tail starts after the data
            data_end = pos + len(local) + nbytes
            crc_at.append(data_end + 4)
        else:
            import zlib

            crc = zlib.crc32(payload)
            out += local + payload
        dd = (struct.pack("<IIQQ", 0x08074B50, crc, size, size) if local64
              else struct.pack("<IIII", 0x08074B50, crc, size, size))
        out += dd
        cd64 = _zip64_extra(size if big_size else None, pos if big_off else None)
        central_entry = struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, _FLAGS, 0, 0, 0, crc,
            _U32 if big_size else size, _U32 if big_size else size, len(name), len(cd64), 0, 0, 0, 0,
            _U32 if big_off else pos) + name + cd64
        if payload is None:
            data_cd_entry = len(central)
        central.append(central_entry)
        pos += len(local) + size + len(dd)
    cd_offset = pos
    for i, entry in enumerate(central):
        if i == data_cd_entry:
            crc_at.append(pos + 16)
        out += entry
        pos += len(entry)
    cd_size = pos - cd_offset
    n = len(central)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, pos, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, min(cd_size, _U32), min(cd_offset, _U32), 0)
    return ArchiveLayout(head=head, tail=bytes(out), nbytes=nbytes, crc_at=tuple(crc_at))


# -- CRC-32 of a tensor written in pieces -------------------------------------------------------
# zlib's crc32_combine (not in Python's zlib module): crc(A + B) from crc(A), crc(B) and len(B),
# by multiplying crc(A) by x^(8 len(B)) modulo the CRC polynomial (reflected bit order).

_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    p = 1 << 30  # x^1
    table = [p]
    for _ in range(31):
        p = _multmodp(p, p)
        table.append(p)
    return table


_X2N = _x2n_table()


def _x8nmodp(n: int) -> int:
    """x^(8 n) modulo the polynomial."""
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B given crc1 = crc32(A), crc2 = crc32(B) and len2 = len(B), as zlib's."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2
