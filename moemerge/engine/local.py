"""The local executor: the whole plan through one read -> compute -> write pipeline."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from moemerge.engine.cadence import Cadence
from moemerge.engine.jobs import whole_pieces
from moemerge.engine.pipeline import Writer, run_jobs
from moemerge.engine.progress import NullProgress, Progress
from moemerge.io.checkpoint import Checkpoint
from moemerge.planner.plan import Plan

__all__ = ["run_local"]


def run_local(
    plan: Plan,
    checkpoints: Sequence[Checkpoint],
    writer: Writer,
    *,
    progress: Progress | NullProgress | None = None,
    device: str = "cpu",
    in_cast: str | None = None,
    io_threads: int = 8,
    skip: Collection[str] = (),
    on_written: Callable[[dict[str, str]], None] | None = None,
    written_every: int | Cadence = 1 << 30,
) -> dict[str, str]:
    """Run every tensor of `plan` but those in `skip`, in order; return each one's sha256.

    `on_written` hears of finished tensors as often as `written_every` says (a `Cadence`; an
    int: output bytes; see `run_jobs`): the resume journal.
    """
    # a quantized tensor is done when every stored part of it is
    pieces = [p for p in whole_pieces(plan) if not all(n in skip for n, *_ in plan.tensors[p.ti].stored())]
    return run_jobs(plan, checkpoints, writer, pieces=pieces, progress=progress, device=device, in_cast=in_cast,
                    io_threads=io_threads, on_written=on_written, written_every=written_every).digests
