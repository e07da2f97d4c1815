"""The Dask executor: the plan's tasks (`engine.graph`) on a LocalCluster or an existing cluster.

The client plans, lays out the output and, once every task succeeded, writes the index and
the manifest (the commit). Workers open the inputs and the output themselves and move tensor
data only between storage and their own buffers; through the scheduler pass the plan (once,
broadcast), row ranges, small statistics partials and checksums. A task on a worker that dies
is recomputed elsewhere (Dask reschedules it; our writes are positional, so a repeat writes the
same bytes); a task that fails with an error fails the run with that error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moemerge.engine.buffers import PoolCache
from moemerge.engine.cadence import Cadence, Tally
from moemerge.engine.graph import Task, build_graph
from moemerge.engine.jobs import Piece
from moemerge.engine.pipeline import ChunkKernel, JobsResult, fold_partial, run_jobs
from moemerge.engine.progress import NullProgress, Progress
from moemerge.errors import ConfigError, MergeRuntimeError, MoemergeError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import itemsize
from moemerge.io.zarr_writer import ZarrArraySpec
from moemerge.methods import get_method
from moemerge.planner.plan import Plan

__all__ = ["OutputTarget", "AuxTarget", "run_dask", "start_client", "worker_memory_limit"]

_log = logging.getLogger(__name__)

#: Room above the buffer budget for a worker's interpreter, torch and Dask itself.
WORKER_OVERHEAD = 1 << 30
#: Dask pauses a worker at 80% of its memory limit: our buffers must stay well below that.
_PAUSE_FRACTION = 0.75


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """How a worker opens the output: the client `prepare`d it; workers only write rows."""

    kind: Literal["local", "zarr", "remote", "dcp"]
    url: str
    storage_options: dict[str, Any] | None = None
    flush_each_task: bool = False
    """fsync a local output after each task: workers on other machines (a shared filesystem)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuxTarget:
    """A second store the tasks write (pma update's new state version): a Zarr group the client
    prepared; workers write its chunks and hand back their checksums, which the client records."""

    url: str
    arrays: tuple[ZarrArraySpec, ...]
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TaskContext:
    run_id: str
    opener: Callable[[], Sequence[Checkpoint]]
    """Opens the plan's sources, in plan order (the same code the client used)."""
    target: OutputTarget
    device: str
    in_cast: str | None
    kernel: ChunkKernel | None = None
    """Computes the float tensors instead of the plan's method (`run_jobs`)."""
    aux: AuxTarget | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskResult:
    """What a task that writes hands back: its tensors' sha256 (whole tensors only) and the
    checksums of the auxiliary chunks it stored."""

    digests: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)


def worker_memory_limit(memory_budget: int) -> int:
    """Dask's per-worker memory limit for a buffer budget: the budget stays under the pause line."""
    return int((memory_budget + WORKER_OVERHEAD) / _PAUSE_FRACTION)


#: The LocalCluster's scheduler, workers and dashboard listen on loopback only: the dashboard has
#: no authentication and shows task and worker data (`--dashboard ADDRESS` opts in to more).
LOOPBACK = "127.0.0.1"
DEFAULT_DASHBOARD = f"{LOOPBACK}:0"


def parse_dashboard(value: str | None) -> str | None:
    """`--dashboard`: None (loopback, any free port), `off` (no dashboard), or HOST:PORT / :PORT.

    Example: parse_dashboard(None) == "127.0.0.1:0"; parse_dashboard("off") is None.
    """
    if value is None:
        return DEFAULT_DASHBOARD
    v = value.strip()
    if v.lower() in ("off", "none", "no", "false"):
        return None
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--dashboard {value!r}: expected HOST:PORT (e.g. 127.0.0.1:8787, 0.0.0.0:8787 to "
                          "serve the network, unauthenticated) or `off`")
    return f"{host or LOOPBACK}:{int(port)}"


