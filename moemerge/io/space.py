"""Free space checked against the plan before a local output is laid out (fail before work)."""

from __future__ import annotations

import os
import shutil
from typing import Any

from moemerge.errors import OutputError
from moemerge.sizes import format_size

__all__ = ["check_space", "reusable_bytes"]


def _nearest_existing(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def reusable_bytes(target: str, shards: Any) -> int:
    """Bytes the planned shards already hold in `target` (a resumed or rerun output reuses them:
    the writer sizes existing shard files in place)."""
    total = 0
    for s in shards:
        try:
            st = os.stat(os.path.join(target, s.file))
        except OSError:
            continue
        total += min(st.st_blocks * 512, s.size)  # allocated bytes: laid-out shards are sparse
    return total


def check_space(writer: Any, need: int) -> None:
    """Refuse, before anything is written, a local output whose disk lacks `need` bytes.

    `need` is what the plan writes (tensor bytes and side files); shard headers are added, and
    what the writer's target already holds of the planned shards is counted as there. When
    overwriting, the old output stays until the swap, so the new one needs its full size.
    Object storage is not checked (it reports no free space).
    """
    target = getattr(writer, "target", None)
    if not isinstance(target, str) or "://" in target:
        return
    shards = getattr(writer, "shards", None) or ()
    need += sum(len(s.header) for s in shards) - reusable_bytes(target, shards)
    where = _nearest_existing(os.path.abspath(target))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # no answer (some network filesystems): the writes report a full disk themselves
    if need > free:
        raise OutputError(
            f"{getattr(writer, 'url', target)}: the output needs {format_size(need)} ({need:,} bytes) but "
            f"{where} has {format_size(free)} ({free:,} bytes) free; free up space or choose another location")
