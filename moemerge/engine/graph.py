"""A plan as a graph of distributable tasks (pure: no cluster needed to build or test it).

- `unit`: a work unit of whole tensors: every pass and the apply, in one task, as the local
  executor does them (small tensors are grouped into one unit).
- A tensor split over several units (bigger than a unit) becomes, per statistics pass, one
  `map` task per piece and one `reduce` task (which folds the pieces' partials in row order),
  then one `apply` task per piece given the reduced statistics, and a `hash` task that takes the
  sha256 of the tensor's written bytes once every piece is written.
- `shard` (object-storage safetensors output): every tensor of one output shard in one task,
  because a shard is one multipart upload streamed in file order by one process.

Only keys, row ranges and small statistics flow along the edges; tensor data never does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from moemerge.engine.jobs import Piece, as_pieces, n_passes
from moemerge.io.dtypes import itemsize
from moemerge.methods import get_method
from moemerge.planner.plan import Plan

__all__ = ["Task", "build_graph", "graph_summary"]

TaskKind = Literal["unit", "map", "reduce", "apply", "hash", "shard"]


@dataclass(frozen=True, slots=True)
class Task:
    key: str
    kind: TaskKind
    pieces: tuple[Piece, ...] = ()
    """Row ranges the task reads."""
    deps: tuple[str, ...] = ()
    """Keys whose results this task takes, in order."""
    ti: int = -1
    k: int = -1
    """Statistics pass of `map` / `reduce` tasks."""
    in_bytes: int = 0
    """Input bytes the task reads (progress)."""
    shard: str | None = None
    """The output shard a `shard` task streams."""


def _piece_bytes(plan: Plan, piece: Piece) -> int:
    t = plan.tensors[piece.ti]
    return (piece.r1 - piece.r0) * t.row_len * sum(itemsize(d) for d in t.in_dtypes)


def _full_bytes(plan: Plan, pieces: tuple[Piece, ...]) -> int:
    """Bytes a `unit`/`shard` task reads: a multi-chunk tensor is read once per pass, then applied."""
    method = get_method(plan.method)
    total = 0
    for p in pieces:
        t = plan.tensors[p.ti]
        reads = 1 + n_passes(t, method) if len(t.chunks) > 1 else 1
        total += reads * _piece_bytes(plan, p)
    return total


def build_graph(plan: Plan, *, by_shard: bool = False, prefix: str = "moemerge",
                skip: Collection[int] = ()) -> list[Task]:
    """The tasks of `plan`, dependencies first, leaving out tensors `skip` (indices: done
    already). `prefix` makes keys unique per run."""
    method = get_method(plan.method)
    tasks: list[Task] = []
    if by_shard:
        by_file: dict[str, list[Piece]] = defaultdict(list)
        for ti, t in sorted(enumerate(plan.tensors), key=lambda it: (it[1].out_file, it[1].out_offset)):
            by_file[t.out_file].append(Piece(ti=ti, r0=0, r1=t.rows))
        for s in plan.shards:
            pieces = tuple(p for p in by_file.get(s.file, ()) if p.ti not in skip)
            tasks.append(Task(f"{prefix}-shard-{s.file}", "shard", pieces, in_bytes=_full_bytes(plan, pieces),
                              shard=s.file))
        return tasks
    split: dict[int, list[Piece]] = defaultdict(list)
    for u, unit in enumerate(plan.units):
        pieces = tuple(p for p in as_pieces(unit.pieces) if p.ti not in skip)
        if not pieces:
            continue
        whole = all(p.r0 == 0 and p.r1 == plan.tensors[p.ti].rows for p in pieces)
        if whole:
            tasks.append(Task(f"{prefix}-unit-{u}", "unit", pieces, in_bytes=_full_bytes(plan, pieces)))
        else:
            (piece,) = pieces  # the planner gives a split tensor's pieces units of their own
            split[piece.ti].append(piece)
    for ti, parts in split.items():
        t = plan.tensors[ti]
        stats_key: tuple[str, ...] = ()
        for k in range(n_passes(t, method)):
            maps = [Task(f"{prefix}-map-{ti}-{k}-{p.r0}", "map", (p,), stats_key, ti, k, _piece_bytes(plan, p))
                    for p in parts]
            tasks.extend(maps)
            reduce = Task(f"{prefix}-reduce-{ti}-{k}", "reduce", (), stats_key + tuple(m.key for m in maps), ti, k)
            tasks.append(reduce)
            stats_key = (reduce.key,)
        applies = [Task(f"{prefix}-apply-{ti}-{p.r0}", "apply", (p,), stats_key, ti, in_bytes=_piece_bytes(plan, p))
                   for p in parts]
        tasks.extend(applies)
        tasks.append(Task(f"{prefix}-hash-{ti}", "hash", (), tuple(a.key for a in applies), ti))
    return tasks


def graph_summary(tasks: list[Task]) -> dict[str, int]:
    """Task counts by kind, and the total: what `moemerge plan --workers N` reports."""
    out: dict[str, int] = defaultdict(int)
    for t in tasks:
        out[t.kind] += 1
    return {"tasks": len(tasks), **dict(sorted(out.items()))}