def start_client(*, workers: int | None, scheduler: str | None, memory_budget: int,
                 dashboard: str | None = None) -> tuple[Any, Any]:
    """(client, cluster or None): joins `scheduler`, or starts a LocalCluster of `workers` processes.

    The LocalCluster listens on 127.0.0.1 only; its dashboard too unless `dashboard` says
    otherwise (`parse_dashboard`).
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="10s"), None  # type: ignore[no-untyped-call]
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({e}); "
                              "check the address and that the scheduler is running") from e
    n = int(workers or 1)
    if n < 1:
        raise ConfigError(f"--workers: must be at least 1, got {n}")
    threads = str(max(1, (os.cpu_count() or 1) // n))
    dash = parse_dashboard(dashboard)
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=n, threads_per_worker=1, processes=True, memory_limit=worker_memory_limit(memory_budget),
        silence_logs=logging.ERROR, host=LOOPBACK,
        # `off`: no dashboard; the scheduler's remaining HTTP routes (health) stay on loopback
        dashboard_address=dash or DEFAULT_DASHBOARD, scheduler_kwargs={"dashboard": dash is not None},
        # math threads per worker: the cores shared out, not every worker taking them all
        env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    )
    return Client(cluster), cluster  # type: ignore[no-untyped-call]


# -- worker side ------------------------------------------------------------------------------

_RUNS: dict[str, tuple[Sequence[Checkpoint], Any]] = {}
_RUNS_LOCK = threading.Lock()
#: A worker's buffers, kept from task to task of a run (released with the run).
_POOLS = PoolCache()


def _open_target(target: OutputTarget, plan: Plan) -> Any:
    if target.kind == "remote":
        return None  # object-storage shards: one writer per shard task
    from moemerge.io.output import OutputTarget as Where, attach_writer

    return attach_writer(Where(kind=target.kind, url=target.url, storage_options=target.storage_options), plan)


def _opened(ctx: TaskContext, plan: Plan) -> tuple[Sequence[Checkpoint], Any]:
    """This worker's open inputs and output for the run (opened by its first task)."""
    with _RUNS_LOCK:
        got = _RUNS.get(ctx.run_id)
        if got is None:
            ckpts = ctx.opener()
            try:
                got = _RUNS[ctx.run_id] = (ckpts, _open_target(ctx.target, plan))
            except BaseException:
                for c in ckpts:
                    c.close()
                raise
        return got


def _release(run_id: str) -> None:
    """Close what a run opened on this worker (the client calls it on every worker at the end)."""
    with _RUNS_LOCK:
        got = _RUNS.pop(run_id, None)
    _POOLS.clear()
    if got is not None:
        ckpts, writer = got
        for c in ckpts:
            c.close()
        if writer is not None:
            writer.close()


def _device(device: str) -> str:
    if device != "cuda":
        return device
    import torch

    try:  # one GPU per worker: the worker's number picks it
        from distributed import get_worker

        name = get_worker().name
        idx = int(name) if isinstance(name, int) or str(name).isdigit() else 0
    except (ValueError, ImportError):
        idx = 0
    return f"cuda:{idx % max(1, torch.cuda.device_count())}"


def _jobs(ctx: TaskContext, plan: Plan, writer: Any, pieces: Sequence[Piece],
          **kw: Any) -> tuple[JobsResult, dict[str, str]]:
    """Run `pieces` here; the result, and the checksums of the auxiliary chunks written."""
    ckpts, _ = _opened(ctx, plan)
    aux = None
    if ctx.aux is not None:  # one writer per task: it records the checksums of this task's chunks
        from moemerge.io.zarr_writer import ZarrModelWriter

        aux = ZarrModelWriter.attach(ctx.aux.url, list(ctx.aux.arrays), storage_options=ctx.aux.storage_options,
                                     checksums=True)
    try:
        res = run_jobs(plan, ckpts, writer, pieces=pieces, device=_device(ctx.device), in_cast=ctx.in_cast,
                       pools=_POOLS, kernel=ctx.kernel, aux_writer=aux, **kw)
        if ctx.target.flush_each_task and writer is not None and hasattr(writer, "flush"):
            writer.flush()  # another machine (the client) commits: our bytes must be on disk
        return res, dict(aux.recorded or {}) if aux is not None else {}
    finally:
        if aux is not None:
            aux.close()


