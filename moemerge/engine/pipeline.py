"""The read -> compute -> write pipeline that runs a sequence of jobs in one process.

A prefetch thread reads the next job's rows of every input (one exact byte range per input,
in parallel) into one of two read buffers while the calling thread computes the current job;
results go into one of two output buffers, which a writer thread writes at their planned
offsets while a hashing thread takes the sha256 of each tensor in row order (both release the
GIL, so a chunk costs max(write, hash), not their sum). Memory is the plan's buffers and
nothing else: see `Plan.peak_bytes`.

The local executor runs every job of a plan through one pipeline; a Dask task runs one unit's
jobs, given the statistics computed by earlier tasks, and hands back partial statistics.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moemerge.engine.buffers import BufferPool, Cancelled, PoolCache
from moemerge.engine.compute import ALIGN, ChunkView, apply_into, copy_equal, scratch_2d, segments, typed_views
from moemerge.engine.jobs import Job, Stage, plan_jobs
from moemerge.engine.progress import NullProgress, Progress
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import itemsize, to_torch
from moemerge.methods import get_method
from moemerge.methods.base import Method
from moemerge.planner.build import BLOCK_ELEMS
from moemerge.planner.plan import Plan

__all__ = ["run_jobs", "JobsResult", "EMPTY_SHA256"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Writer(Protocol):
    def write_rows(self, name: str, row_start: int, data: memoryview) -> None: ...


@dataclass(slots=True)
class JobsResult:
    digests: dict[str, str] = field(default_factory=dict)
    """sha256 of every tensor whose rows were all written, in order, by this run."""
    partials: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    """(tensor index, pass) -> partial results left unreduced (`reduce=False`), folded."""


def fold_partial(method: Method, plan: Plan, ti: int, k: int, acc: list[Any], part: Any) -> None:
    """Add one chunk's (or one task's) partial to `acc`, in order: folded when the pass can."""
    t = plan.tensors[ti]
    combine = method.passes(t.params, t.shape)[k].combine
    if combine is not None and acc:
        acc[0] = combine(acc[0], part)
    else:
        acc.append(part)


def _buffer_needs(plan: Plan, method: Method, pieces: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(read, write, compute elements) buffer sizes for these pieces: the plan's at most.

    A Dask task of small tensors needs far less than the plan's largest chunk; allocating (and
    touching) only that keeps per-task overhead proportional to the task.
    """
    need_in = need_out = need_elems = 0
    for ti, r0, r1 in pieces:
        t = plan.tensors[ti]
        rows = min(t.rows_per_chunk, r1 - r0) if len(t.chunks) > 1 else t.rows
        need_in = max(need_in, sum(n for _, n in segments(t, 0, rows)))
        need_out = max(need_out, rows * t.row_len * itemsize(t.out_dtype))
        need_elems = max(need_elems, rows * t.row_len if t.method != "copy" else 0)
    if method.elementwise:
        need_elems = min(need_elems, BLOCK_ELEMS)
    return (min(need_in, plan.chunk_in_bytes), min(need_out, plan.chunk_out_bytes),
            min(need_elems, plan.chunk_elems))


