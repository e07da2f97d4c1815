"""Large local reads and writes that bypass the page cache (Linux `O_DIRECT`).

A merge streams every input byte once and writes every output byte once: caching them only
costs. On the VMs we measured, a buffered cold read of 6 GB spent 7-11 s of kernel CPU (both
cores) allocating and filling page-cache pages, and a buffered write of 4 GB 2-11 s; the same
transfers with `O_DIRECT` took 0.1-0.2 s of CPU and less wall time (`scripts/bench_quant.py`,
`scripts/bench.py`). So local ranges of at least DIRECT_MIN bytes go through here:

- a read whose range is mostly in the page cache already (a file just written, or hinted by
  `prefetch`; asked with `cachestat`) stays buffered; any other is done by aligned direct
  reads into a per-thread bounce buffer, copied into the caller's buffer;
- writes put the whole ALIGN-byte blocks of a range through a bounce buffer with direct
  writes, and the unaligned head and tail (blocks shared with a neighbouring tensor or the
  header, which another thread may be writing) with ordinary buffered writes.

Both give the bytes the buffered calls give (the kernel keeps direct I/O coherent with the
page cache; tested both ways). Where the file system refuses `O_DIRECT` (tmpfs; EINVAL),
or `MOEMERGE_DIRECT_IO=0` is set, everything is buffered.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from typing import Any

__all__ = ["ALIGN", "DIRECT_MIN", "linux_libc", "PIECE", "enabled", "mostly_cached", "open_direct", "read_direct", "read_once", "write_direct",
           "write_once"]

#: Offsets and lengths of direct transfers are multiples of this (the page size; every
#: device's logical block size we know divides it).
ALIGN = 4096
#: Ranges shorter than this stay buffered: the bounce copy and the extra system call are
#: not worth it, and small reads (headers, scales) are likely cached anyway.
DIRECT_MIN = 1 << 20
#: Bytes per direct transfer, the size of each thread's bounce buffer (measured: 1-2 MiB
#: direct reads and writes ran the disk as fast as 64 MiB ones).
PIECE = 2 << 20

_local = threading.local()


def enabled() -> bool:
    """Whether direct transfers may be used here (Linux, and not switched off by the user)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("MOEMERGE_DIRECT_IO", "1") != "0"


def _bounce() -> mmap.mmap:
    """This thread's page-aligned buffer of PIECE bytes (kept: its pages are touched once)."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < PIECE:
        buf = _local.buf = mmap.mmap(-1, PIECE)
    return buf


def open_direct(path: str, flags: int) -> int | None:
    """A descriptor of `path` opened with `flags | O_DIRECT`, or None where that is refused."""
    if not enabled():
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class _CacheStat(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                "nr_recently_evicted")]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


#: Linux `cachestat(2)` (6.5+; one number on every architecture), or None elsewhere.
_SYS_CACHESTAT = 451


def linux_libc(name: str, restype: Any, argtypes: tuple[Any, ...] | None = None) -> Any:
    """libc's function `name` (errno kept), or None off Linux or where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.restype = restype
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


_syscall = linux_libc("syscall", ctypes.c_long)
_no_cachestat = _syscall is None


def mostly_cached(fd: int, offset: int, nbytes: int) -> bool:
    """Whether at least half of the pages of [offset, offset + nbytes) are in the page cache
    (`cachestat`; False where the kernel cannot say). Such a range is read buffered: a direct
    read would fetch from the disk what memory already holds (a file just written, or hinted
    by `prefetch`). A non-blocking buffered read (`RWF_NOWAIT`) would not do as a probe: a
    miss starts the kernel's read-ahead, which then fills the cache with the rest of the file."""
    global _no_cachestat
    if _no_cachestat:
        return False
    rng = _CacheStatRange(offset, nbytes)
    st = _CacheStat()
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # an older kernel, or a seccomp filter
            _no_cachestat = True
        return False
    return int(st.nr_cache) * 2 * mmap.PAGESIZE >= nbytes


def read_direct(dfd: int, offset: int, out: memoryview) -> int:
    """Fill `out` with the bytes at `offset..` through aligned direct reads; returns how many
    were filled (fewer only where the file ends). Raises OSError(EINVAL) where the device
    wants a larger alignment (the caller then reads buffered)."""
    bounce = _bounce()
    view = memoryview(bounce)
    done = 0
    try:
        while done < len(out):
            pos = offset + done
            start = pos - pos % ALIGN
            skip = pos - start
            span = min(PIECE, -(-(skip + len(out) - done) // ALIGN) * ALIGN)
            got = os.preadv(dfd, [view[:span]], start)
            take = min(len(out) - done, got - skip)
            if take <= 0:
                break
            out[done:done + take] = view[skip:skip + take]
            done += take
    finally:
        view.release()
    return done


def write_direct(fd: int, dfd: int, data: memoryview, offset: int) -> None:
    """Write `data` at `offset`: its whole ALIGN blocks with direct writes through the bounce
    buffer (`dfd`), the partial blocks at either end with buffered writes (`fd`). Raises
    OSError as `os.pwrite` does (EINVAL: the device wants a larger alignment)."""
    end = offset + len(data)
    a = -(-offset // ALIGN) * ALIGN  # first whole block
    b = end - end % ALIGN  # end of the last whole block
    if b <= a:
        _pwrite_all(fd, data, offset)
        return
    _pwrite_all(fd, data[:a - offset], offset)
    bounce = _bounce()
    view = memoryview(bounce)
    try:
        pos = a
        while pos < b:
            n = min(PIECE, b - pos)
            view[:n] = data[pos - offset:pos - offset + n]
            put = os.pwrite(dfd, view[:n], pos)
            if put < n:  # short (disk nearly full): the rest, unaligned now, buffered
                _pwrite_all(fd, view[put:n], pos + put)
            pos += n
    finally:
        view.release()
    _pwrite_all(fd, data[b - offset:], b)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def read_once(fd: int, path: str, offset: int, out: memoryview) -> int:
    """A one-off read of `path` (open as `fd`): how many leading bytes of `out` direct reads
    filled; 0 where the range is short or mostly cached, or direct reads are off or refused.
    The caller reads the rest buffered."""
    if len(out) < DIRECT_MIN or not enabled() or mostly_cached(fd, offset, len(out)):
        return 0
    dfd = open_direct(path, os.O_RDONLY)
    if dfd is None:
        return 0
    try:
        return read_direct(dfd, offset, out)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return 0
    finally:
        os.close(dfd)


def write_once(fd: int, path: str, data: memoryview, offset: int) -> bool:
    """A one-off write of `data` at `offset` of `path` (open for writing as `fd`) around the
    page cache (`write_direct`); False, nothing written, where the range is short or direct
    writes are off or refused (the caller writes it buffered)."""
    if len(data) < DIRECT_MIN or not enabled():
        return False
    dfd = open_direct(path, os.O_WRONLY)
    if dfd is None:
        return False
    try:
        write_direct(fd, dfd, data, offset)
        return True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    finally:
        os.close(dfd)
