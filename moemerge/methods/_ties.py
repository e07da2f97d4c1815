"""Where a selection's tie-break cut falls: the row holding the last tied value taken.

"The q largest, ties broken by lowest flat index" keeps every value above the threshold and
the first `take_equal` values equal to it in flat (row) order. Which rows keep their tied
values is known either from per-row counts of tied values over the whole tensor (a pass of
its own), or from per-chunk counts (collected with the selection's histograms, so no pass of
their own): then the chunk holding the cut counts its own rows when it is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moemerge.methods.stats import Threshold

__all__ = ["ChunkTies", "tie_cut", "ALL_ROWS"]

#: A cut row after every row: every tied value of the chunk is taken.
ALL_ROWS = 1 << 62


@dataclass(frozen=True, slots=True)
class ChunkTies:
    """Tied values per chunk: `before[k]` of them lie in the tensor's rows before `rows[k]`.

    `rows` are the chunk boundaries, ascending from 0 to the tensor's row count; an apply
    chunk must start and end on them (the engine applies the chunks it mapped)."""

    rows: np.ndarray
    before: np.ndarray

    def at(self, row: int) -> int:
        k = int(np.searchsorted(self.rows, row, side="left"))
        if k >= self.rows.size or int(self.rows[k]) != row:
            raise RuntimeError(f"selection tie counts have no chunk boundary at row {row} "
                               f"(boundaries {self.rows[:8].tolist()}...): the apply chunks differ from "
                               "the statistics chunks; this is a bug, please report it")
        return int(self.before[k])


def tie_cut(thr: Threshold, ties: Any, row_start: int, row_stop: int,
            row_counts: Callable[[], np.ndarray]) -> tuple[int, int]:
    """(cut row, tied values taken in it) for rows [row_start, row_stop) of a threshold that
    needs a tie-break (0 < take_equal < equal): rows before the cut keep all their tied values,
    rows after it none. A cut of -1 (before the chunk) or `ALL_ROWS` (after it) says the
    chunk takes none or all of its tied values.

    `ties`: per-row prefix counts over the tensor (`prefix[r]` tied values in rows before r),
    or `ChunkTies`. `row_counts()`: this chunk's per-row counts, asked for only when the
    cut falls inside the chunk and only per-chunk counts are known.
    """
    take = thr.take_equal
    if isinstance(ties, ChunkTies):
        before, after = ties.at(row_start), ties.at(row_stop)
        if take <= before:
            return -1, 0
        if take >= after:
            return ALL_ROWS, 0
        counts = np.asarray(row_counts(), np.int64)
        prefix = before + np.concatenate(([0], np.cumsum(counts)))
        if counts.size != row_stop - row_start or int(prefix[-1]) != after:
            raise RuntimeError(f"rows {row_start}..{row_stop} hold {int(prefix[-1]) - before} values tied at the "
                               f"threshold, the statistics counted {after - before}: this is a bug, please report it")
        local = int(np.searchsorted(prefix, take, side="left")) - 1  # prefix[local] < take <= prefix[local+1]
        return row_start + local, take - int(prefix[local])
    if ties is None:
        raise RuntimeError("a selection needs a tie-break but no tie counts were collected: this is a bug")
    cut = int(np.searchsorted(ties, take, side="left")) - 1  # ties[cut] < take <= ties[cut+1]
    return cut, take - int(ties[cut])
