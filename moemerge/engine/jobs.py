"""What the engine does to a tensor, as a sequence of jobs over its row-chunks, and the small
records that pass between the pipeline's threads (pieces, jobs, read and written buffers).

A job reads one chunk (rows r0..r1 of every input of one tensor) and either maps a statistics
pass over it (`pass`), applies the method (`apply`), or, when the whole tensor is one chunk,
runs every pass and the apply on the one read (`all`). Both executors run these same jobs:
the local executor all of them in order, the Dask executor a unit's worth per task.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from moemerge.methods.base import Method
from moemerge.planner.plan import Plan, TensorPlan

if TYPE_CHECKING:
    import torch

__all__ = ["Piece", "Job", "Segment", "Ready", "Written", "Stage", "tensor_jobs", "plan_jobs", "n_passes",
           "as_pieces", "whole_pieces"]

Stage = Literal["full", "apply"] | int
"""Which jobs of a piece: `full` (passes then apply), `apply` only, or pass `k` only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Piece:
    """Rows [r0, r1) of the plan's tensor `ti`: what a run (a Dask task) is given to do."""

    ti: int
    r0: int
    r1: int


def as_pieces(pieces: Iterable[tuple[int, int, int]]) -> tuple[Piece, ...]:
    """The planner's `(tensor index, r0, r1)` row ranges (`WorkUnit.pieces`) as pieces."""
    return tuple(Piece(ti=ti, r0=r0, r1=r1) for ti, r0, r1 in pieces)


def whole_pieces(plan: Plan) -> list[Piece]:
    """Every tensor of `plan`, whole, in plan order."""
    return [Piece(ti=ti, r0=0, r1=t.rows) for ti, t in enumerate(plan.tensors)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One read of one chunk and what to do with it."""

    ti: int
    kind: Literal["pass", "apply", "all"]
    k: int
    """Statistics pass of a `pass` job."""
    r0: int
    r1: int
    last: bool
    """The tensor's last chunk (a pass's statistics are complete after it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """A job and its read buffer, handed from the read-ahead thread to the compute loop;
    `buf` is None for a pass its earlier passes made unnecessary (nothing was read)."""

    job: Job
    buf: torch.Tensor | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """`nbytes` of an output buffer from `offset`, to be written as rows from `row` of `name`."""

    name: str
    row: int
    offset: int
    nbytes: int
    aux: bool = False
    """Goes to the run's auxiliary writer, unhashed (pma update's new state chunks)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    """A filled output buffer handed from the compute loop to the writer thread: its segments
    (one, or a quantized tensor's parts, or pma update's average and state chunks)."""

    segments: tuple[Segment, ...]
    buf: torch.Tensor
    first: bool
    """Holds the tensor's first rows (its hash starts here)."""
    last: bool
    """Holds the tensor's last rows (its hash is complete after it)."""


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
        yield Job(ti=ti, kind="all", k=0, r0=0, r1=t.rows, last=True)
        return
    if stage == "full":
        for k in range(npass):
            for a, b in chunks:
                yield Job(ti=ti, kind="pass", k=k, r0=a, r1=b, last=b == last_row)
    elif isinstance(stage, int):
        for a, b in chunks:
            yield Job(ti=ti, kind="pass", k=stage, r0=a, r1=b, last=b == last_row)
        return
    for a, b in chunks:
        yield Job(ti=ti, kind="apply", k=0, r0=a, r1=b, last=b == last_row)


def plan_jobs(plan: Plan, method: Method, pieces: Iterable[Piece] | None = None,
              stage: Stage = "full") -> Iterator[Job]:
    """Jobs of every piece; all tensors, whole, by default."""
    for p in whole_pieces(plan) if pieces is None else pieces:
        yield from tensor_jobs(plan.tensors[p.ti], p.ti, method, p.r0, p.r1, stage)
