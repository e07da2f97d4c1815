"""The first reads of a merge started while the interpreter still loads torch (~1 s).

The plan says which byte ranges the engine reads first (its work units, in order); asking the
kernel for them now (`posix_fadvise(WILLNEED)` on local files) overlaps reading them from disk
with the import, instead of the disk idling until the pipeline starts. A hint only: nothing
is read into our memory, other storage is left alone, and a failed hint changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moemerge.planner.plan import Plan

__all__ = ["FIRST_READS", "prefetch_first_reads"]

#: Bytes hinted at most: about what a disk reads while torch loads (2 GB/s for ~1 s), small
#: beside the page cache of any machine that merges models.
FIRST_READS = 2 << 30


def prefetch_first_reads(plan: Plan, checkpoints: Sequence[Any], limit: int = FIRST_READS) -> int:
    """Hint the reads of `plan`'s first work units, in order, up to `limit` bytes; returns the
    bytes hinted."""
    total = 0
    for unit in plan.units:
        for ti, r0, r1 in unit.pieces:
            t = plan.tensors[ti]
            for i, src in enumerate(t.sources_used):
                hint = getattr(checkpoints[src], "prefetch_rows", None)
                if hint is None:
                    continue
                try:
                    total += int(hint(t.read_name(i), r0, r1))
                except OSError:  # a hint only: the read itself reports any real problem
                    continue
                if total >= limit:
                    return total
    return total
