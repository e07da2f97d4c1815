"""`pma update`: bring a PMA state up to date with the new snapshots, then write the average.

Each update reads only the snapshots entering the sums (and, for SMA/WMA, those leaving the
window) plus the previous state; writes the next state version (pma.state, switched atomically
after it is complete); and, in the same pass, writes the averaged model to the output (manifest
last). What to do is decided first, from names and headers only (`decide`), so every problem is
reported before any byte is written. The work is a plan like a merge's (`planner.plan_update`),
run by the engine's pipeline with the running-sum stage (`methods.running`) as its kernel, and
committed as every output is (`engine.commit`).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import yaml

from moemerge.engine import NullProgress, Progress
from moemerge.engine.commit import commit_output
from moemerge.errors import CheckpointError, ConfigError, MismatchError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import is_float, itemsize, parse_dtype_name
from moemerge.io.lease import Lease, take_lease
from moemerge.io.manifest import MANIFEST_NAME, Manifest
from moemerge.io.quant import dequantizing
from moemerge.io.sidefiles import read_side_files
from moemerge.io.writer import ModelWriter, check_output
from moemerge.io.zarr_writer import ZarrArraySpec
from moemerge.methods import average_weights
from moemerge.methods.running import RunningStep
from moemerge.names import DcpNames
from moemerge.pma.decide import DEFAULT_ALPHA, DEFAULT_LAST, Decision, decide, resolve_settings, window_record
from moemerge.pma.discovery import Snapshot, discover
from moemerge.pma.state import (METHOD_ARRAYS, StateMeta, StateSettings, StateStore, StateVersion,
                                array_name, new_meta)
from moemerge.planner import Plan
from moemerge.planner.update import plan_update, state_source
from moemerge.settings import DEFAULT_BUDGET, DEFAULT_SHARD_SIZE, DEFAULT_UNIT_BYTES, MIN_BUDGET
from moemerge.sizes import parse_size

__all__ = ["update", "decide", "resolve_settings", "Decision", "UpdateResult", "DEFAULT_LAST"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateResult:
    """What an update did."""

    out: str
    state: str
    action: Literal["built", "updated", "recomputed", "output", "noop"]
    """built: first state; updated: incremental; recomputed: exact from the window; output: the
    state was current, only the output was (re)written; noop: nothing to do."""
    version: int
    settings: StateSettings
    steps: tuple[int, ...]
    added: tuple[int, ...]
    removed: tuple[int, ...]
    weights: tuple[float, ...]
    bytes_read: int
    """Tensor bytes read from snapshots."""
    state_bytes_read: int
    state_bytes_written: int
    seconds: float
    message: str
    notes: tuple[str, ...] = ()
    snapshots_read: tuple[str, ...] = ()


# -- the update --------------------------------------------------------------------------------

def update(
    state_url: str,
    pattern: str,
    out: str,
    *,
    method: str | None = None,
    last: int | None = None,
    alpha: float | None = None,
    interval_steps: int | None = None,
    before_step: int | None = None,
    step_regex: str | None = None,
    recompute_every: int | None = None,
    memory_budget: str | int = DEFAULT_BUDGET,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    out_format: str = "safetensors",
    out_dtype: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: bool | Progress | NullProgress = False,
    chunk_rows: int | None = None,
    compress_state: bool = True,
    dcp: DcpNames | None = None,
    min_snapshots: int = 1,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    dashboard: str | None = None,
    unit_size: str | int | None = None,
    quantize: str | None = None,
) -> UpdateResult:
    """Apply the snapshots matching `pattern` that are newer than the state at `state_url`,
    then write the average to `out`. Settings left None come from the state (or defaults:
    sma, last 10, alpha 0.2); settings that differ from the state's are refused. `chunk_rows`
    caps rows per chunk below what the budget allows (tests; results do not depend on it).
    `compress_state` stores the new state version with the lossless state codec
    (pma.state_codec: SMA/WMA sums about 3 bytes per value instead of 8).
    `dcp` maps DCP snapshots' keys to tensor names (recorded in the state like the settings).
    `workers` (a LocalCluster), `scheduler` (a running cluster's address) or `client` (a
    `distributed.Client`) run the chunks on Dask, as `moemerge.run` does, with the same output
    and state; there `bytes_read` and `state_bytes_read` are what the plan reads. `unit_size`
    sets the input bytes per Dask task (default about 256 MB). `quantize` is `pma`'s
    `--quantize` (`none`, `like-input`, `fp8-block`, `mxfp4`; default `like-input` when the
    snapshots are quantized alike, planner.quant): the average written with fresh scales,
    as `moemerge pma` writes it.

    Example:
        update("s3://run42/pma/state", "s3://run42/ckpt/step-*", "s3://run42/pma/latest")
    """
    t0 = time.monotonic()
    budget = parse_size(memory_budget, what="--memory-budget", minimum=MIN_BUDGET)
    shard = parse_size(shard_size, what="--shard-size", minimum=1)
    units = DEFAULT_UNIT_BYTES if unit_size is None else parse_size(unit_size, what="--unit-size", minimum=1)
    if out_format not in ("safetensors", "zarr"):
        raise ConfigError(f"--format: {out_format!r} is not an output format; use safetensors or zarr")
    if workers is not None and scheduler:
        raise ConfigError("give --workers (start a local Dask cluster) or --scheduler (join one), not both")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if recompute_every is not None and (isinstance(recompute_every, bool) or recompute_every < 1):
        raise ConfigError(f"--recompute-every must be a whole number >= 1, got {recompute_every!r}")
    out_dt = None
    if out_dtype is not None:
        out_dt = parse_dtype_name(out_dtype)
        if out_dt is None:
            raise ConfigError(f"--out-dtype: {out_dtype!r} is not a float dtype; use bfloat16, float16 or float32")
    store = StateStore(state_url, storage_options, compress=compress_state)
    store.check_writable()
    # one updater per state (io.lease), taken before the state is read; released on any exit
    state_lease = take_lease(state_url, storage_options, kind="state", what="moemerge pma update")
    try:
        cur = store.current()
    except BaseException:
        state_lease.release()
        raise
    try:
        settings = resolve_settings(method=method, last=last, alpha=alpha, interval_steps=interval_steps,
                                    recorded=cur.meta.settings if cur else None, dcp=dcp)
        if settings.method == "ema" and recompute_every is not None:
            raise ConfigError(
                "--recompute-every does not apply to --method ema: an exact EMA needs every snapshot "
                "since the state began, and its fp64 error does not grow (each step scales the old "
                "error by 1 - alpha, so it stays below 3 u max|M| / alpha, u = 2^-53); leave it out")
        found, notes = discover(pattern, storage_options=storage_options, step_regex=step_regex)
        if before_step is not None:
            found = [s for s in found if s.step < before_step]
        decision = decide(settings, cur.meta if cur else None, found, recompute_every=recompute_every,
                          min_snapshots=min_snapshots, where=pattern)  # none found: NotReadyError (exit 3)
        notes = list(notes) + list(decision.notes)  # a window still filling, a schedule recomputed
        job = _Job(store=store, cur=cur, settings=settings, decision=decision, out=out, budget=budget,
                   shard=shard, out_format=out_format, out_dtype=out_dt, overwrite=overwrite,
                   storage_options=storage_options, notes=list(notes), progress=progress,
                   chunk_rows=chunk_rows, unit_bytes=units, quantize=quantize,
                   dask=_Dask(workers=workers, scheduler=scheduler, client=client, dashboard=dashboard,
                              dcp=settings.dcp))
        job.leases.append(state_lease)
        return job.run(t0)
    finally:
        if cur is not None:
            cur.close()
        store.wait_cleanup()  # the replaced version's deletion, overlapped with the output's commit
        state_lease.release()


class _Job:
    """One update, once decided: open inputs, check them, then one pass over every tensor."""

    def __init__(self, *, store: StateStore, cur: StateVersion | None, settings: StateSettings,
                 decision: Decision, out: str, budget: int, shard: int, out_format: str,
                 out_dtype: str | None, overwrite: bool, storage_options: dict[str, Any] | None,
                 notes: list[str], progress: bool | Progress | NullProgress,
                 chunk_rows: int | None = None, unit_bytes: int = DEFAULT_UNIT_BYTES,
                 dask: _Dask | None = None, quantize: str | None = None) -> None:
        self.store, self.cur, self.settings, self.d = store, cur, settings, decision
        self.out, self.budget, self.shard, self.out_format = out, budget, shard, out_format
        self.out_dtype, self.overwrite, self.so = out_dtype, overwrite, storage_options
        self.notes = notes
        self.chunk_rows, self.unit_bytes = chunk_rows, unit_bytes
        self.quantize = quantize
        self.dask = dask or _Dask()
        self.started: tuple[Any, Any] | None = None  # the Dask client and LocalCluster we started
        self.leases: list[Lease] = []  # the state's, then the output's: checked before each commit
        self.prog = progress if not isinstance(progress, bool) else (Progress() if progress else NullProgress())
        self.opened: dict[str, Checkpoint] = {}
        self.bytes_read = 0
        self.state_read = 0
        self.state_written = 0
        self._count_lock = threading.Lock()  # counters are bumped from the read threads

    def _check_leases(self) -> None:
        """Fail before a commit if another job took over the state's or the output's lock."""
        for lease in self.leases:
            lease.check()

    def _count(self, attr: str, n: int) -> None:
        with self._count_lock:
            setattr(self, attr, getattr(self, attr) + n)

    # -- inputs ------------------------------------------------------------------------------

    def _open(self, snaps: list[Snapshot]) -> list[str]:
        problems = []
        for s in snaps:
            if s.url in self.opened:
                continue
            try:
                ck = Checkpoint.open(s.url, self.so, names=self.settings.dcp)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            try:  # quantized snapshots (FP8, MXFP4) are averaged dequantized, never copied (io.quant)
                self.opened[s.url] = dequantizing(ck)
            except CheckpointError as e:
                ck.close()
                problems.append(str(e))
        return problems

    def _close_inputs(self) -> None:
        for c in self.opened.values():
            c.close()
        self.opened.clear()

    def _reads(self) -> list[Snapshot]:
        """The snapshots whose tensor data this update reads, falling back to a recompute when
        an SMA/WMA snapshot leaving the window is gone (retention deleted it)."""
        d = self.d
        if d.action == "noop":
            return []
        if d.action == "build":
            return list(d.window)
        if self._open(list(d.leaving)):
            self.notes.append("a snapshot leaving the window cannot be read any more: recomputing "
                              "the window from scratch instead")
            self._close_inputs()
            self.d = replace(d, action="build", leaving=(), reason="leaving snapshot gone: exact recompute")
            return list(d.window)
        return list(d.added) + list(d.leaving)

    def _check_tensors(self, newest: Checkpoint, reads: list[Snapshot]) -> dict[str, Any]:
        """Float tensors (name -> TensorInfo of the newest) after checking every input and the
        state agree on names and shapes; all problems at once."""
        floats = {n: t for n, t in newest.tensors.items() if is_float(t.dtype)}
        problems: list[str] = []
        if self.cur is not None and self.d.action != "build":
            have = self.cur.meta.tensors
            for n in sorted(set(have) - set(floats))[:5]:
                problems.append(f"{newest.url}: tensor `{n}` is in the state but not in this snapshot")
            for n in sorted(set(floats) - set(have))[:5]:
                problems.append(f"{newest.url}: tensor `{n}` is not in the state (built from "
                                f"{self.cur.meta.steps[-1][1]})")
            for n, t in floats.items():
                if n in have and tuple(have[n]["shape"]) != t.shape:
                    problems.append(f"{newest.url}: tensor `{n}` is {list(t.shape)}, the state has "
                                    f"{have[n]['shape']}")
        for s in reads:
            ck = self.opened[s.url]
            for n, t in floats.items():
                o = ck.tensors.get(n)
                if o is None:
                    problems.append(f"{s.url}: tensor `{n}` is missing (present in {newest.url})")
                elif o.shape != t.shape or not is_float(o.dtype):
                    problems.append(f"{s.url}: tensor `{n}` is {o.dtype} {list(o.shape)}, "
                                    f"{newest.url} has {t.dtype} {list(t.shape)}")
        if problems:
            more = "" if len(problems) <= 12 else f"\n  ... and {len(problems) - 12} more"
            raise MismatchError(
                "the snapshots and the PMA state disagree (a state follows one architecture; "
                "start a new state for a changed model):\n  " + "\n  ".join(problems[:12]) + more)
        return floats

    # -- output --------------------------------------------------------------------------------

    def _output_state(self) -> tuple[bool, bool]:
        """(committed for the current state, written by an update of this state)."""
        try:
            fs, root = storage.resolve(self.out, self.so)
            path = storage.join(root, MANIFEST_NAME)
            if not fs.isfile(path):
                return False, False
            man = Manifest.from_json(fs.cat_file(path), where=path)
        except Exception:
            return False, False
        pma = man.pma
        if not isinstance(pma, dict) or pma.get("state_key") != self.store.key:
            return False, False
        return pma.get("state_id") == (self.cur.meta.state_id if self.cur else None), True

    def _step(self) -> RunningStep:
        """What the running-sum stage does to every chunk (methods.running)."""
        d, st = self.d, self.settings
        mode = {"build": "build", "incremental": "slide", "noop": "output"}[d.action]
        reads = {"build": len(d.window), "incremental": len(d.added) + len(d.leaving), "noop": 0}[d.action]
        return RunningStep(method=st.method, mode=mode, snapshots=reads, window=len(d.window),  # type: ignore[arg-type]
                           alpha=st.alpha, growing=d.growing)

    def _plan(self, step: RunningStep, newest: Snapshot, reads: list[Snapshot]) -> Plan:
        from moemerge.planner.quant import plan_with_quant, resolve_output_quant

        # `pma`'s --quantize and its default, decided as a merge's (planner.quant): the newest
        # snapshot gives the layout `like-input` copies (one run's snapshots share it)
        ckpts = [self.opened[newest.url]] + [self.opened[s.url] for s in reads if s.url != newest.url]
        oq = resolve_output_quant(self.quantize, ckpts, ckpts[0].tensors, out_format=self.out_format)
        plan: Plan = plan_with_quant(plan_update(
            step, (newest.url, self.opened[newest.url].tensors),
            [(s.url, self.opened[s.url].tensors) for s in reads],
            state=self.cur.url if (self.cur is not None and step.reads_sums) else None,
            memory_budget=self.budget, shard_size=self.shard, out_format=self.out_format,
            out_dtype=self.out_dtype, chunk_rows=self.chunk_rows, unit_bytes=self.unit_bytes,
            quant=oq.specs, keep=oq.keep), oq)
        return plan

    # -- the pass --------------------------------------------------------------------------------

    def run(self, t0: float) -> UpdateResult:
        d = self.d
        cur = self.cur
        committed, ours = self._output_state()
        if d.action == "noop" and committed:
            return self._result(t0, "noop", cur.meta if cur else None,  # type: ignore[arg-type]
                                f"nothing new after step {d.window[-1].step}; {self.out} is already "
                                f"the average of the state's {len(d.window)} snapshot(s)")
        try:
            reads = self._reads()
            d = self.d
            newest_snap = d.window[-1]
            problems = self._open(reads + [newest_snap])
            if problems:
                raise CheckpointError(problems[0] if len(problems) == 1 else
                                      "cannot read the snapshots:\n  " + "\n  ".join(problems))
            newest = self.opened[newest_snap.url]
            floats = self._check_tensors(newest, reads)
            step = self._step()
            plan = self._plan(step, newest_snap, reads)  # a bad --quantize fails here, before any output
            if not (self.dask.client is not None or self.dask.workers or self.dask.scheduler):
                from moemerge.engine.prefetch import prefetch_first_reads

                # the disk reads the first snapshot rows while torch loads (as `run` does)
                prefetch_first_reads(plan, [self.opened.get(src) for src in plan.sources])
            from moemerge._startup import load_torch_quietly

            load_torch_quietly()  # nothing when loaded already
            self.leases.append(take_lease(self.out, self.so, kind="output", what="moemerge pma update"))
            check_output(self.out, overwrite=self.overwrite or ours, storage_options=self.so,
                         inputs=[s.url for s in d.window])
            kinds = METHOD_ARRAYS[self.settings.method]
            n = len(d.window)
            if d.action == "noop":
                meta = cur.meta  # type: ignore[union-attr]
            else:
                self.store.clean_leftovers(keep=cur.name if cur else None)  # under the state's lock
                incr = d.action == "incremental"
                since = (cur.meta.updates_since_recompute + 1) if (incr and cur) else 0
                meta = new_meta(
                    self.settings, [(s.step, s.url) for s in d.window], skipped=list(d.skipped),
                    tensors={name: {"shape": list(t.shape), "dtype": t.dtype} for name, t in floats.items()},
                    version=(cur.meta.version + 1) if cur else 1, updates_since_recompute=since,
                    ops_since_recompute=(n - 1) + (2 * since if self.settings.method != "ema" else since),
                )
            client, cluster = self.dask.client, None
            if client is None and (self.dask.workers or self.dask.scheduler):  # before any output exists
                from moemerge.engine.cluster import start_client

                client, cluster = start_client(workers=self.dask.workers, scheduler=self.dask.scheduler,
                                               memory_budget=plan.memory_budget, dashboard=self.dask.dashboard)
                self.started = (client, cluster)  # closed at the end
            state_w = None
            if d.action != "noop":
                arrays = [ZarrArraySpec(name=array_name(k, t.name), shape=_flat(t.shape), dtype="F64",
                                        rows_per_chunk=t.rows_per_chunk)
                          for t in plan.tensors if t.name in floats for k in kinds]
                state_w = self.store.begin(arrays, meta)
            from moemerge.io.output import open_writer, output_target

            out_w = open_writer(output_target(self.out, plan.out_format, self.so), plan, overwrite=True)
            try:
                from moemerge.io.space import check_space

                check_space(out_w, plan.bytes_written)  # the output; the state's room is not counted
                out_w.prepare()
                if client is not None:
                    digests = self._pass_on_dask(plan, step, state_w, out_w, client, own_cluster=cluster is not None)
                else:
                    digests = self._pass(plan, step, state_w, out_w)
                if state_w is not None:
                    self._check_leases()
                    self.store.commit(state_w, meta, previous=cur.name if cur else None)
                    state_w = None
                self._commit(plan, out_w, newest_snap, meta, digests)
            except BaseException as e:
                if state_w is not None:
                    state_w.close()
                out_w.close()
                from moemerge.io.swap import note_state

                note_state(e, out_w)  # what the output holds now, for the CLI's one line
                raise
        finally:
            self._close_inputs()
            for lease in self.leases[1:]:  # the output's (the state's is released by `update`)
                lease.release()
            if self.started is not None:
                self.started[0].close()
                if self.started[1] is not None:
                    self.started[1].close()
        action = {"build": "recomputed" if cur else "built", "incremental": "updated", "noop": "output"}[d.action]
        msg = {
            "built": f"built the state from {n} snapshot(s), steps {d.window[0].step}..{d.window[-1].step}",
            "updated": f"added step(s) {', '.join(str(s.step) for s in d.added)}"
                       + (f", dropped {', '.join(str(s.step) for s in d.leaving)}" if d.leaving else ""),
            "recomputed": f"recomputed the state from {n} snapshot(s) ({d.reason})",
            "output": f"nothing new after step {d.window[-1].step}; wrote the output from the state",
        }[action]
        return self._result(t0, action, meta, msg, reads=[s.url for s in reads])

    def _inputs(self, plan: Plan, step: RunningStep) -> list[_Counted]:
        """The plan's sources, in order: the snapshots, then each running quantity of the state,
        every read counted."""
        by_source: dict[str, tuple[Any, str]] = {url: (ck, "bytes_read") for url, ck in self.opened.items()}
        if self.cur is not None and step.reads_sums:
            for q in step.quantities:
                by_source[state_source(self.cur.url, q)] = (_StateArrays(self.cur.sums, q, compiled=_compiled(plan)),
                                                            "state_read")
        return [_Counted(reader, functools.partial(self._count, counter))
                for reader, counter in (by_source[src] for src in plan.sources)]

    def _pass(self, plan: Plan, step: RunningStep, state_w: Any, out_w: Any) -> dict[str, str]:
        """Every tensor through the engine's pipeline: the average to `out_w`, the new sums to
        `state_w`; the average's sha256 per tensor back."""
        from moemerge.engine.pipeline import run_jobs
        from moemerge.engine.running import RunningKernel

        from moemerge.pma.state_io import FastStateWriter

        compiled = _compiled(plan)
        aux = FastStateWriter(state_w, compiled=compiled) if state_w is not None else None  # past zarr's copies
        res = run_jobs(plan, self._inputs(plan, step), out_w,
                       kernel=RunningKernel(step=step, array=array_name, compiled=compiled),
                       aux_writer=aux, progress=self.prog, title=f"pma update ({self.d.action})")
        if state_w is not None:
            self.state_written += sum(8 * t.numel for t in plan.tensors if t.method != "copy") * len(step.quantities)
        return res.digests

    def _pass_on_dask(self, plan: Plan, step: RunningStep, state_w: Any, out_w: ModelWriter, client: Any,
                      *, own_cluster: bool) -> dict[str, str]:
        """`_pass` as tasks on the Dask cluster behind `client`: workers open the snapshots, the
        state's sums, the output and the new state version themselves (engine.cluster)."""
        from moemerge.engine.cluster import AuxTarget, OutputTarget as DaskTarget, run_dask
        from moemerge.engine.running import RunningKernel
        from moemerge.io.output import output_target
        from moemerge.io.writer import SupportsAdopt

        # workers open the output where the writer builds it (beside the old one when overwriting)
        at = output_target(self.out, plan.out_format, self.so).at(out_w.target)
        target = DaskTarget(kind=at.kind, url=at.url, storage_options=at.storage_options or None,
                            flush_each_task=not own_cluster)  # others' workers may be other machines
        aux = None
        if state_w is not None:
            aux = AuxTarget(url=state_w.target, arrays=tuple(state_w.arrays.values()), storage_options=self.so)
        version = self.cur.url if (self.cur is not None and step.reads_sums) else None
        opener = functools.partial(_open_sources, plan.sources, self.so, self.dask.dcp, self.store.url, version,
                                   step.quantities)
        digests = run_dask(plan, client, opener=opener, target=target, progress=self.prog,
                           kernel=RunningKernel(step=step, array=array_name), aux=aux,
                           on_aux=state_w.recorded.update if state_w is not None else None,
                           title=f"pma update ({self.d.action}) on Dask")
        if isinstance(out_w, SupportsAdopt):  # shards the workers streamed and completed themselves
            out_w.adopt([s.file for s in plan.shards])
        state = {state_source(version, q) for q in step.quantities} if version is not None else set()
        for t in plan.tensors:
            for src, dt in zip(t.sources_used, t.in_dtypes):
                n = t.numel * itemsize(dt)
                if plan.sources[src] in state:
                    self.state_read += n
                else:
                    self.bytes_read += n
        if state_w is not None:
            self.state_written += sum(8 * t.numel for t in plan.tensors if t.method != "copy") * len(step.quantities)
        return digests

    # -- commit --------------------------------------------------------------------------------

    def _commit(self, plan: Plan, out_w: ModelWriter, newest: Snapshot, meta: StateMeta,
                digests: dict[str, str]) -> None:
        """Side files of the newest snapshot, index and manifest (`pma`: what was averaged and
        the state it came from), written as every output's are (engine.commit)."""
        d, st = self.d, self.settings
        weights = average_weights(st.method, len(d.window), st.alpha or DEFAULT_ALPHA)
        pma = {
            "method": st.method, "alpha": st.alpha, "last": st.last, "interval_steps": st.interval_steps,
            "steps": [s.step for s in d.window], "snapshots": [s.url for s in d.window],
            "weights": weights, "state": self.store.url, "state_key": self.store.key,
            **window_record(st, len(d.window)),  # 'window 2 of 4', filling, incremental or recomputed
            "state_version": meta.version, "state_id": meta.state_id,
        }
        copy = yaml.safe_dump({"pma_update": {k: v for k, v in pma.items()
                                              if k not in ("weights", "state_key", "state_id")}},
                              sort_keys=False).encode()
        commit_output(out_w, plan, digests,
                      side_files=read_side_files(newest.url, self.so, model=True, tokenizer=True),
                      config_copy=copy, config={"pma_update": pma["steps"]}, seed=0,
                      inputs=[s.url for s in d.window], extra={"pma": pma}, checks=[self._check_leases])

    def _result(self, t0: float, action: Any, meta: StateMeta, message: str,
                reads: list[str] | None = None) -> UpdateResult:
        d, st = self.d, self.settings
        return UpdateResult(
            out=self.out, state=self.store.url, action=action, version=meta.version, settings=st,
            steps=tuple(s.step for s in d.window), added=tuple(s.step for s in d.added) if action != "noop" and action != "output" else (),
            removed=tuple(s.step for s in d.leaving), weights=tuple(average_weights(st.method, len(d.window), st.alpha or DEFAULT_ALPHA)),
            bytes_read=self.bytes_read, state_bytes_read=self.state_read,
            state_bytes_written=self.state_written, seconds=time.monotonic() - t0, message=message,
            notes=tuple(self.notes), snapshots_read=tuple(reads or ()),
        )