def _t_full(ctx: TaskContext, plan: Plan, pieces: tuple[Piece, ...], shard: str | None) -> TaskResult:
    """A unit (or shard) of whole tensors, every pass and the apply: their checksums."""
    if ctx.target.kind != "remote":
        res, sums = _jobs(ctx, plan, _opened(ctx, plan)[1], pieces)
        return TaskResult(digests=res.digests, checksums=sums)
    from moemerge.io.s3_writer import RemoteModelWriter

    w = RemoteModelWriter.attach(ctx.target.url, plan.shards, plan.placements(),
                                 storage_options=ctx.target.storage_options)
    try:
        res, sums = _jobs(ctx, plan, w, pieces)
        assert shard is not None
        w.complete(shard)
        return TaskResult(digests=res.digests, checksums=sums)
    except BaseException:
        w.close()  # aborts this shard's upload; the task's retry starts a fresh one
        raise


#: What a map task returns for a pass its earlier passes made unnecessary (nothing was read).
SKIPPED = "moemerge:pass-skipped"


def _t_map(ctx: TaskContext, plan: Plan, pieces: tuple[Piece, ...], ti: int, k: int,
           stats: dict[str, Any] | None) -> list[Any]:
    t = plan.tensors[ti]
    sp = get_method(plan.method).passes(t.params, t.shape)[k]
    if k > 0 and sp.needed is not None and not sp.needed(stats or {}):
        return [SKIPPED]
    res, _ = _jobs(ctx, plan, None, pieces, stage=k, stats_in={ti: stats or {}}, reduce=False)
    return res.partials.get((ti, k), [])


def _t_reduce(plan: Plan, ti: int, k: int, stats: dict[str, Any] | None, parts: list[list[Any]]) -> dict[str, Any]:
    """Fold the pieces' partials in row order, as the local executor folds its chunks'."""
    method = get_method(plan.method)
    t = plan.tensors[ti]
    sp = method.passes(t.params, t.shape)[k]
    if any(len(part) == 1 and isinstance(part[0], str) and part[0] == SKIPPED for part in parts):
        # every map task decided alike, from the same statistics
        return {**(stats or {}), sp.name: sp.when_skipped}
    acc: list[Any] = []
    for part in parts:
        for p in part:
            fold_partial(sp, acc, p)
    return {**(stats or {}), sp.name: sp.reduce(acc)}


def _t_apply(ctx: TaskContext, plan: Plan, pieces: tuple[Piece, ...], ti: int,
             stats: dict[str, Any] | None) -> TaskResult:
    _, sums = _jobs(ctx, plan, _opened(ctx, plan)[1], pieces, stage="apply", stats_in={ti: stats or {}})
    return TaskResult(checksums=sums)


def _t_hash(ctx: TaskContext, plan: Plan, ti: int, _written: list[TaskResult]) -> dict[str, str]:
    """sha256 of a split tensor (of each stored part of a quantized one), read back in order
    once every piece is written."""
    out = {}
    for name, *_ in plan.tensors[ti].stored():
        h = hashlib.sha256()
        for block in _opened(ctx, plan)[1].read_back(name):
            h.update(block)
        out[name] = h.hexdigest()
    return out


# -- client side ------------------------------------------------------------------------------


def _submit(client: Any, task: Task, ctx: TaskContext, plan_f: Any, futs: dict[str, Any]) -> Any:
    dep = [futs[k] for k in task.deps]
    if task.kind in ("unit", "shard"):
        return client.submit(_t_full, ctx, plan_f, task.pieces, task.shard, key=task.key)
    if task.kind == "map":
        return client.submit(_t_map, ctx, plan_f, task.pieces, task.ti, task.k, dep[0] if dep else None, key=task.key)
    if task.kind == "reduce":
        has_prev = task.k > 0
        return client.submit(_t_reduce, plan_f, task.ti, task.k, dep[0] if has_prev else None,
                             dep[1:] if has_prev else dep, key=task.key)
    if task.kind == "apply":
        return client.submit(_t_apply, ctx, plan_f, task.pieces, task.ti, dep[0] if dep else None, key=task.key)
    return client.submit(_t_hash, ctx, plan_f, task.ti, dep, key=task.key)


