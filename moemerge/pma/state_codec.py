"""A lossless Zarr codec for the PMA state's float64 sums: each value stored as float32, or in
24 bits, where that is exact, and whole (8 bytes) where it is not (an "exception").

Why: the state's sums of bf16/fp16 snapshots (SMA's S, WMA's W) are float64 values that almost
always fit a float32 exactly, and mostly in its top 24 bits (a sum of ten bf16 values needs
about 12-16 significant bits). Blosc-lz4 with byte shuffle (the earlier state codec) found the
same redundancy at about 4.5 ns per element to encode and 2 to decode, which made a nightly
`pma update` CPU-bound; this codec costs a few numpy passes (about 1-2 ns per element each
way) for about 3 bytes per element (lz4: about 2.6). The values read back are the float64
values written, bit for bit (NaN payloads and -0.0 included): the state's arithmetic and its
drift bound do not change.

An encoded chunk is `MAGIC`, the element count (uint64), then blocks of at most `BLOCK`
elements, each a header (mode, elements, exceptions, payload bytes) and its payload:

- `F32`: the values as float32, then the exceptions' indices (uint32) and float64 values;
- `F24`: the float32 bit patterns' top 16 bits (uint16 plane), then their next 8 (uint8 plane)
  (a float32 whose low 8 bits are zero), then the exceptions as above;
- `RAW`: the float64 values as they are (little-endian);
- `LZ4`: blosc-lz4 with byte shuffle of the float64 values (a block that is mostly
  exceptions, e.g. the sums of fp32 snapshots, when the codec is told `fallback: lz4`);
- `ZERO`: every value +0.0, no payload (the padding of a tensor's short last chunk, which
  zarr stores at the full chunk shape; zero tensors).

Each block takes the smallest of the modes it may use. Decoding checks every length and index:
a damaged chunk fails (the state's chunk checksums catch it before, io.zarr_store). With numba,
a chunk is encoded or decoded in one compiled pass (pma._codec_numba, about 1 ns per element
each way, the same bytes); the numpy loops below stay the reference and do what it leaves.
"""

from __future__ import annotations

import importlib
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from moemerge.errors import CheckpointError

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer

__all__ = ["CODEC_NAME", "encode", "encode_parts", "encode_into", "encoded_bound", "decode", "state_codec",
           "register"]

CODEC_NAME = "moemerge.f64split"
MAGIC = b"MMF1"
#: Elements per block: its temporaries (about 20 bytes per element) stay in the CPU's cache,
#: and bounded whatever the chunk size.
BLOCK = 1 << 16
RAW, F32, F24, LZ4, ZERO = 0, 1, 2, 3, 4
_HEAD = struct.Struct("<4sQ")
_BLOCK = struct.Struct("<B3xIIQ")  # mode, elements, exceptions, payload bytes
#: bytes per exception: its index (uint32) and its float64 value
_EXC = 12

Fallback = Literal["raw", "lz4"]


def _lz4() -> Any:
    from numcodecs import Blosc  # type: ignore[import-untyped]

    return Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, typesize=8)


def _encode_block(a: np.ndarray, fallback: Fallback, parts: list[bytes | memoryview]) -> None:
    n = a.size
    if not a.view(np.uint64).any():  # all +0.0 (-0.0 has its sign bit set: not here)
        parts.append(_BLOCK.pack(ZERO, n, 0, 0))
        return
    with np.errstate(over="ignore"):  # beyond float32's range: inf, an exception
        hi = a.astype(np.float32)
    bad32 = hi.astype(np.float64) != a  # inexact in float32 (NaN too: kept whole, payload and all)
    bits = hi.view(np.uint32)
    bad24 = bad32 | ((bits & np.uint32(0xFF)) != 0)
    k32 = int(np.count_nonzero(bad32))
    k24 = int(np.count_nonzero(bad24))
    size32, size24, raw = 4 * n + _EXC * k32, 3 * n + _EXC * k24, 8 * n
    if min(size32, size24) >= raw:
        if fallback == "lz4":
            packed = _lz4().encode(a)
            if len(packed) < raw:
                parts += [_BLOCK.pack(LZ4, n, 0, len(packed)), packed]
                return
        parts += [_BLOCK.pack(RAW, n, 0, raw), a.data.cast("B")]
        return
    if size24 <= size32:
        idx = np.flatnonzero(bad24).astype(np.uint32)
        top = (bits >> np.uint32(16)).astype(np.uint16)
        mid = ((bits >> np.uint32(8)) & np.uint32(0xFF)).astype(np.uint8)
        parts += [_BLOCK.pack(F24, n, k24, size24), top.data.cast("B"), mid.data.cast("B"),
                  idx.data.cast("B"), np.ascontiguousarray(a[idx]).data.cast("B")]
        return
    idx = np.flatnonzero(bad32).astype(np.uint32)
    parts += [_BLOCK.pack(F32, n, k32, size32), hi.data.cast("B"), idx.data.cast("B"),
              np.ascontiguousarray(a[idx]).data.cast("B")]


