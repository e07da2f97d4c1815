"""The read -> compute -> write pipeline that runs a sequence of jobs in one process.

A prefetch thread reads the next job's rows of every input (one exact byte range per input,
in parallel) into one of two read buffers while the calling thread computes the current job;
results go into one of two output buffers, which a writer thread writes at their planned
offsets while a hashing thread takes the sha256 of each tensor in row order (both release the
GIL, so a chunk costs max(write, hash), not their sum). Memory is the plan's buffers (see
`Plan.peak_bytes`), plus what the storage libraries hold while a read or write is in flight.

The local executor runs every job of a plan through one pipeline; a Dask task runs one unit's
jobs, given the statistics computed by earlier tasks, and hands back partial statistics.
`pma update` runs its plan through one pipeline with a `ChunkKernel` (engine/running.py) in
place of the method: each chunk's average goes to the output, its new sums to the state.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.engine.buffers import BufferPool, Cancelled, PoolCache
from moemerge.engine.cadence import Cadence, Tally
from moemerge.engine.device import placement, to_host
from moemerge.engine.compute import ALIGN, ChunkView, apply_into, copy_equal, scratch_2d, segments, typed_views
from moemerge.engine.finite import check_finite, first_read
from moemerge.engine.fused_fp8 import FUSED_BAND, FusedChunk, FusedFP8, chunk_fits, dequantize_sources, fused_for
from moemerge.io.quant_out import parts_bytes, quantize_bands
from moemerge.engine.jobs import Job, Piece, Ready, Segment, Stage, Written, plan_jobs, whole_pieces
from moemerge.engine.requant import requantize
from moemerge.engine.progress import NullProgress, Progress
from moemerge.io.dtypes import to_torch
from moemerge.methods import get_method
from moemerge.methods.base import Method, StatPass
from moemerge.engine.constants import BLOCK_ELEMS
from moemerge.planner.plan import Plan, TensorPlan

__all__ = ["run_jobs", "JobsResult", "EMPTY_SHA256", "Writer", "RowReader", "ChunkKernel"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


_T = TypeVar("_T")


class Writer(Protocol):
    def write_rows(self, name: str, row_start: int, data: memoryview) -> None: ...


class RowReader(Protocol):
    """What the read-ahead needs of an input: rows of a tensor into a buffer (a `Checkpoint`)."""

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None: ...


class ChunkKernel(Protocol):
    """Computes the float tensors' chunks instead of the plan's method (pma update's running
    sums): fills one output buffer with any number of segments.

    `raws` are typed views of every source's rows in `t.sources_used` order; `slabs` the
    plan's `working_copies` compute buffers of `BLOCK_ELEMS` elements of the compute dtype.
    """

    def out_bytes(self, t: TensorPlan, rows: int) -> int:
        """Output buffer bytes for a chunk of `rows` rows of `t`."""
        ...

    def fill(self, t: TensorPlan, r0: int, r1: int, raws: list[torch.Tensor], slabs: list[torch.Tensor],
             out: torch.Tensor) -> list[Segment]:
        """Compute rows [r0, r1) of `t` into the byte buffer `out`; return what to write."""
        ...


class _NaNSum(Exception):
    """A fused band's sum has a NaN: the chunk takes the method's own path (`_fill_fused`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Requant:
    """A filled output buffer of a quantized tensor's merged float32 rows, handed to the writer
    thread, which requantizes them (engine/requant.py) before writing: the compute loop goes on
    with the next chunk meanwhile (the buffer is the writer's until it is written)."""

    t: TensorPlan
    r0: int
    r1: int
    nbytes: int
    buf: torch.Tensor
    first: bool
    last: bool

    def written(self) -> Written:
        segs = tuple(Segment(name=n, row=r, offset=o, nbytes=b)
                     for n, r, o, b in requantize(self.t, self.r0, self.r1, self.buf, self.nbytes))
        return Written(segments=segs, buf=self.buf, first=self.first, last=self.last)


@dataclass(slots=True)
class JobsResult:
    digests: dict[str, str] = field(default_factory=dict)
    """sha256 of every tensor whose rows were all written, in order, by this run."""
    partials: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    """(tensor index, pass) -> partial results left unreduced (`reduce=False`), folded."""


def fold_partial(sp: StatPass, acc: list[Any], part: Any) -> None:
    """Add one chunk's (or one task's) partial to `acc`, in order: folded when the pass can."""
    if sp.combine is not None and acc:
        acc[0] = sp.combine(acc[0], part)
    else:
        acc.append(part)


def _buffer_needs(plan: Plan, method: Method, pieces: list[Piece],
                  kernel: ChunkKernel | None = None) -> tuple[int, int, int]:
    """(read, write, compute elements) buffer sizes for these pieces: the plan's at most.

    A Dask task of small tensors needs far less than the plan's largest chunk; allocating (and
    touching) only that keeps per-task overhead proportional to the task.
    """
    need_in = need_out = need_elems = 0
    for p in pieces:
        t = plan.tensors[p.ti]
        rows = min(t.rows_per_chunk, p.r1 - p.r0) if len(t.chunks) > 1 else t.rows
        need_in = max(need_in, sum(n for _, n in segments(t, 0, rows)))
        computed = kernel is not None and t.method != "copy"
        need_out = max(need_out, kernel.out_bytes(t, rows) if computed else t.out_bytes(rows))  # type: ignore[union-attr]
        need_elems = max(need_elems, rows * t.row_len if t.method != "copy" else 0)
    if method.elementwise or kernel is not None:
        need_elems = min(need_elems, BLOCK_ELEMS)
    return (min(need_in, plan.chunk_in_bytes), min(need_out, plan.chunk_out_bytes),
            min(need_elems, plan.chunk_elems))


def run_jobs(
    plan: Plan,
    checkpoints: Sequence[RowReader],
    writer: Writer | None,
    *,
    pieces: Iterable[Piece] | None = None,
    stage: Stage = "full",
    stats_in: Mapping[int, dict[str, Any]] | None = None,
    reduce: bool = True,
    progress: Progress | NullProgress | None = None,
    device: str = "cpu",
    in_cast: str | None = None,
    io_threads: int = 8,
    pools: PoolCache | None = None,
    on_written: Callable[[dict[str, str]], None] | None = None,
    written_every: int | Cadence = 1 << 30,
    kernel: ChunkKernel | None = None,
    aux_writer: Writer | None = None,
    title: str | None = None,
) -> JobsResult:
    """Run the jobs of `pieces` (all tensors by default) for `stage`; see `JobsResult`.

    `stats_in` gives tensors' statistics computed elsewhere (apply-only stages). With
    `reduce=False`, a pass's partials are returned instead of reduced at the tensor's end.
    `pools` keeps the buffers for the next run in this process (Dask workers).
    `on_written(digests)` is called from the writer thread with the tensors finished since its
    last call, as often as `written_every` says (a `Cadence`; an int: output bytes) and at the
    end (the resume journal).

    `kernel` computes the float tensors instead of the plan's method (no passes); the
    segments it marks `aux` go to `aux_writer`, unhashed. `title` names the run on the
    progress bar.
    """
    piece_list = list(pieces) if pieces is not None else whole_pieces(plan)
    return _Pipeline(plan, checkpoints, writer, piece_list, stage=stage, stats_in=stats_in, reduce=reduce,
                     progress=progress or NullProgress(), device=device, in_cast=in_cast, io_threads=io_threads,
                     pools=pools, on_written=on_written, written_every=written_every, kernel=kernel,
                     aux_writer=aux_writer, title=title).run()


class _Pipeline:
    """One `run_jobs`: its buffers, queues and threads, and the calling thread's compute loop."""

    def __init__(self, plan: Plan, checkpoints: Sequence[RowReader], writer: Writer | None,
                 pieces: list[Piece], *, stage: Stage, stats_in: Mapping[int, dict[str, Any]] | None,
                 reduce: bool, progress: Progress | NullProgress, device: str, in_cast: str | None,
                 io_threads: int, pools: PoolCache | None, on_written: Callable[[dict[str, str]], None] | None,
                 written_every: int | Cadence, kernel: ChunkKernel | None = None, aux_writer: Writer | None = None,
                 title: str | None = None) -> None:
        self.plan, self.checkpoints, self.writer, self.pieces = plan, checkpoints, writer, pieces
        self.kernel, self.aux_writer, self.title = kernel, aux_writer, title
        self.method = get_method(plan.method)
        self.stage, self.reduce, self.progress, self.device = stage, reduce, progress, device
        self.cast = to_torch(in_cast) if in_cast else None
        self.pools, self.on_written, self.cadence = pools, on_written, Cadence.of(written_every)
        self.result = JobsResult()
        if kernel is not None and stage not in ("full", "apply"):
            raise ValueError(f"a chunk kernel runs apply jobs (stage 'full' or 'apply'), not pass {stage!r}")
        need_in, need_out, need_elems = _buffer_needs(plan, self.method, pieces, kernel)
        comp_bytes = 8 if any(t.compute_dtype == "F64" for t in plan.tensors) else 4
        # storage buffers on the host, compute buffers on the device; a chunk kernel (pma
        # update's numpy sums) runs on the host (engine/device.py)
        self.place = placement(device if kernel is None else "cpu")
        host, dev = self.place.host_kind, self.place.device
        self.in_pool = self._take("read", 2, need_in + ALIGN * len(plan.sources), host)
        self.out_pool = self._take("write", 2, need_out, host)
        self.slab_pool = self._take("compute", plan.working_copies, need_elems * comp_bytes + 8, dev)
        self.slabs = [self.slab_pool.acquire() for _ in range(plan.working_copies)]
        # one chunk's inputs and output on the device, copied from and to the host buffers
        self.stage_pools = ([self._take("read-device", 1, need_in + ALIGN * len(plan.sources), dev),
                             self._take("write-device", 1, need_out, dev)] if self.place.staged else [])
        self.staged = [pool.acquire() for pool in self.stage_pools]
        self.stop = threading.Event()
        self.ready: queue.Queue[Ready | None] = queue.Queue(maxsize=2)  # None: no more
        self.writes: queue.Queue[Written | _Requant | None] = queue.Queue(maxsize=2)
        self.writing = threading.Event()  # set while the writer thread handles a buffer
        self.errors: list[BaseException] = []
        self.readers = ThreadPoolExecutor(max_workers=max(1, min(io_threads, len(plan.sources))),
                                          thread_name_prefix="moemerge-read")
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemerge-hash")
        # auxiliary segments (pma update's new sums: Zarr chunks, compressed) are written in
        # parallel with each other and with the output, as they cost more CPU than it does
        self.aux_pool = (ThreadPoolExecutor(max_workers=4, thread_name_prefix="moemerge-aux")
                         if aux_writer is not None else None)
        self.stats: dict[int, dict[str, Any]] = {ti: dict(s) for ti, s in (stats_in or {}).items()}
        self.reduced = threading.Condition()  # (tensor, pass) reduced so far, for `_skip_pass`
        self.reduced_keys: set[tuple[int, int]] = set()
        self.skips: dict[tuple[int, int], bool] = {}
        # weighted sums of block-FP8 inputs read as stored and summed from their codes
        # (engine/fused_fp8.py), by tensor index; decided once, from either thread (same answer)
        self.fused: dict[int, FusedFP8 | None] = {}
        self.helper: ThreadPoolExecutor | None = None  # `_fill_fused`'s second thread
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def _fused(self, job: Job) -> FusedFP8 | None:
        """The fused plan of this job's tensor when the job's chunk takes that path, else None."""
        if self.kernel is not None or self.place.staged or job.kind == "pass":
            return None
        if job.ti in self.fused:
            f = self.fused[job.ti]
        else:
            f = self.fused[job.ti] = fused_for(self.method, self.plan.tensors[job.ti], self.checkpoints, self.cast)
        return f if f is not None and chunk_fits(f, job.r0, job.r1) else None

    def _take(self, name: str, count: int, nbytes: int, kind: str) -> BufferPool:
        if self.pools is not None:
            return self.pools.take(name, count, nbytes, kind)
        return BufferPool(count, nbytes, name, device=kind)

    # -- the read-ahead thread ---------------------------------------------------------------

    def _read(self, job: Job, buf: torch.Tensor) -> None:
        t = self.plan.tensors[job.ti]
        mv = buf.numpy().data
        stored = self._fused(job) is not None  # codes and scales, summed as they are decoded
        futs = [
            self.readers.submit(getattr(self.checkpoints[src], "read_stored" if stored else "read_rows"),
                                t.read_name(i), job.r0, job.r1, mv[off:off + n])
            for i, (src, (off, n)) in enumerate(zip(t.sources_used, segments(t, job.r0, job.r1)))
        ]
        for f in futs:
            f.result()

    def _skip_pass(self, job: Job) -> bool:
        """Whether a streamed pass can go unread: asks the pass, once the earlier ones are reduced."""
        if job.kind != "pass" or job.k == 0 or not self.reduce:
            return False
        t = self.plan.tensors[job.ti]
        sp = self.method.passes(t.params, t.shape)[job.k]
        if sp.needed is None:
            return False
        key = (job.ti, job.k)
        if key not in self.skips:
            with self.reduced:  # the calling thread reduces pass k-1 when it takes that pass's last chunk
                while (job.ti, job.k - 1) not in self.reduced_keys:
                    if self.stop.is_set():
                        raise Cancelled()
                    self.reduced.wait(0.1)
            self.skips[key] = not sp.needed(self.stats[job.ti])
        return self.skips[key]

    def _prefetch(self) -> None:
        try:
            for piece in self.pieces:
                for job in plan_jobs(self.plan, self.method, [piece], self.stage):
                    buf = None
                    if not self._skip_pass(job):
                        buf = self.in_pool.acquire(self.stop)
                        self._read(job, buf)
                    while not self.stop.is_set():
                        try:
                            self.ready.put(Ready(job=job, buf=buf), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self.stop.is_set():
                        return
            self.ready.put(None)
        except Cancelled:
            return
        except BaseException as e:  # handed to the calling thread, which raises it
            self.errors.append(e)
            self.ready.put(None)

    # -- the writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:
        hashes: dict[str, Any] = {}
        finished: dict[str, str] = {}  # since the last `on_written`
        tally = Tally(self.cadence)

        def report() -> None:
            if self.on_written is not None and finished:
                self.on_written(dict(finished))
            finished.clear()
            tally.reset()

        while True:
            try:
                item = self.writes.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if item is None:
                try:
                    if not self.stop.is_set():
                        report()
                except BaseException as e:
                    self.errors.append(e)
                    self.stop.set()
                return
            aux: list[Future[None]] = []
            buf = item.buf
            self.writing.set()
            try:
                if isinstance(item, _Requant):
                    if self.stop.is_set():
                        continue  # (the buffer goes back below)
                    item = item.written()
                data = item.buf.numpy().data
                if self.aux_pool is not None and self.aux_writer is not None and not self.stop.is_set():
                    aux = [self.aux_pool.submit(self.aux_writer.write_rows, seg.name, seg.row,
                                                data[seg.offset:seg.offset + seg.nbytes])
                           for seg in item.segments if seg.aux]
                # a tensor may have several segments in one buffer, in row order (the halves of
                # a split chunk, engine `_fill_fused`): its hash starts at the first, ends at the last
                last_of = {seg.name: i for i, seg in enumerate(item.segments)}
                started: set[str] = set()
                for i, seg in enumerate(item.segments):
                    if self.stop.is_set():
                        break
                    if seg.aux:  # not part of the output: written elsewhere (above), not hashed
                        continue
                    mv = data[seg.offset:seg.offset + seg.nbytes]
                    if item.first and seg.name not in started:
                        started.add(seg.name)
                        hashes[seg.name] = hashlib.sha256()
                    h = hashes.get(seg.name)
                    pending: Future[None] | None = self.hasher.submit(h.update, mv) if h is not None else None
                    if self.writer is not None:
                        self.writer.write_rows(seg.name, seg.row, mv)
                    if pending is not None:
                        pending.result()
                    tally.add(seg.nbytes, tensors=0)
                    if item.last and h is not None and last_of[seg.name] == i:
                        self.result.digests[seg.name] = finished[seg.name] = hashes.pop(seg.name).hexdigest()
                        if tally.add(0):  # one more finished tensor
                            report()
                for f in aux:
                    f.result()
            except BaseException as e:
                self.errors.append(e)
                self.stop.set()
            finally:
                for f in aux:  # they read the buffer: it is free only once they are done
                    f.exception()
                self.writing.clear()
                self.out_pool.release(buf)

    def _emit(self, job: Job, fill: Callable[[torch.Tensor], int | list[Segment]]) -> None:
        """Fill an output buffer and queue it for writing. `fill` returns the bytes it wrote
        (the tensor's rows; a quantized tensor's values are requantized into its parts first,
        engine/requant.py) or the segments to write (a chunk kernel's)."""
        t = self.plan.tensors[job.ti]
        out = self.out_pool.acquire(self.stop)
        item: Written | _Requant
        try:
            filled = fill(out)
            if isinstance(filled, list):
                item = Written(segments=tuple(filled), buf=out, first=job.r0 == 0, last=job.last)
            elif t.quant is None:
                item = Written(segments=(Segment(name=t.name, row=job.r0, offset=0, nbytes=filled),), buf=out,
                               first=job.r0 == 0, last=job.last)
            else:  # requantized by the writer thread, beside the next chunk's merge
                item = _Requant(t=t, r0=job.r0, r1=job.r1, nbytes=filled, buf=out, first=job.r0 == 0, last=job.last)
                if self.writing.is_set():
                    # the writer still writes the other buffer (a light merge, such as a
                    # weighted sum, outruns it): requantizing here uses the time this thread
                    # would wait for it
                    item = item.written()
        except BaseException:
            self.out_pool.release(out)
            raise
        while True:
            if self.stop.is_set():
                raise Cancelled()
            try:
                self.writes.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- the calling thread ------------------------------------------------------------------

    def _compute(self, job: Job, buf: torch.Tensor | None) -> None:
        """One job: a statistics pass's partial, the apply, or a copy; then hand it to the writer."""
        plan, method = self.plan, self.method
        t = plan.tensors[job.ti]
        if buf is None:  # a pass its earlier passes made unnecessary: nothing was read
            sp = method.passes(t.params, t.shape)[job.k]
            self.stats.setdefault(job.ti, {})[sp.name] = sp.when_skipped
            if job.last:  # a later pass may ask whether it is needed once this one is settled
                with self.reduced:
                    self.reduced_keys.add((job.ti, job.k))
                    self.reduced.notify_all()
            return
        fused = self._fused(job)
        if fused is not None:  # read as stored (`_read`): summed from the codes
            self._emit(job, lambda out: self._fill_fused(fused, job, buf, out))
            if job.last:
                self.stats.pop(job.ti, None)
            return
        raws = typed_views(t, buf, job.r0, job.r1)
        if t.method == "copy":
            raw = copy_equal(t, raws, plan)

            def fill_copy(out: torch.Tensor) -> int:
                out[:raw.numel()].copy_(raw)
                return raw.numel()

            self._emit(job, fill_copy)
            return
        if self.kernel is not None:
            kernel = self.kernel
            self._emit(job, lambda out: kernel.fill(t, job.r0, job.r1, raws, self.slabs, out))
            return
        if first_read(method, t, job.kind, job.k):  # NaN/Inf: statistics methods refuse (finite.py)
            check_finite(plan, method, t, raws, job.r0, job.r1)
        if self.place.staged:  # the math runs on the device (engine/device.py)
            raws = self._to_device(t, buf, job.r0, job.r1)
        comp = to_torch(t.compute_dtype)
        st = self.stats.setdefault(job.ti, {})
        if job.kind in ("pass", "all"):
            chunk = ChunkView(t, [r.view(job.r1 - job.r0, t.row_len) for r in raws],
                              scratch_2d(self.slabs, comp, job.r0, job.r1, t), job.r0, job.r1, comp, self.cast)
            passes = method.passes(t.params, t.shape)
            for k in (range(len(passes)) if job.kind == "all" else [job.k]):
                acc = self.result.partials.setdefault((job.ti, k), [])
                fold_partial(passes[k], acc, passes[k].map(chunk, st, t.params))
                if job.last and (self.reduce or job.kind == "all"):
                    st[passes[k].name] = passes[k].reduce(self.result.partials.pop((job.ti, k)))
                    with self.reduced:
                        self.reduced_keys.add((job.ti, k))
                        self.reduced.notify_all()
            if job.kind == "pass":
                return
        self._emit(job, self._via_device(lambda out: apply_into(method, t, job.r0, job.r1, raws, self.slabs, comp,
                                                                self.cast, st, out)))
        if job.last:
            self.stats.pop(job.ti, None)

    def _fill_fused(self, f: FusedFP8, job: Job, buf: torch.Tensor, out: torch.Tensor) -> int | list[Segment]:
        """A weighted sum's chunk from its inputs' codes into `out`; a quantized output's bands
        are requantized as soon as they are summed (into a cache-sized scratch at the start of
        `out`), so its float32 values never go to memory. A big chunk is split in two at a
        scale-block row, the first half summed (and requantized) on a helper thread while this
        one does the second: the loops are compiled and release the GIL, and the read and write
        threads leave the second core mostly idle. Where a result is NaN, the inputs are
        dequantized in place and the method's own path computes the chunk (torch's NaNs)."""
        t = self.plan.tensors[job.ti]
        r0, r1 = job.r0, job.r1
        nbytes = (r1 - r0) * t.row_len * to_torch(t.out_dtype).itemsize
        chunk = FusedChunk(f, t, buf, r0, r1)
        if t.quant is None:
            typed = out[:nbytes].view(to_torch(t.out_dtype))
            m = self._split_row(t, r0, r1, chunk.row_block, None)
            if m is None:
                done = chunk.sum_into(r0, r1, typed)
            else:
                lo, hi = self._halves(partial(chunk.sum_into, r0, m, typed),
                                      partial(chunk.sum_into, m, r1, typed[(m - r0) * t.row_len:]))
                done = lo and hi
            if done:
                return nbytes
        else:
            q = t.quant
            band_rows = FUSED_BAND // max(1, t.row_len)

            def bands(a: int, b: int, scratch: int, size: int, at: int) -> list[Segment]:
                values = out[scratch:scratch + size // 4 * 4].view(torch.float32)

                def band(x: int, y: int) -> torch.Tensor:
                    if not chunk.sum_into(x, y, values):
                        raise _NaNSum()
                    return values[:(y - x) * t.row_len].view(y - x, t.row_len)

                segs = quantize_bands(q, band, a, b, out, at, band_rows=band_rows)
                return [Segment(name=n, row=r, offset=o, nbytes=nb) for n, r, o, nb in segs]

            m = self._split_row(t, r0, r1, q.spec.row_align, nbytes)
            try:
                if m is None:
                    return bands(r0, r1, 0, nbytes, nbytes)
                # two scratches in the values' room: the helper's first, then this thread's
                half = nbytes // 2 // 64 * 64
                head, tail = self._halves(partial(bands, r0, m, 0, half, nbytes),
                                          partial(bands, m, r1, half, nbytes - half, nbytes + parts_bytes(q, r0, m)))
                return [*head, *tail]
            except _NaNSum:
                pass
        dequantize_sources(f, t, buf, r0, r1)
        raws = typed_views(t, buf, r0, r1)
        return apply_into(self.method, t, r0, r1, raws, self.slabs, to_torch(t.compute_dtype), self.cast,
                          self.stats.setdefault(job.ti, {}), out)

    def _split_row(self, t: TensorPlan, r0: int, r1: int, align: int, scratch: int | None) -> int | None:
        """Where `_fill_fused` splits rows [r0, r1) between two threads (a multiple of `align`
        rows after r0), or None: one core, or a chunk under two bands, or (`scratch`: the bytes
        a quantized output has for its float32 bands) no room for two whole aligned bands."""
        if self.cores < 2 or (r1 - r0) * t.row_len < 2 * FUSED_BAND:
            return None
        align = max(1, align)
        band = max(align, FUSED_BAND // max(1, t.row_len) // align * align)
        if scratch is not None and scratch < 2 * band * t.row_len * 4 + 128:
            return None
        m = r0 + -(-((r1 - r0) // 2) // align) * align
        return m if r0 < m < r1 else None

    def _halves(self, first: Callable[[], _T], second: Callable[[], _T]) -> tuple[_T, _T]:
        """`first()` on the helper thread (made on first use) while this one runs `second()`;
        both results, or the first failure (the second's if both fail, e.g. _NaNSum). The
        helper's half is always finished before this returns: it writes into the chunk's buffer."""
        if self.helper is None:
            self.helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemerge-half")
        lo = self.helper.submit(first)
        try:
            hi = second()
        finally:
            wait([lo])
        return lo.result(), hi

    def _to_device(self, t: TensorPlan, buf: torch.Tensor, r0: int, r1: int) -> list[torch.Tensor]:
        """A chunk's typed views in the device's read buffer, copied from the host's `buf`.
        Waits for the copy: `buf` goes back to the read-ahead when the job is done, and every
        kernel of the chunk would wait for it anyway."""
        dev_in = self.staged[0]
        segs = segments(t, r0, r1)
        used = segs[-1][0] + segs[-1][1] if segs else 0
        dev_in[:used].copy_(buf[:used], non_blocking=True)  # pinned host memory: a DMA copy
        self.place.synchronize()
        return typed_views(t, dev_in, r0, r1)

    def _via_device(self, fill: Callable[[torch.Tensor], int]) -> Callable[[torch.Tensor], int]:
        """`fill` as `_emit` wants it: on a staged run it fills the device's write buffer,
        whose bytes are then copied into the host's, synchronized before the writer reads them."""
        if not self.place.staged:
            return fill
        dev_out, place = self.staged[1], self.place

        def staged(out: torch.Tensor) -> int:
            n = fill(dev_out)
            out[:n].copy_(dev_out[:n], non_blocking=True)
            place.synchronize()
            return n

        return staged

    def run(self) -> JobsResult:
        plan = self.plan
        if self.stage in ("full", "apply"):
            for p in self.pieces:
                t = plan.tensors[p.ti]
                if (t.rows == 0 or t.numel == 0) and p.r0 == 0:
                    self.result.digests[t.name] = EMPTY_SHA256
        # Elementwise math is memory-bound: a second torch thread only competes with the read
        # and write threads' kernel copies on small machines (and spin-waits when they hold
        # the CPU).
        threads_before = torch.get_num_threads()
        if self.method.elementwise or self.kernel is not None:
            torch.set_num_threads(1)
        if self.method.elementwise and self.kernel is None and not self.place.staged:
            # a big weighted sum loads its compiled loop meanwhile (methods/_fused.py)
            from moemerge.methods._fused import preload_weighted

            preload_weighted(self.method.name, plan.bytes_read)
        reader = threading.Thread(target=self._prefetch, name="moemerge-prefetch", daemon=True)
        writer = threading.Thread(target=self._write_loop, name="moemerge-write", daemon=True)
        self.progress.start(plan.bytes_read, self.title or f"{plan.method} -> {len(plan.shards)} shard(s)")
        reader.start()
        writer.start()
        errors = self.errors
        try:
            while True:
                try:
                    item = self.ready.get(timeout=0.1)
                except queue.Empty:
                    # a pipeline thread that failed (or was cancelled) hands nothing more over
                    if errors:
                        raise errors[0] from None
                    if not reader.is_alive() and self.ready.empty():
                        raise RuntimeError("moemerge internal error: the read-ahead thread stopped early")
                    continue
                if item is None or errors:
                    break
                job, buf = item.job, item.buf
                try:
                    self._compute(job, buf)
                finally:
                    if buf is not None:
                        self.in_pool.release(buf)
                    t = plan.tensors[job.ti]
                    self.progress.advance(sum(n for _, n in segments(t, job.r0, job.r1)))
            if errors:
                raise errors[0]
            self.writes.put(None)
            writer.join()
            if errors:
                raise errors[0]
            if self.place.staged:  # partials left unreduced go to another process (Dask)
                self.result.partials = {k: to_host(v) for k, v in self.result.partials.items()}
            if self.pools is not None:  # every buffer is back: the next run may take them
                for sl in self.slabs:
                    self.slab_pool.release(sl)
                for spool, sbuf in zip(self.stage_pools, self.staged):
                    spool.release(sbuf)
                for pool in (self.in_pool, self.out_pool, self.slab_pool, *self.stage_pools):
                    self.pools.give(pool)
            return self.result
        except BaseException as e:
            self.stop.set()
            if errors and errors[0] is not e:  # a pipeline thread failed first: its error is the cause
                raise errors[0] from None
            raise
        finally:
            self.stop.set()
            try:
                self.writes.put_nowait(None)
            except queue.Full:
                pass
            reader.join(timeout=30)
            writer.join(timeout=30)
            self.readers.shutdown(wait=True)
            self.hasher.shutdown(wait=True)
            if self.helper is not None:
                self.helper.shutdown(wait=True)
            if self.aux_pool is not None:
                self.aux_pool.shutdown(wait=True)
            torch.set_num_threads(threads_before)
            self.progress.stop()