def run_jobs(
    plan: Plan,
    checkpoints: Sequence[Checkpoint],
    writer: Writer | None,
    *,
    pieces: Iterable[tuple[int, int, int]] | None = None,
    stage: Stage = "full",
    stats_in: Mapping[int, dict[str, Any]] | None = None,
    reduce: bool = True,
    progress: Progress | NullProgress | None = None,
    device: str = "cpu",
    in_cast: str | None = None,
    io_threads: int = 8,
    pools: PoolCache | None = None,
    on_written: Callable[[dict[str, str]], None] | None = None,
    written_every: int = 1 << 30,
) -> JobsResult:
    """Run the jobs of `pieces` (all tensors by default) for `stage`; see `JobsResult`.

    `stats_in` gives tensors' statistics computed elsewhere (apply-only stages). With
    `reduce=False`, a pass's partials are returned instead of reduced at the tensor's end.
    `pools` keeps the buffers for the next run in this process (Dask workers).
    `on_written(digests)` is called from the writer thread with the tensors finished since its
    last call, about every `written_every` bytes and at the end (the resume journal).
    """
    method = get_method(plan.method)
    progress = progress or NullProgress()
    cast = to_torch(in_cast) if in_cast else None
    piece_list = list(pieces) if pieces is not None else [(ti, 0, t.rows) for ti, t in enumerate(plan.tensors)]
    result = JobsResult()
    if stage in ("full", "apply"):
        for ti, r0, _ in piece_list:
            t = plan.tensors[ti]
            if (t.rows == 0 or t.numel == 0) and r0 == 0:
                result.digests[t.name] = EMPTY_SHA256
    n_src = len(plan.sources)
    need_in, need_out, need_elems = _buffer_needs(plan, method, piece_list)

    def take(name: str, count: int, nbytes: int, device: str = "cpu") -> BufferPool:
        if pools is not None:
            return pools.take(name, count, nbytes, device)
        return BufferPool(count, nbytes, name, device=device)

    in_pool = take("read", 2, need_in + ALIGN * n_src)
    out_pool = take("write", 2, need_out)
    comp_bytes = 8 if any(t.compute_dtype == "F64" for t in plan.tensors) else 4
    slab_pool = take("compute", plan.working_copies, need_elems * comp_bytes + 8, device=device)
    slabs = [slab_pool.acquire() for _ in range(plan.working_copies)]
    stop = threading.Event()
    ready: queue.Queue[Any] = queue.Queue(maxsize=2)
    writes: queue.Queue[Any] = queue.Queue(maxsize=2)
    errors: list[BaseException] = []
    readers = ThreadPoolExecutor(max_workers=max(1, min(io_threads, n_src)), thread_name_prefix="moemerge-read")
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemerge-hash")
    # Elementwise math is memory-bound: a second torch thread only competes with the read and
    # write threads' kernel copies on small machines (and spin-waits when they hold the CPU).
    threads_before = torch.get_num_threads()
    if method.elementwise:
        torch.set_num_threads(1)

    def read_job(job: Job, buf: torch.Tensor) -> None:
        t = plan.tensors[job.ti]
        mv = memoryview(buf.numpy())
        futs = [
            readers.submit(checkpoints[src].read_rows, t.name, job.r0, job.r1, mv[off:off + n])
            for src, (off, n) in zip(t.sources_used, segments(t, job.r0, job.r1))
        ]
        for f in futs:
            f.result()

    def skip_pass(job: Job) -> bool:
        """Whether a streamed pass can go unread: asks the pass, once the earlier ones are reduced."""
        if job.kind != "pass" or job.k == 0 or not reduce:
            return False
        t = plan.tensors[job.ti]
        sp = method.passes(t.params, t.shape)[job.k]
        if sp.needed is None:
            return False
        key = (job.ti, job.k)
        if key not in skips:
            with reduced:  # the calling thread reduces pass k-1 when it takes that pass's last chunk
                while (job.ti, job.k - 1) not in reduced_keys:
                    if stop.is_set():
                        raise Cancelled()
                    reduced.wait(0.1)
            skips[key] = not sp.needed(stats[job.ti])
        return skips[key]

    def prefetch() -> None:
        try:
            for ti, r0, r1 in piece_list:
                for job in plan_jobs(plan, method, [(ti, r0, r1)], stage):
                    buf = None
                    if not skip_pass(job):
                        buf = in_pool.acquire(stop)
                        read_job(job, buf)
                    while not stop.is_set():
                        try:
                            ready.put((job, buf), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            ready.put(None)
        except Cancelled:
            return
        except BaseException as e:  # handed to the main thread, which raises it
            errors.append(e)
            ready.put(None)

    def write_loop() -> None:
        hashes: dict[str, Any] = {}
        finished: dict[str, str] = {}
        since = 0

        def report() -> None:
            nonlocal since
            if on_written is not None and finished:
                on_written(dict(finished))
            finished.clear()
            since = 0

        while True:
            try:
                item = writes.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is None:
                try:
                    if not stop.is_set():
                        report()
                except BaseException as e:
                    errors.append(e)
                    stop.set()
                return
            name, r0, nbytes, buf, first, last = item
            try:
                if not stop.is_set():
                    mv = memoryview(buf.numpy())[:nbytes]
                    if first:
                        hashes[name] = hashlib.sha256()
                    h = hashes.get(name)
                    pending: Future[None] | None = hasher.submit(h.update, mv) if h is not None else None
                    if writer is not None:
                        writer.write_rows(name, r0, mv)
                    if pending is not None:
                        pending.result()
                    since += nbytes
                    if last and h is not None:
                        result.digests[name] = finished[name] = hashes.pop(name).hexdigest()
                        if since >= written_every:
                            report()
            except BaseException as e:
                errors.append(e)
                stop.set()
            finally:
                out_pool.release(buf)

    def emit(job: Job, fill: Any) -> None:
        out = out_pool.acquire(stop)
        try:
            nbytes = fill(out)
        except BaseException:
            out_pool.release(out)
            raise
        item = (plan.tensors[job.ti].name, job.r0, nbytes, out, job.r0 == 0, job.last)
        while True:
            if stop.is_set():
                raise Cancelled()
            try:
                writes.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    stats: dict[int, dict[str, Any]] = {ti: dict(s) for ti, s in (stats_in or {}).items()}
    reduced = threading.Condition()
    reduced_keys: set[tuple[int, int]] = set()
    skips: dict[tuple[int, int], bool] = {}
    reader_thread = threading.Thread(target=prefetch, name="moemerge-prefetch", daemon=True)
    writer_thread = threading.Thread(target=write_loop, name="moemerge-write", daemon=True)
    progress.start(plan.bytes_read, f"{plan.method} -> {len(plan.shards)} shard(s)")
    reader_thread.start()
    writer_thread.start()
    partials = result.partials
    try:
        while True:
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                # a pipeline thread that failed (or was cancelled) hands nothing more over
                if errors:
                    raise errors[0] from None
                if not reader_thread.is_alive() and ready.empty():
                    raise RuntimeError("moemerge internal error: the read-ahead thread stopped early")
                continue
            if item is None or errors:
                break
            job, buf = item
            t = plan.tensors[job.ti]
            try:
                if buf is None:  # a pass its earlier passes made unnecessary: nothing was read
                    sp = method.passes(t.params, t.shape)[job.k]
                    stats.setdefault(job.ti, {})[sp.name] = sp.when_skipped
                    continue
                raws = typed_views(t, buf, job.r0, job.r1)
                if t.method == "copy":
                    raw = copy_equal(t, raws, plan)

                    def fill_copy(out: torch.Tensor, raw: torch.Tensor = raw) -> int:
                        out[:raw.numel()].copy_(raw)
                        return raw.numel()

                    emit(job, fill_copy)
                    continue
                comp = to_torch(t.compute_dtype)
                st = stats.setdefault(job.ti, {})
                if job.kind in ("pass", "all"):
                    chunk = ChunkView(t, [r.view(job.r1 - job.r0, t.row_len) for r in raws],
                                      scratch_2d(slabs, comp, job.r0, job.r1, t), job.r0, job.r1, comp, cast)
                    passes = method.passes(t.params, t.shape)
                    for k in (range(len(passes)) if job.kind == "all" else [job.k]):
                        acc = partials.setdefault((job.ti, k), [])
                        fold_partial(method, plan, job.ti, k, acc, passes[k].map(chunk, st, t.params))
                        if job.last and (reduce or job.kind == "all"):
                            st[passes[k].name] = passes[k].reduce(partials.pop((job.ti, k)))
                            with reduced:
                                reduced_keys.add((job.ti, k))
                                reduced.notify_all()
                    if job.kind == "pass":
                        continue
                emit(job, lambda out: apply_into(method, t, job.r0, job.r1, raws, slabs, comp, cast, st, out))
                if job.last:
                    stats.pop(job.ti, None)
            finally:
                if buf is not None:
                    in_pool.release(buf)
                progress.advance(sum(n for _, n in segments(t, job.r0, job.r1)))
        if errors:
            raise errors[0]
        writes.put(None)
        writer_thread.join()
        if errors:
            raise errors[0]
        if pools is not None:  # every buffer is back: the next run may take them
            for sl in slabs:
                slab_pool.release(sl)
            for pool in (in_pool, out_pool, slab_pool):
                pools.give(pool)
        return result
    except BaseException as e:
        stop.set()
        if errors and errors[0] is not e:  # a pipeline thread failed first: its error is the cause
            raise errors[0] from None
        raise
    finally:
        stop.set()
        try:
            writes.put_nowait(None)
        except queue.Full:
            pass
        reader_thread.join(timeout=30)
        writer_thread.join(timeout=30)
        readers.shutdown(wait=True)
        hasher.shutdown(wait=True)
        torch.set_num_threads(threads_before)
        progress.stop()