def _failure(task: Task, exc: BaseException) -> BaseException:
    """The error a failed task raises to the user: ours as is, Dask's explained."""
    if isinstance(exc, MoemergeError):
        return exc
    try:
        from distributed import KilledWorker
    except ImportError:  # pragma: no cover
        KilledWorker = ()  # type: ignore[assignment,misc]
    if isinstance(exc, KilledWorker):
        return MergeRuntimeError(
            f"Dask task {task.key} ({task.kind}) was running on workers that died repeatedly; "
            "check the workers' memory limits and logs (--memory-budget is per worker)")
    return MergeRuntimeError(f"Dask task {task.key} ({task.kind}) failed: {type(exc).__name__}: {exc}")


def run_dask(
    plan: Plan,
    client: Any,
    *,
    opener: Callable[[], Sequence[Checkpoint]],
    target: OutputTarget,
    progress: Progress | NullProgress | None = None,
    device: str = "cpu",
    in_cast: str | None = None,
    skip: Collection[str] = (),
    on_written: Callable[[dict[str, str]], None] | None = None,
    written_every: int | Cadence = 1 << 30,
    kernel: ChunkKernel | None = None,
    aux: AuxTarget | None = None,
    on_aux: Callable[[dict[str, str]], None] | None = None,
    title: str | None = None,
) -> dict[str, str]:
    """Run `plan` but the tensors in `skip` on the cluster behind `client`; return each
    tensor's sha256.

    `kernel`, `aux`: as `run_jobs`'s `kernel` and `aux_writer` (pma update), the auxiliary
    store opened on each worker; `on_aux` hears the checksums of the chunks each task stored
    there. `title` names the run on the progress bar.

    The output must already be prepared; the caller finishes it (index, manifest) after this
    returns, or abandons it if this raises. `on_written` hears of finished tensors as often as
    `written_every` says (a `Cadence`; an int: output bytes), and at the end (the resume
    journal; it flushes the output first).
    """
    from distributed import as_completed

    progress = progress or NullProgress()
    run_id = uuid.uuid4().hex[:12]
    ctx = TaskContext(run_id=run_id, opener=opener, target=target, device=device, in_cast=in_cast, kernel=kernel,
                      aux=aux)
    skip_ti = {ti for ti, t in enumerate(plan.tensors) if all(n in skip for n, *_ in t.stored())}
    tasks = build_graph(plan, by_shard=target.kind == "remote", prefix=f"moemerge-{run_id}", skip=skip_ti)
    link = getattr(client, "dashboard_link", None)
    if link:
        progress.note(f"Dask dashboard: {link}")
    plan_f = client.scatter(plan, broadcast=True, hash=False)
    futs: dict[str, Any] = {}
    by_key = {t.key: t for t in tasks}
    digests: dict[str, str] = {}
    progress.start(sum(t.in_bytes for t in tasks), title or f"{plan.method} on Dask -> {len(plan.shards)} shard(s)")
    try:
        for task in tasks:
            futs[task.key] = _submit(client, task, ctx, plan_f, futs)
        pending: dict[str, str] = {}  # finished, not yet told to `on_written`
        tally = Tally(Cadence.of(written_every))
        out_bytes = {t.name: t.numel * itemsize(t.out_dtype) for t in plan.tensors} if on_written else {}
        for fut in as_completed(list(futs.values())):  # type: ignore[no-untyped-call]
            task = by_key[fut.key]
            if fut.status == "error":
                raise _failure(task, fut.exception()) from None
            got: dict[str, str] = {}
            if task.kind in ("unit", "shard", "apply"):
                res: TaskResult = fut.result()
                got = res.digests
                if on_aux is not None and res.checksums:
                    on_aux(res.checksums)
            elif task.kind == "hash":
                got = dict(fut.result())
            digests.update(got)
            pending.update(got)
            if got and tally.add(sum(out_bytes.get(n, 0) for n in got), tensors=len(got)) and on_written:
                on_written(pending)
                pending = {}
                tally.reset()
            progress.advance(task.in_bytes)
        if on_written is not None and pending:
            on_written(pending)
        return digests
    finally:
        progress.stop()
        client.cancel(list(futs.values()) + [plan_f])
        try:
            client.run(_release, run_id)
        except Exception as e:  # a worker that died has nothing left open
            _log.debug("releasing run %s on the workers: %s", run_id, e)
