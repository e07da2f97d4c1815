"""`pma update`: bring a PMA state up to date with the new snapshots, then write the average.

Each update reads only the snapshots entering the sums (and, for SMA/WMA, those leaving the
window) plus the previous state, in row-chunks bounded by the memory budget; writes the next
state version (io: pma.state, switched atomically after it is complete); and, in the same pass,
writes the averaged model to the output with the usual writers (manifest last). What to do is
decided first, from names and headers only (`decide`), so every problem is reported before any
byte is written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import yaml

from moemerge import __version__
from moemerge.config import parse_config
from moemerge.engine import NullProgress, Progress
from moemerge.errors import CheckpointError, ConfigError, MismatchError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dcp_names import DcpNames
from moemerge.io.quant import dequantizing
from moemerge.io.dtypes import is_float, itemsize, parse_dtype_name, to_torch
from moemerge.io.lease import Lease, take_lease
from moemerge.io.sidefiles import read_side_files, retag_config_dtype
from moemerge.io.writer import CONFIG_COPY_NAME, MANIFEST_NAME, check_output
from moemerge.io.zarr_writer import ZarrArraySpec
from moemerge.methods import average_weights
from moemerge.pma import running
from moemerge.pma.decide import DEFAULT_ALPHA, DEFAULT_LAST, Decision, decide, resolve_settings
from moemerge.pma.discovery import Snapshot, discover
from moemerge.pma.state import (METHOD_ARRAYS, StateMeta, StateSettings, StateStore, StateVersion,
                                array_name, new_meta)
from moemerge.planner import Plan, build_plan
from moemerge.sizes import parse_size

__all__ = ["update", "decide", "resolve_settings", "Decision", "UpdateResult", "DEFAULT_LAST"]

#: Bytes of buffers per element of a chunk, besides 8 per running quantity and 8 more for
#: what zarr copies while decoding or encoding it (counted by the caller): three fp64
#: scratches (snapshot in, snapshot out or product, WMA's n * M_new), two raw input buffers
#: (read-ahead) and the output buffer.
_FIXED_PER_ELEM = 3 * 8 + 2 * 8 + 8
_MIN_BUDGET = 10**6

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
    memory_budget: str | int = "2GB",
    shard_size: str | int = "5GB",
    out_format: str = "safetensors",
    out_dtype: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: bool | Progress | NullProgress = False,
    chunk_rows: int | None = None,
    compress_state: bool = True,
    dcp: DcpNames | None = None,
) -> UpdateResult:
    """Apply the snapshots matching `pattern` that are newer than the state at `state_url`,
    then write the average to `out`. Settings left None come from the state (or defaults:
    sma, last 10, alpha 0.2); settings that differ from the state's are refused. `chunk_rows`
    caps rows per chunk below what the budget allows (tests; results do not depend on it).
    `compress_state` stores the new state version lz4-compressed (lossless; about 3x smaller).
    `dcp` maps DCP snapshots' keys to tensor names (recorded in the state like the settings).

    Example:
        update("s3://run42/pma/state", "s3://run42/ckpt/step-*", "s3://run42/pma/latest")
    """
    t0 = time.monotonic()
    budget = parse_size(memory_budget, what="--memory-budget", minimum=_MIN_BUDGET)
    shard = parse_size(shard_size, what="--shard-size", minimum=1)
    if out_format not in ("safetensors", "zarr"):
        raise ConfigError(f"--format: {out_format!r} is not an output format; use safetensors or zarr")
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
        if not found and cur is None:
            raise ConfigError(f"{pattern}: no snapshots found" + (f" ({notes[0]})" if notes else ""))
        decision = decide(settings, cur.meta if cur else None, found, recompute_every=recompute_every)
        job = _Job(store=store, cur=cur, settings=settings, decision=decision, out=out, budget=budget,
                   shard=shard, out_format=out_format, out_dtype=out_dt, overwrite=overwrite,
                   storage_options=storage_options, notes=list(notes), progress=progress,
                   chunk_rows=chunk_rows)
        job.leases.append(state_lease)
        return job.run(t0)
    finally:
        if cur is not None:
            cur.close()
        state_lease.release()


class _Job:
    """One update, once decided: open inputs, check them, then one pass over every tensor."""

    def __init__(self, *, store: StateStore, cur: StateVersion | None, settings: StateSettings,
                 decision: Decision, out: str, budget: int, shard: int, out_format: str,
                 out_dtype: str | None, overwrite: bool, storage_options: dict[str, Any] | None,
                 notes: list[str], progress: bool | Progress | NullProgress,
                 chunk_rows: int | None = None) -> None:
        self.store, self.cur, self.settings, self.d = store, cur, settings, decision
        self.out, self.budget, self.shard, self.out_format = out, budget, shard, out_format
        self.out_dtype, self.overwrite, self.so = out_dtype, overwrite, storage_options
        self.notes = notes
        self.chunk_rows = chunk_rows
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
        self.prog.advance(n)

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
            man = json.loads(fs.cat_file(path))
        except Exception:
            return False, False
        pma = man.get("pma") if isinstance(man, dict) else None
        if not isinstance(pma, dict) or pma.get("state_key") != self.store.key:
            return False, False
        return pma.get("state_id") == (self.cur.meta.state_id if self.cur else None), True

    def _plan(self, newest: Checkpoint, n_state: int) -> Plan:
        doc: dict[str, Any] = {"merge_method": "linear", "models": [{"model": newest.url, "parameters": {"weight": 1.0}}]}
        if self.out_dtype:
            doc["out_dtype"] = self.out_dtype
        cfg = parse_config(doc, where="pma update")
        p = build_plan(cfg, {newest.url: newest.tensors}, memory_budget=self.budget,
                       shard_size=self.shard, out_format=self.out_format)
        # our buffers, not the linear engine's: fp64 running sums (and zarr's copies of them)
        per_elem = 16 * n_state + _FIXED_PER_ELEM
        cap = max(1, self.budget // per_elem)
        tensors = []
        for t in p.tensors:
            gran = math.prod(t.shape[1:-1]) if self.out_format == "zarr" and len(t.shape) >= 3 else 1
            gran = max(1, gran)
            # chunks fall on every opened snapshot's scale blocks (io.quant)
            gran = math.lcm(gran, *(c.tensors[t.name].row_align for c in self.opened.values() if t.name in c.tensors))
            rows = (cap // max(1, t.row_len)) // gran * gran
            if self.chunk_rows:
                rows = min(rows, max(gran, self.chunk_rows // gran * gran))
            tensors.append(replace(t, rows_per_chunk=max(gran, min(rows, t.rows) if rows else gran)))
        return replace(p, tensors=tuple(tensors))

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
            self.leases.append(take_lease(self.out, self.so, kind="output", what="moemerge pma update"))
            check_output(self.out, overwrite=self.overwrite or ours, storage_options=self.so,
                         inputs=[s.url for s in d.window])
            kinds = METHOD_ARRAYS[self.settings.method]
            plan = self._plan(newest, len(kinds))
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
            state_w = None
            if d.action != "noop":
                arrays = [ZarrArraySpec(name=array_name(k, t.name), shape=_flat(t.shape), dtype="F64",
                                        rows_per_chunk=t.rows_per_chunk)
                          for t in plan.tensors if t.name in floats for k in kinds]
                state_w = self.store.begin(arrays, meta)
            from moemerge.api import open_writer

            out_w = open_writer(self.out, plan, overwrite=True, storage_options=self.so)
            try:
                from moemerge.io.space import check_space

                check_space(out_w, plan.bytes_written)  # the output; the state's room is not counted
                out_w.prepare()
                self.prog.start(self._total(plan, floats, reads), f"pma update ({d.action})")
                digests = self._pass(plan, floats, newest, state_w, out_w, n)
                self.prog.stop()
                if state_w is not None:
                    self._check_leases()
                    self.store.commit(state_w, meta, previous=cur.name if cur else None)
                    state_w = None
                self._check_leases()
                out_w.finish(**self._commit_docs(plan, newest, meta, digests))
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
        action = {"build": "recomputed" if cur else "built", "incremental": "updated", "noop": "output"}[d.action]
        msg = {
            "built": f"built the state from {n} snapshot(s), steps {d.window[0].step}..{d.window[-1].step}",
            "updated": f"added step(s) {', '.join(str(s.step) for s in d.added)}"
                       + (f", dropped {', '.join(str(s.step) for s in d.leaving)}" if d.leaving else ""),
            "recomputed": f"recomputed the state from {n} snapshot(s) ({d.reason})",
            "output": f"nothing new after step {d.window[-1].step}; wrote the output from the state",
        }[action]
        return self._result(t0, action, meta, msg, reads=[s.url for s in reads])

    def _total(self, plan: Plan, floats: dict[str, Any], reads: list[Snapshot]) -> int:
        data = sum(self.opened[s.url].tensors[n].nbytes for s in reads for n in floats)
        return data + sum(t.numel * 8 for t in plan.tensors if t.name in floats) * len(
            METHOD_ARRAYS[self.settings.method]) * (0 if self.d.action == "build" else 1)

    def _pass(self, plan: Plan, floats: dict[str, Any], newest: Checkpoint, state_w: Any, out_w: Any,
              n: int) -> dict[str, str]:
        d, method = self.d, self.settings.method
        kinds = METHOD_ARRAYS[method]
        elems = max((t.rows_per_chunk * t.row_len for t in plan.tensors), default=1)
        sums_buf = {k: torch.empty(elems, dtype=torch.float64) for k in kinds}
        scratch = torch.empty(elems, dtype=torch.float64)
        tmp = torch.empty(elems, dtype=torch.float64)
        extra = torch.empty(elems if "W" in kinds else 0, dtype=torch.float64)  # WMA: n * M_new
        raw = [bytearray(elems * 8) for _ in range(2)]
        out_buf = bytearray(elems * 8)
        digests: dict[str, str] = {}
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moemerge-pma")
        # elementwise fp64 math is memory-bound: a second torch thread only competes with the
        # read and write threads (and spin-waits on a busy machine: 30x slower measured here)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for t in plan.tensors:
                h = hashlib.sha256()
                for r0, r1 in t.chunks if t.rows else []:
                    m = (r1 - r0) * t.row_len
                    if t.name not in floats:  # non-float: the newest snapshot's, as is
                        info = newest.tensors[t.name]
                        view = memoryview(out_buf)[:m * itemsize(info.dtype)]
                        newest.read_rows(t.name, r0, r1, view)
                        self._count("bytes_read", len(view))
                    else:
                        sums = {k: v[:m] for k, v in sums_buf.items()}
                        self._fold(t.name, r0, r1, sums, scratch[:m], tmp[:m], extra[:m], raw, pool, n)
                        if state_w is not None:
                            futs = [pool.submit(state_w.write_rows, array_name(k, t.name), r0,
                                                memoryview(sums[k].numpy()).cast("B"))
                                    for k in kinds]
                        res = running.average(method, sums, n, scratch[:m])
                        o = torch.frombuffer(out_buf, dtype=to_torch(t.out_dtype), count=m)
                        o.copy_(res)
                        view = memoryview(out_buf)[:m * itemsize(t.out_dtype)]
                        if state_w is not None:
                            for f in futs:
                                f.result()
                            self.state_written += 8 * m * len(kinds)
                    out_w.write_rows(t.name, r0, view)
                    h.update(view)
                digests[t.name] = h.hexdigest()
        finally:
            pool.shutdown(wait=True)
            torch.set_num_threads(threads_before)
        return digests

    def _fold(self, name: str, r0: int, r1: int, sums: dict[str, torch.Tensor], m_buf: torch.Tensor,
              tmp: torch.Tensor, extra: torch.Tensor, raw: list[bytearray], pool: ThreadPoolExecutor,
              n: int) -> None:
        """The running sums of rows r0..r1 after this update, into `sums`."""
        d, method, alpha = self.d, self.settings.method, self.settings.alpha
        m = m_buf.numel()

        def fetch(snap: Snapshot, buf: bytearray) -> torch.Tensor:
            ck = self.opened[snap.url]
            info = ck.tensors[name]
            view = memoryview(buf)[:m * itemsize(info.dtype)]
            ck.read_rows(name, r0, r1, view)
            self._count("bytes_read", len(view))
            return torch.frombuffer(buf, dtype=to_torch(info.dtype), count=m)

        if d.action == "build":
            seq = list(d.window)
            nxt = pool.submit(fetch, seq[0], raw[0])
            for i, snap in enumerate(seq):
                x = nxt.result()
                if i + 1 < len(seq):  # read the next snapshot's rows while this one is added
                    nxt = pool.submit(fetch, seq[i + 1], raw[(i + 1) % 2])
                m_buf.copy_(x)
                running.include(method, sums, m_buf, i + 1, alpha, tmp)
            return
        assert self.cur is not None
        futs = [pool.submit(self._read_state, k, name, r0, r1, v) for k, v in sums.items()]
        for f in futs:
            f.result()
        if method == "ema":
            for i, snap in enumerate(d.added):
                m_buf.copy_(fetch(snap, raw[0]))
                running.ema_step(sums["E"], m_buf, float(alpha))  # type: ignore[arg-type]
            return
        for new, old in zip(d.added, d.leaving):
            fn, fo = pool.submit(fetch, new, raw[0]), pool.submit(fetch, old, raw[1])
            m_buf.copy_(fn.result())
            tmp.copy_(fo.result())
            running.slide(sums, m_buf, tmp, n, extra)

    def _read_state(self, kind: str, name: str, r0: int, r1: int, dst: torch.Tensor) -> None:
        assert self.cur is not None
        self.cur.sums.read_rows(array_name(kind, name), r0, r1, memoryview(dst.numpy()).cast("B"))
        self._count("state_read", dst.numel() * 8)

    # -- commit documents ------------------------------------------------------------------------

    def _commit_docs(self, plan: Plan, newest: Checkpoint, meta: StateMeta, digests: dict[str, str]) -> dict[str, Any]:
        d, st = self.d, self.settings
        weights = average_weights(st.method, len(d.window), st.alpha or DEFAULT_ALPHA)
        side = read_side_files(newest.url, self.so, model=True, tokenizer=True)
        by_bytes: Counter[str] = Counter()
        for t in plan.tensors:
            if t.method != "copy":
                by_bytes[t.out_dtype] += t.numel
        main_dtype = by_bytes.most_common(1)[0][0] if by_bytes else "F32"
        if "config.json" in side:
            side["config.json"] = retag_config_dtype(side["config.json"], main_dtype)
        pma = {
            "method": st.method, "alpha": st.alpha, "last": st.last, "interval_steps": st.interval_steps,
            "steps": [s.step for s in d.window], "snapshots": [s.url for s in d.window],
            "weights": weights, "state": self.store.url, "state_key": self.store.key,
            "state_version": meta.version, "state_id": meta.state_id,
        }
        side[CONFIG_COPY_NAME] = yaml.safe_dump({"pma_update": {k: v for k, v in pma.items()
                                                                if k not in ("weights", "state_key", "state_id")}},
                                                sort_keys=False).encode()
        index = {"metadata": {"total_size": plan.bytes_written, "moemerge_version": __version__},
                 "weight_map": {t.name: t.out_file for t in plan.tensors}}
        manifest = {
            "moemerge_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": st.method, "config_hash": "", "config": {"pma_update": pma["steps"]},
            "inputs": [s.url for s in d.window], "seed": 0, "dtype": main_dtype,
            "files": {s.file: s.size for s in plan.shards},
            "tensors": {t.name: {"file": t.out_file, "dtype": t.out_dtype, "shape": list(t.shape),
                                 "sha256": digests[t.name]} for t in plan.tensors},
            "pma": pma,
        }
        return {"side_files": side, "index": index, "manifest": manifest}

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


def _flat(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The state array's shape: the row-chunking view (rows, row_len); 1-D and scalars as is."""
    if len(shape) <= 2:
        return shape
    return (math.prod(shape[:-1]), shape[-1])