def _compiled() -> Any:
    """The compiled loops (pma._codec_numba), imported on first use; None without numba or
    with MOEMERGE_NO_NUMBA=1 (the numpy codec then does all: the same bytes)."""
    if not _KERNELS:
        mod = None
        if os.environ.get("MOEMERGE_NO_NUMBA", "") in ("", "0"):
            try:
                mod = importlib.import_module("moemerge.pma._codec_numba")
            except (ImportError, RuntimeError, OSError):
                mod = None
        _KERNELS.append(mod)
    return _KERNELS[0]


_KERNELS: list[Any] = []
_MAGIC = np.frombuffer(MAGIC, dtype=np.uint8)


def encoded_bound(count: int) -> int:
    """The most bytes `encode` writes for `count` values."""
    return _HEAD.size + 8 * count + _BLOCK.size * max(1, -(-count // BLOCK))


def encode_into(values: np.ndarray, out: np.ndarray, fallback: Fallback = "lz4", compiled: bool = True) -> int | None:
    """`encode`'s bytes written into uint8 `out` (at least `encoded_bound` long) by the
    compiled loop; their length, or None where it does not run (the caller uses `encode_parts`)."""
    k = _compiled() if compiled else None
    a = np.ascontiguousarray(values, dtype="<f8").reshape(-1)
    if k is None or out.size < encoded_bound(a.size):
        return None
    used = int(k.encode_k(a, BLOCK, fallback == "lz4", _MAGIC, out))
    return used if used >= 0 else None


def encode_parts(values: np.ndarray, fallback: Fallback = "lz4", compiled: bool = True) -> list[bytes | memoryview]:
    """The encoded bytes of a float64 array (any shape; encoded flat), as consecutive parts
    (written one after another, e.g. by os.writev, without joining them first); `compiled`
    False: by the numpy loops only (numba not loaded for it)."""
    a = np.ascontiguousarray(values, dtype="<f8").reshape(-1)
    if compiled and a.size >= BLOCK and _compiled() is not None:  # one compiled pass (small chunks: numpy's is as quick)
        buf = np.empty(encoded_bound(a.size), dtype=np.uint8)
        used = encode_into(a, buf, fallback)
        if used is not None:
            return [buf[:used].data]
    parts: list[bytes | memoryview] = [_HEAD.pack(MAGIC, a.size)]
    for s in range(0, a.size, BLOCK):
        _encode_block(a[s:s + BLOCK], fallback, parts)
    return parts


def encode(values: np.ndarray, fallback: Fallback = "lz4") -> bytes:
    """The encoded bytes of a float64 array (any shape; encoded flat)."""
    return b"".join(encode_parts(values, fallback))


def _damaged(why: str) -> CheckpointError:
    return CheckpointError(f"a PMA state chunk cannot be decoded ({why}): the state is damaged; rebuild "
                           "it with `moemerge pma update ... --recompute-every 1` (SMA/WMA) or start a new state")


def decode(data: bytes | memoryview | np.ndarray, out: np.ndarray | None = None, compiled: bool = True) -> np.ndarray:
    """The float64 values (flat) of an encoded chunk, into `out` if given (`compiled` False:
    by the numpy loop only)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < _HEAD.size:
        raise _damaged(f"{buf.size} bytes")
    magic, n = _HEAD.unpack_from(buf.data, 0)
    if magic != MAGIC:
        raise _damaged(f"unknown header {bytes(magic)!r}")
    if out is None:
        out = np.empty(n, dtype="<f8")
    elif out.size != n or out.dtype != np.dtype("<f8"):
        raise _damaged(f"{n} values, expected {out.size}")
    k = _compiled() if compiled else None
    if k is not None and int(k.decode_k(buf, _MAGIC, out)) == 0:
        return out  # else (lz4 blocks, or damage the checks below name) the numpy loop
    pos, done = _HEAD.size, 0
    while done < n:
        if pos + _BLOCK.size > buf.size:
            raise _damaged("truncated")
        mode, m, k, size = _BLOCK.unpack_from(buf.data, pos)
        pos += _BLOCK.size
        if m == 0 or done + m > n or pos + size > buf.size:
            raise _damaged("block lengths")
        body, dst = buf[pos:pos + size], out[done:done + m]
        if mode == ZERO:
            if size:
                raise _damaged("zero block length")
            dst[:] = 0.0
        elif mode == RAW:
            if size != 8 * m:
                raise _damaged("raw block length")
            dst[:] = body.view("<f8")
        elif mode == LZ4:
            got = np.frombuffer(_lz4().decode(body), dtype="<f8")
            if got.size != m:
                raise _damaged("lz4 block length")
            dst[:] = got
        elif mode in (F32, F24):
            width = 4 if mode == F32 else 3
            if size != width * m + _EXC * k:
                raise _damaged("block length")
            if mode == F32:
                dst[:] = body[:4 * m].view("<f4")
            else:
                bits = body[:2 * m].view("<u2").astype(np.uint32) << np.uint32(16)
                bits |= body[2 * m:3 * m].astype(np.uint32) << np.uint32(8)
                dst[:] = bits.view(np.float32)
            if k:
                idx = body[width * m:width * m + 4 * k].view("<u4")
                if int(idx.max()) >= m:
                    raise _damaged("exception index")
                dst[idx] = body[width * m + 4 * k:].view("<f8")
        else:
            raise _damaged(f"unknown block mode {mode}")
        pos += size
        done += m
    if pos != buf.size:
        raise _damaged("trailing bytes")
    return out


_CODEC: Any = None


def _codec_class() -> Any:
    """The zarr BytesBytesCodec, defined on first use (zarr is imported only when needed)."""
    global _CODEC
    if _CODEC is not None:
        return _CODEC
    from zarr.abc.codec import BytesBytesCodec
    from zarr.core.common import parse_named_configuration

    @dataclass(frozen=True)
    class F64SplitCodec(BytesBytesCodec):
        """`encode`/`decode` as a zarr v3 bytes-to-bytes codec (after the `bytes` codec)."""

        is_fixed_size = False
        fallback: str = "lz4"

        @classmethod
        def from_dict(cls, data: dict[str, Any]) -> F64SplitCodec:
            _, conf = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
            fallback = (conf or {}).get("fallback", "lz4")
            if fallback not in ("lz4", "raw"):
                raise CheckpointError(f"{CODEC_NAME}: unknown fallback {fallback!r}")
            return cls(fallback=fallback)

        def to_dict(self) -> dict[str, Any]:
            return {"name": CODEC_NAME, "configuration": {"fallback": self.fallback}}

        def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
            values = decode(chunk_bytes.as_numpy_array())
            return chunk_spec.prototype.buffer.from_array_like(values.view(np.uint8))

        async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
            import asyncio

            return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

        def _encode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
            values = chunk_bytes.as_numpy_array().view("<f8")
            return chunk_spec.prototype.buffer.from_bytes(encode(values, self.fallback))  # type: ignore[arg-type]

        async def _encode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
            import asyncio

            return await asyncio.to_thread(self._encode_sync, chunk_bytes, chunk_spec)

        def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
            raise NotImplementedError

    _CODEC = F64SplitCodec
    return _CODEC


def register() -> None:
    """Make zarr know the codec (before a state version is opened or written); idempotent."""
    from zarr.registry import get_codec_class, register_codec

    try:
        get_codec_class(CODEC_NAME)
        return
    except KeyError:
        pass
    register_codec(CODEC_NAME, _codec_class())


def state_codec(fallback: Fallback = "lz4") -> Any:
    """The codec instance for a state writer's `compressors`."""
    register()
    return _codec_class()(fallback=fallback)
