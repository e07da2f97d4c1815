"""Bounded pools of reusable buffers: the engine's whole memory footprint lives here."""

from __future__ import annotations

import queue
import threading

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.engine.device import allocate
from moemerge.sizes import format_size

__all__ = ["BufferPool", "Cancelled", "PoolCache"]


class Cancelled(Exception):
    """Raised in a pipeline thread when the run stops early."""


class BufferPool:
    """`count` byte buffers of `nbytes` each, allocated once and reused; `acquire` blocks.

    Example::

        pool = BufferPool(2, 64 << 20, "read")
        buf = pool.acquire(stop)   # a uint8 tensor of 64 MiB
        ...
        pool.release(buf)
    """

    def __init__(self, count: int, nbytes: int, name: str, *, device: str = "cpu") -> None:
        self.count = count
        self.nbytes = nbytes
        self.name = name
        self.device = device
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            # touch the pages now: first-touch page faults on every chunk cost ~10% here
            self._free.put(allocate(max(nbytes, 1), device))  # `device`: an allocation kind (engine/device.py)

    def __repr__(self) -> str:
        return (
            f"BufferPool({self.name!r}, {self.count} x {format_size(self.nbytes)}, "
            f"free={self._free.qsize()})"
        )

    def acquire(self, stop: threading.Event | None = None) -> torch.Tensor:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise Cancelled() from None

    def release(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class PoolCache:
    """Pools kept between runs in one process, for a Dask worker that runs task after task.

    Allocating (and touching) a unit's buffers costs about as much as reading a tenth of it;
    a worker reuses the pools of its previous task when they are big enough. At most one pool
    per name is kept (the largest), so what stays resident is one task's buffers.

    Example::

        pool = CACHE.take("read", 2, 64 << 20)
        ...
        CACHE.give(pool)
    """

    def __init__(self) -> None:
        self._free: dict[str, BufferPool] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PoolCache({sorted(self._free.values(), key=lambda p: p.name)})"

    def take(self, name: str, count: int, nbytes: int, device: str = "cpu") -> BufferPool:
        with self._lock:
            pool = self._free.get(name)
            if pool is not None and pool.count == count and pool.nbytes >= nbytes and pool.device == device:
                del self._free[name]
                return pool
        return BufferPool(count, nbytes, name, device=device)

    def give(self, pool: BufferPool) -> None:
        with self._lock:
            kept = self._free.get(pool.name)
            if kept is None or kept.nbytes < pool.nbytes:
                self._free[pool.name] = pool

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
