"""The local executor: one process; reads prefetched on threads, writes on a thread.

Pipeline: a prefetch thread reads the next job's rows of every input (one exact byte range
per input, in parallel) into one of two read buffers while the main thread computes the
current job; results are converted into one of two output buffers and handed to a writer
thread that writes them at their planned offsets and hashes each tensor in row order.
Memory is the plan's buffers and nothing else: see `Plan.peak_bytes`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from moemerge.engine.buffers import BufferPool, Cancelled
from moemerge.engine.progress import NullProgress, Progress
from moemerge.errors import MergeRuntimeError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import itemsize, to_torch
from moemerge.methods import get_method
from moemerge.methods.base import Method
from moemerge.planner.build import BLOCK_ELEMS
from moemerge.planner.plan import Plan, TensorPlan

__all__ = ["run_local", "ALIGN"]

#: Each input's bytes start at a multiple of this in a read buffer, so that typed views
#: (`uint8 -> bfloat16/float32/float64`) are aligned.
ALIGN = 64


class Writer(Protocol):
    def write_rows(self, name: str, row_start: int, data: memoryview) -> None: ...


@dataclass(frozen=True, slots=True)
class _Job:
    ti: int
    kind: Literal["pass", "apply", "all"]
    k: int
    r0: int
    r1: int
    last: bool


def _jobs(plan: Plan, method: Method) -> Iterator[_Job]:
    for ti, t in enumerate(plan.tensors):
        chunks = t.chunks
        n = len(chunks)
        passes = method.passes(t.params, t.shape) if t.method != "copy" else ()
        if passes and n == 1:  # fits: read once, run every pass in memory
            yield _Job(ti, "all", 0, 0, t.rows, True)
            continue
        for k in range(len(passes)):
            for c, (r0, r1) in enumerate(chunks):
                yield _Job(ti, "pass", k, r0, r1, c == n - 1)
        for c, (r0, r1) in enumerate(chunks):
            yield _Job(ti, "apply", 0, r0, r1, c == n - 1)


def _segments(t: TensorPlan, r0: int, r1: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of each source's rows in a read buffer, aligned."""
    out = []
    pos = 0
    for dt in t.in_dtypes:
        n = (r1 - r0) * t.row_len * itemsize(dt)
        out.append((pos, n))
        pos += -(-n // ALIGN) * ALIGN
    return out


class _ChunkView:
    """The `Chunk` the methods see: typed views of the read buffer, converted on demand."""

    def __init__(
        self, t: TensorPlan, raws: Sequence[torch.Tensor], scratch: Sequence[torch.Tensor],
        r0: int, r1: int, compute: torch.dtype, in_cast: torch.dtype | None,
    ) -> None:
        self.name = t.name
        self.shape = t.shape
        self.row_start = r0
        self.row_stop = r1
        self.row_len = t.row_len
        self.n_inputs = len(t.inputs)
        self.compute_dtype = compute
        self._has_base = self.has_base = t.base is not None
        self._raws = raws
        self._scratch = scratch
        self._in_cast = in_cast

    def _convert(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self._in_cast is not None and x.dtype != self._in_cast:
            x = x.to(self._in_cast)  # MergeKit's `dtype`: inputs are cast to it when read
        if out is None:
            return x.to(self.compute_dtype, copy=True)
        out.copy_(x)
        return out

    def input(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._convert(self._raws[i + (1 if self._has_base else 0)], out)

    def base(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self._has_base:
            raise RuntimeError(f"tensor `{self.name}`: this method has no base model")
        return self._convert(self._raws[0], out)

    def scratch(self, k: int) -> torch.Tensor:
        return self._scratch[k]


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
    """Run every tensor of `plan`; return each tensor's sha256 (of its output bytes)."""
    method = get_method(plan.method)
    progress = progress or NullProgress()
    cast = to_torch(in_cast) if in_cast else None
    n_src = len(plan.sources)
    in_pool = BufferPool(2, plan.chunk_in_bytes + ALIGN * n_src, "read")
    out_pool = BufferPool(2, plan.chunk_out_bytes, "write")
    comp_bytes = 8 if any(t.compute_dtype == "F64" for t in plan.tensors) else 4
    slabs = [
        torch.zeros(plan.chunk_elems * comp_bytes + 8, dtype=torch.uint8, device=device)
        for _ in range(plan.working_copies)
    ]
    stop = threading.Event()
    ready: queue.Queue[Any] = queue.Queue(maxsize=2)
    writes: queue.Queue[Any] = queue.Queue(maxsize=2)
    digests: dict[str, str] = {}
    errors: list[BaseException] = []
    readers = ThreadPoolExecutor(max_workers=max(1, min(io_threads, n_src)), thread_name_prefix="moemerge-read")

    def read_job(job: _Job, buf: torch.Tensor) -> None:
        t = plan.tensors[job.ti]
        mv = memoryview(buf.numpy())
        futs = [
            readers.submit(checkpoints[src].read_rows, t.name, job.r0, job.r1, mv[off:off + n])
            for src, (off, n) in zip(t.sources_used, _segments(t, job.r0, job.r1))
        ]
        for f in futs:
            f.result()

    def prefetch() -> None:
        try:
            for job in _jobs(plan, method):
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
        hashers: dict[str, Any] = {}
        while True:
            try:
                item = writes.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is None:
                return
            t, r0, nbytes, buf, last = item
            try:
                if not stop.is_set():
                    mv = memoryview(buf.numpy())[:nbytes]
                    writer.write_rows(t.name, r0, mv)
                    h = hashers.setdefault(t.name, hashlib.sha256())
                    h.update(mv)
                    if last:
                        digests[t.name] = hashers.pop(t.name).hexdigest()
            except BaseException as e:
                errors.append(e)
                stop.set()
            finally:
                out_pool.release(buf)

    reader_thread = threading.Thread(target=prefetch, name="moemerge-prefetch", daemon=True)
    writer_thread = threading.Thread(target=write_loop, name="moemerge-write", daemon=True)
    progress.start(plan.bytes_read, f"{plan.method} -> {len(plan.shards)} shard(s)")
    reader_thread.start()
    writer_thread.start()
    stats: dict[str, Any] = {}
    partials: list[Any] = []
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
            if item is None:
                break
            if errors:
                break
            job, buf = item
            try:
                t = plan.tensors[job.ti]
                _check_writer(errors)
                raws = _typed_views(t, buf, job)
                if t.method == "copy":
                    result_raw = _copy_equal(t, raws, plan)
                    _emit_raw(t, job, result_raw, out_pool, writes, stop)
                else:
                    comp = to_torch(t.compute_dtype)
                    if job.kind in ("pass", "all"):
                        chunk = _ChunkView(t, [r.view(job.r1 - job.r0, t.row_len) for r in raws],
                                           _scratch_2d(slabs, comp, job, t), job.r0, job.r1, comp, cast)
                        passes = method.passes(t.params, t.shape)
                        todo = range(len(passes)) if job.kind == "all" else [job.k]
                        for k in todo:
                            if job.kind == "all" or job.r0 == 0:
                                partials = []
                            part = passes[k].map(chunk, stats, t.params)
                            fold = passes[k].combine
                            if fold is not None and partials:  # keep one running partial
                                partials[0] = fold(partials[0], part)
                            else:
                                partials.append(part)
                            if job.last:
                                stats[passes[k].name] = passes[k].reduce(partials)
                        if job.kind == "pass":
                            continue
                    _apply(method, t, job, raws, slabs, comp, cast, stats, out_pool, writes, stop)
                    if job.last:
                        stats = {}
            finally:
                in_pool.release(buf)
                progress.advance(sum(n for _, n in _segments(t, job.r0, job.r1)))
        if errors:
            raise errors[0]
        writes.put(None)
        writer_thread.join()
        if errors:
            raise errors[0]
        for t in plan.tensors:
            if t.rows == 0 or t.numel == 0:
                digests[t.name] = hashlib.sha256(b"").hexdigest()
        return digests
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
        progress.stop()


def _check_writer(errors: list[BaseException]) -> None:
    if errors:
        raise errors[0]


def _typed_views(t: TensorPlan, buf: torch.Tensor, job: _Job) -> list[torch.Tensor]:
    out = []
    for (off, n), dt in zip(_segments(t, job.r0, job.r1), t.in_dtypes):
        out.append(buf[off:off + n].view(to_torch(dt)))
    return out


def _scratch_2d(slabs: list[torch.Tensor], comp: torch.dtype, job: _Job, t: TensorPlan) -> list[torch.Tensor]:
    n = (job.r1 - job.r0) * t.row_len
    return [s.view(comp)[:n].view(job.r1 - job.r0, t.row_len) for s in slabs] if n else []


def _copy_equal(t: TensorPlan, raws: list[torch.Tensor], plan: Plan) -> torch.Tensor:
    """Non-floating tensors are copied when equal in every input (methods.md), else an error."""
    first = raws[0].view(torch.uint8)
    for src, r in zip(t.sources_used[1:], raws[1:]):
        if not torch.equal(first, r.view(torch.uint8)):
            raise MergeRuntimeError(
                f"tensor `{t.name}` ({t.out_dtype}) differs between {plan.sources[t.sources_used[0]]} "
                f"and {plan.sources[src]}; integer tensors are copied and must be identical in every input"
            )
    return first


def _put(writes: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise Cancelled()
        try:
            writes.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _emit_raw(t: TensorPlan, job: _Job, raw: torch.Tensor, out_pool: BufferPool,
              writes: queue.Queue[Any], stop: threading.Event) -> None:
    out = out_pool.acquire(stop)
    n = raw.numel()
    out[:n].copy_(raw)
    _put(writes, (t, job.r0, n, out, job.last), stop)


def _apply(method: Method, t: TensorPlan, job: _Job, raws: list[torch.Tensor], slabs: list[torch.Tensor],
           comp: torch.dtype, cast: torch.dtype | None, stats: dict[str, Any], out_pool: BufferPool,
           writes: queue.Queue[Any], stop: threading.Event) -> None:
    rows = job.r1 - job.r0
    n = rows * t.row_len
    out = out_pool.acquire(stop)
    nbytes = n * itemsize(t.out_dtype)
    try:
        typed_out = out[:nbytes].view(to_torch(t.out_dtype))
        if method.elementwise:
            for s in range(0, n, BLOCK_ELEMS):
                e = min(n, s + BLOCK_ELEMS)
                chunk = _ChunkView(t, [r[s:e] for r in raws], [sl.view(comp)[:e - s] for sl in slabs],
                                   job.r0, job.r1, comp, cast)
                typed_out[s:e].copy_(method.apply(chunk, stats, t.params).reshape(-1))
        elif n:
            chunk = _ChunkView(t, [r.view(rows, t.row_len) for r in raws], _scratch_2d(slabs, comp, job, t),
                               job.r0, job.r1, comp, cast)
            typed_out.copy_(method.apply(chunk, stats, t.params).reshape(-1))
    except BaseException:
        out_pool.release(out)
        raise
    _put(writes, (t, job.r0, nbytes, out, job.last), stop)
