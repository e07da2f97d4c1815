"""What a method left in a chunk's scratch buffers, so the next pass over the same chunk reuses it.

When a tensor fits the budget the engine reads it once and runs every statistics pass on the
same chunk object (DESIGN "read once"); selection passes then ask for the same values (task
vectors, |d|, variances) three or four times. A method records here which values it left in
which scratch buffers for which chunk, and skips recomputing them when asked again for that
very chunk object. Identity is checked through a weak reference: another chunk (another read,
another tensor, another run) never matches, and the memo keeps no buffer alive. The record is
per thread, since worker threads have their own chunks and scratch buffers.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["ScratchMemo"]


class ScratchMemo:
    """Tags ("deltas", "var", ...) valid in the scratch buffers of one chunk object."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _state(self) -> tuple[Any, set[str]]:
        return getattr(self._local, "ref", None), getattr(self._local, "tags", set())

    def has(self, chunk: Any, tag: str) -> bool:
        """Whether `tag` was recorded for this chunk object (and nothing overwrote it since)."""
        ref, tags = self._state()
        return ref is not None and ref() is chunk and tag in tags

    def set(self, chunk: Any, *tags: str) -> None:
        """Record that the scratch buffers of `chunk` now hold exactly `tags`."""
        try:
            ref = weakref.ref(chunk)
        except TypeError:  # a chunk type without weak references: never memoize
            self.clear()
            return
        self._local.ref = ref
        self._local.tags = set(tags)

    def add(self, chunk: Any, tag: str) -> None:
        """Record `tag` as well, keeping what `chunk` already holds."""
        ref, tags = self._state()
        if ref is not None and ref() is chunk:
            self._local.tags = tags | {tag}
        else:
            self.set(chunk, tag)

    def clear(self) -> None:
        """Forget everything (a method wrote its scratch buffers for another purpose)."""
        self._local.ref = None
        self._local.tags = set()
