"""What a method left in a chunk's scratch buffers, so the next pass over the same chunk reuses it.

When a tensor fits the budget the engine reads it once and runs every statistics pass on the
same chunk object, then `apply` on a second view of the same read and scratch buffers (DESIGN
"read once"); selection passes ask for the same values (task vectors, |d|, variances, masks)
three or four times, and apply once more. A method records here which values it left in which
scratch buffers for which chunk, and skips recomputing them when asked again for that read.

A chunk matches the record when it is the recorded object, or when the recorded object is
still alive (so its read and scratch buffers are still allocated, and no other run can own
that memory) and the new chunk has the same tensor, rows and scratch buffers: the same input
bytes, with the method's own values still in the buffers, because every method that writes
its scratch buffers updates or clears the record first. The record holds a weak reference,
so it keeps no buffer alive; it is per thread, since worker threads have their own chunks
and scratch buffers.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["ScratchMemo"]


class ScratchMemo:
    """Tags ("deltas", "var", ...) valid in the scratch buffers of one read of a chunk.

    `buffers`: how many scratch buffers the method uses for n inputs (its working copies);
    their addresses are part of what identifies the read.
    """

    def __init__(self, buffers: Callable[[int], int]) -> None:
        self._local = threading.local()
        self._buffers = buffers

    def _key(self, chunk: Any) -> tuple[Any, ...]:
        n = self._buffers(chunk.n_inputs)
        return (chunk.name, chunk.row_start, chunk.row_stop,
                tuple((chunk.scratch(k).data_ptr(), chunk.scratch(k).numel()) for k in range(n)))

    def _same(self, chunk: Any) -> bool:
        ref = getattr(self._local, "ref", None)
        held = ref() if ref is not None else None
        if held is None:
            return False
        return held is chunk or self._local.key == self._key(chunk)

    def has(self, chunk: Any, tag: str) -> bool:
        """Whether `tag` was recorded for this read of the chunk (and nothing overwrote it since)."""
        return tag in getattr(self._local, "tags", ()) and self._same(chunk)

    def set(self, chunk: Any, *tags: str) -> None:
        """Record that the scratch buffers of `chunk` now hold exactly `tags`."""
        try:
            ref = weakref.ref(chunk)
        except TypeError:  # a chunk type without weak references: never memoize
            self.clear()
            return
        self._local.ref = ref
        self._local.key = self._key(chunk)
        self._local.tags = set(tags)

    def add(self, chunk: Any, *tags: str) -> None:
        """Record `tags` as well, keeping what this read of `chunk` already holds."""
        if self._same(chunk):
            self._local.tags = self._local.tags | set(tags)
        else:
            self.set(chunk, *tags)

    def drop(self, chunk: Any, *tags: str) -> None:
        """Forget `tags` (their buffers are about to be overwritten), keep the rest."""
        if self._same(chunk):
            self._local.tags = self._local.tags - set(tags)

    def clear(self) -> None:
        """Forget everything (a method wrote its scratch buffers for another purpose)."""
        self._local.ref = None
        self._local.key = None
        self._local.tags = set()
