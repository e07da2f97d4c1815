"""What the engine does to a tensor, as a sequence of jobs over its row-chunks.

A job reads one chunk (rows r0..r1 of every input of one tensor) and either maps a statistics
pass over it (`pass`), applies the method (`apply`), or, when the whole tensor is one chunk,
runs every pass and the apply on the one read (`all`). Both executors run these same jobs:
the local executor all of them in order, the Dask executor a unit's worth per task.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from moemerge.methods.base import Method
from moemerge.planner.plan import Plan, TensorPlan

__all__ = ["Job", "Stage", "tensor_jobs", "plan_jobs", "n_passes"]

Stage = Literal["full", "apply"] | int
"""Which jobs of a piece: `full` (passes then apply), `apply` only, or pass `k` only."""


@dataclass(frozen=True, slots=True)
class Job:
    ti: int
    kind: Literal["pass", "apply", "all"]
    k: int
    r0: int
    r1: int
    last: bool
    """The tensor's last chunk (a pass's statistics are complete after it)."""


def n_passes(t: TensorPlan, method: Method) -> int:
    return len(method.passes(t.params, t.shape)) if t.method != "copy" else 0


def tensor_jobs(t: TensorPlan, ti: int, method: Method, r0: int = 0, r1: int | None = None,
                stage: Stage = "full") -> Iterator[Job]:
    """The jobs of rows [r0, r1) of tensor `t` (the whole tensor by default) for `stage`."""
    r1 = t.rows if r1 is None else r1
    chunks = [(a, b) for a, b in t.chunks if a >= r0 and b <= r1]
    last_row = t.rows
    npass = n_passes(t, method)
    if stage == "full" and npass and len(t.chunks) == 1:  # fits: read once, every pass in memory
        yield Job(ti, "all", 0, 0, t.rows, True)
        return
    if stage == "full":
        for k in range(npass):
            for a, b in chunks:
                yield Job(ti, "pass", k, a, b, b == last_row)
    elif isinstance(stage, int):
        for a, b in chunks:
            yield Job(ti, "pass", stage, a, b, b == last_row)
        return
    for a, b in chunks:
        yield Job(ti, "apply", 0, a, b, b == last_row)


def plan_jobs(plan: Plan, method: Method, pieces: Iterable[tuple[int, int, int]] | None = None,
              stage: Stage = "full") -> Iterator[Job]:
    """Jobs of every piece `(tensor index, r0, r1)`; all tensors, whole, by default."""
    if pieces is None:
        pieces = ((ti, 0, t.rows) for ti, t in enumerate(plan.tensors))
    for ti, r0, r1 in pieces:
        yield from tensor_jobs(plan.tensors[ti], ti, method, r0, r1, stage)
