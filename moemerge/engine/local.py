"""The local executor: the whole plan through one read -> compute -> write pipeline."""

from __future__ import annotations

from collections.abc import Sequence

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
) -> dict[str, str]:
    """Run every tensor of `plan`, in order; return each tensor's sha256 (of its output bytes)."""
    return run_jobs(plan, checkpoints, writer, progress=progress, device=device, in_cast=in_cast,
                    io_threads=io_threads).digests