#: Float elements from which an update runs its sums and state codec compiled (methods._running_fast,
#: pma._codec_numba): loading numba and its cached loops costs ~0.75 s of CPU, the loops save
#: ~7 ns per element (fold 6 -> 1, codec 5 -> 2), so below ~100M elements they cost more.
COMPILED_FROM = 1 << 27


def _compiled(plan: Plan) -> bool:
    """Whether this update's chunks are large enough work for the compiled loops."""
    return sum(t.numel for t in plan.tensors if t.method != "copy") >= COMPILED_FROM


def _flat(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The state array's shape: the row-chunking view (rows, row_len); 1-D and scalars as is."""
    if len(shape) <= 2:
        return shape
    return (math.prod(shape[:-1]), shape[-1])


class _StateArrays:
    """One running quantity of the previous state read by tensor name (`S` of `w`: `S:w`)."""

    def __init__(self, sums: Checkpoint, quantity: str, *, compiled: bool = True) -> None:
        from moemerge.pma.state_io import FastStateReader

        self.sums, self.quantity = sums, quantity
        self.tensors = {name.split(":", 1)[1]: t for name, t in sums.tensors.items()
                        if name.startswith(quantity + ":")}
        self.fast = FastStateReader(sums, compiled=compiled)  # whole local chunks past zarr's copies (pma.state_io)

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        if not self.fast.read_rows(array_name(self.quantity, name), r0, r1, out):
            self.sums.read_rows(array_name(self.quantity, name), r0, r1, out)

    def close(self) -> None:
        self.sums.close()  # shared by the quantities of one version: closing twice is harmless


class _Counted:
    """An input of the pipeline whose reads are counted (an update reports what it read)."""

    def __init__(self, reader: Checkpoint | _StateArrays, count: Callable[[int], None]) -> None:
        self.reader, self.count = reader, count

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        self.reader.read_rows(name, r0, r1, out)
        info = self.reader.tensors.get(name)
        if info is None:  # stored beside quantized weights (`input_scale`): the view serves it unlisted
            info = getattr(self.reader, "inner", self.reader).tensors[name]
        self.count((r1 - r0) * info.row_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Dask:
    """Where an update's chunks run: here (all None), or on a Dask cluster."""

    workers: int | None = None
    scheduler: str | None = None
    client: Any = None
    dashboard: str | None = None
    dcp: DcpNames | None = None
    """How workers name DCP snapshots' tensors (the state's setting)."""


def _open_sources(sources: tuple[str, ...], storage_options: dict[str, Any] | None, dcp: DcpNames | None,
                  state: str, version: str | None, quantities: tuple[str, ...]) -> list[Any]:
    """A Dask worker's inputs of an update's plan, in source order: each snapshot (served
    dequantized), then each running quantity of the state version `version` (read through the
    state's pointer, which names it until this update commits)."""
    from moemerge.pma.state_codec import register

    register()  # the worker writes (and reads) state arrays stored with the state codec
    kinds = {state_source(version, q): q for q in quantities} if version is not None else {}
    opened: list[Any] = []
    cur: StateVersion | None = None
    try:
        for src in sources:
            if src in kinds:
                if cur is None:
                    cur = StateStore(state, storage_options).current()
                    if cur is None or cur.url != version:
                        raise CheckpointError(f"{state}: the PMA state changed while this update ran "
                                              f"(it started from {version}); rerun the update")
                opened.append(_StateArrays(cur.sums, kinds[src]))
                continue
            ck = Checkpoint.open(src, storage_options, names=dcp)
            try:
                opened.append(dequantizing(ck))
            except BaseException:
                ck.close()
                raise
    except BaseException:
        for c in opened:
            c.close()
        if cur is not None:
            cur.close()
        raise
    return opened
