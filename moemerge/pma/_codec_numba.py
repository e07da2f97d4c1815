"""Compiled loops of the state codec (`pma.state_codec`): a whole chunk encoded or decoded in
one call, block by block as `encode`/`decode` do it, with the same bytes (imported only when
a state is read or written, as numba's import costs ~0.3 s; `cache=True` keeps the machine
code in __pycache__).

Either loop returns -1 where it leaves the chunk to the numpy codec: a block that would be
stored with blosc-lz4 (or, decoding, any block or length that is not as `encode` writes it:
the numpy decoder then names what is wrong).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["encode_k", "decode_k"]

_RAW, _F32, _F24, _ZERO = 0, 1, 2, 4
_HEAD, _BLOCK_HEAD = 12, 20  # "<4sQ"; "<B3xIIQ"


@numba.njit(nogil=True, cache=True, inline="always")
def _put(buf: Any, pos: int, value: int, nbytes: int) -> None:
    """`value` little-endian in `nbytes` bytes at buf[pos]."""
    v = np.uint64(value)
    for i in range(nbytes):
        buf[pos + i] = np.uint8((v >> np.uint64(8 * i)) & np.uint64(0xFF))


@numba.njit(nogil=True, cache=True, inline="always")
def _get(buf: Any, pos: int, nbytes: int) -> int:
    v = np.uint64(0)
    for i in range(nbytes):
        v |= np.uint64(buf[pos + i]) << np.uint64(8 * i)
    return int(v)


@numba.njit(nogil=True, cache=True)
def encode_k(a: Any, block: int, lz4: bool, magic: Any, out: Any) -> int:
    """Encode float64 `a` into `out` (at least `state_codec.encoded_bound` bytes); the bytes
    used, or -1 when a block needs blosc-lz4 (`lz4` True: the numpy codec does it)."""
    n = a.size
    bits64 = a.view(np.uint64)
    hi = np.empty(min(block, n), np.float32)  # one block's float32 values
    hbits = hi.view(np.uint32)
    for i in range(4):
        out[i] = magic[i]
    _put(out, 4, n, 8)
    pos = _HEAD
    for b0 in range(0, n, block):
        m = min(block, n - b0)
        av = a[b0:b0 + m]
        anynz = np.uint64(0)
        k32 = 0
        k24 = 0
        for j in range(m):  # branch-free: LLVM vectorizes it
            v = av[j]
            f = np.float32(v)
            hi[j] = f
            anynz |= bits64[b0 + j]
            bad = np.float64(f) != v
            k32 += bad
            k24 += bad | ((hbits[j] & np.uint32(0xFF)) != 0)
        h = pos
        pos += _BLOCK_HEAD
        if anynz == 0:
            mode, k, size = _ZERO, 0, 0
        else:
            size32, size24, raw = 4 * m + 12 * k32, 3 * m + 12 * k24, 8 * m
            if min(size32, size24) >= raw:
                if lz4:
                    return -1
                mode, k, size = _RAW, 0, raw
                out[pos:pos + raw].view(np.uint64)[:] = bits64[b0:b0 + m]
                pos += raw
            else:
                f24 = size24 <= size32
                mode, k, size = (_F24, k24, size24) if f24 else (_F32, k32, size32)
                if f24:
                    top = out[pos:pos + 2 * m].view(np.uint16)
                    mid = out[pos + 2 * m:pos + 3 * m]
                    for j in range(m):
                        top[j] = np.uint16(hbits[j] >> np.uint32(16))
                        mid[j] = np.uint8((hbits[j] >> np.uint32(8)) & np.uint32(0xFF))
                else:
                    out[pos:pos + 4 * m].view(np.uint32)[:] = hbits[:m]
                if k:
                    p_idx = pos + (3 if f24 else 4) * m
                    idx = out[p_idx:p_idx + 4 * k].view(np.uint32)
                    val = out[p_idx + 4 * k:p_idx + 12 * k].view(np.uint64)
                    i = 0
                    for j in range(m):
                        bad = np.float64(hi[j]) != av[j] or (f24 and (hbits[j] & np.uint32(0xFF)) != 0)
                        if bad:
                            idx[i] = j
                            val[i] = bits64[b0 + j]
                            i += 1
                pos += size
        out[h] = np.uint8(mode)
        out[h + 1] = 0
        out[h + 2] = 0
        out[h + 3] = 0
        _put(out, h + 4, m, 4)
        _put(out, h + 8, k, 4)
        _put(out, h + 12, size, 8)
    return pos


@numba.njit(nogil=True, cache=True)
def decode_k(buf: Any, magic: Any, out: Any) -> int:
    """Decode an encoded chunk into float64 `out` (its size the chunk's count); 0, or -1 when
    the numpy decoder must (an lz4 block, or anything not as `encode` writes it)."""
    nb = buf.size
    if nb < _HEAD:
        return -1
    for i in range(4):
        if buf[i] != magic[i]:
            return -1
    n = _get(buf, 4, 8)
    if n != out.size:
        return -1
    bits64 = out.view(np.uint64)
    pos, done = _HEAD, 0
    while done < n:
        if pos + _BLOCK_HEAD > nb:
            return -1
        mode = int(buf[pos])
        m = _get(buf, pos + 4, 4)
        k = _get(buf, pos + 8, 4)
        size = _get(buf, pos + 12, 8)
        pos += _BLOCK_HEAD
        if m == 0 or done + m > n or pos + size > nb:
            return -1
        dst = out[done:done + m]
        if mode == _ZERO:
            if size:
                return -1
            bits64[done:done + m] = 0
        elif mode == _RAW:
            if size != 8 * m:
                return -1
            bits64[done:done + m] = buf[pos:pos + size].view(np.uint64)
        elif mode == _F32 or mode == _F24:
            width = 4 if mode == _F32 else 3
            if size != width * m + 12 * k:
                return -1
            if mode == _F32:
                f = buf[pos:pos + 4 * m].view(np.float32)
                for j in range(m):
                    dst[j] = np.float64(f[j])
            else:
                top = buf[pos:pos + 2 * m].view(np.uint16)
                mid = buf[pos + 2 * m:pos + 3 * m]
                for j in range(m):
                    u = (np.uint32(top[j]) << np.uint32(16)) | (np.uint32(mid[j]) << np.uint32(8))
                    dst[j] = np.float64(np.uint32(u).view(np.float32))
            if k:
                p_idx = pos + width * m
                idx = buf[p_idx:p_idx + 4 * k].view(np.uint32)
                val = buf[p_idx + 4 * k:p_idx + 12 * k].view(np.uint64)
                for i in range(k):
                    if idx[i] >= m:
                        return -1
                    bits64[done + idx[i]] = val[i]
        else:
            return -1  # lz4 (or unknown): the numpy decoder
        pos += size
        done += m
    if pos != nb:
        return -1
    return 0
