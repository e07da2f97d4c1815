"""The fault matrix of issue 11 ("no silent wrong output"): one section of tests per row.

Row  Fault (issue 11)                                   Tests that prove it fixed
---  -------------------------------------------------  -----------------------------------------------------------
 1   two `pma update` on one state                      test_two_pma_updates_started_together_never_both_proceed,
                                                        test_a_live_state_lock_refuses_pma_update,
                                                        test_pointer_changed_by_another_job_fails_the_commit,
                                                        test_s3_pointer_is_replaced_only_if_unchanged
 2   two `run`s into one output                         test_two_runs_into_one_output_never_both_proceed,
                                                        test_a_dead_jobs_lock_is_taken_over_with_a_note,
                                                        test_a_live_lock_refuses_and_changes_nothing,
                                                        test_s3_leases_refuse_expire_renew_and_vanish
 3   `--resume` after an input changed in place         test_resume_refuses_an_input_rewritten_in_place[*],
                                                        test_resume_refuses_an_object_storage_input_rewritten_in_place
 4   `--resume` after a finished shard was deleted      test_resume_recomputes_the_tensors_of_a_deleted_shard,
     (and the journal's cadence)                        test_resume_recomputes_a_kept_tensor_whose_bytes_changed,
                                                        test_journal_is_written_by_tensor_count_for_small_outputs,
                                                        test_cadence_reports_by_bytes_tensors_or_time,
                                                        test_dask_journal_by_tensor_count_and_resume_rechecks
 5   a missing Zarr chunk reads as zeros                test_zarr_input_with_a_missing_chunk_is_refused,
                                                        test_zarr_input_missing_chunk_direct_read_names_array_and_chunk,
                                                        test_pma_state_with_a_damaged_chunk_fails_the_update_and_keeps_the_state[*],
                                                        test_state_manifest_records_a_checksum_per_chunk
 6   `--overwrite` deletes the old merge first          test_failed_overwrite_keeps_the_old_output_and_a_good_one_replaces_it,
                                                        test_resume_overwrite_continues_the_unfinished_new_output,
                                                        test_sigkill_during_overwrite_keeps_the_old_output,
                                                        test_kill_inside_the_swap_leaves_a_state_the_next_run_fixes[*],
                                                        test_zarr_failed_overwrite_keeps_the_old_store,
                                                        test_s3_failed_overwrite_keeps_the_old_output
 7   out-of-range parameters silently clamped           test_density_out_of_range_is_refused_before_any_output[*],
                                                        test_density_zero_and_one_are_accepted_and_zero_gives_the_base,
                                                        test_one_bad_gradient_entry_is_named,
                                                        test_filter_rule_value_out_of_range_is_named,
                                                        test_all_problems_are_reported_at_once,
                                                        test_every_declared_range_is_enforced[*],
                                                        test_resolved_values_are_checked_per_tensor,
                                                        test_pma_options_out_of_range
 8   a duplicated key in the index                      test_duplicate_key_in_index_is_refused
 9   resource exhaustion from inputs                    test_yaml_alias_bomb_is_refused_quickly,
                                                        test_recursive_yaml_alias_is_refused,
                                                        test_oversized_config_json_is_refused_before_it_is_read,
                                                        test_oversized_tokenizer_file_is_refused,
                                                        test_too_many_tensors_are_refused_at_header_parse,
                                                        test_two_million_tiny_tensors_are_refused_fast_and_small (slow)
10   the Dask dashboard on 0.0.0.0                      test_parse_dashboard,
                                                        test_local_cluster_listens_on_loopback_only
11   multipart uploads left open                        test_stale_uploads_under_the_prefix_are_aborted_with_a_note,
                                                        test_failed_or_interrupted_run_leaves_no_open_upload[*]
12   unclear errors: SIGINT / SIGTERM messages,         test_sigint_during_the_commit_says_the_index_is_there,
     `verify` on unfinished output, free space,         test_sigint_during_an_overwrite_says_the_old_output_is_untouched,
     NaN/Inf inputs, malformed storage_options          test_verify_on_an_unfinished_output_says_unfinished,
                                                        test_free_space_is_checked_before_anything_is_written,
                                                        test_sigterm_is_one_line_exit_143_and_cleans_up,
                                                        test_statistics_methods_refuse_nan_naming_tensor_and_model[*],
                                                        test_elementwise_methods_pass_nan_through,
                                                        test_malformed_storage_options_are_one_line[*]

[*] parametrized. Helpers, constants and fixtures that two sections would otherwise share a name
for carry the section's prefix (`_lock_`, `_resume_`, `_reads_`, `_ow_`, `resume_`/`ow_inputs`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import pytest
import s3fs
import torch

import moemerge
import moemerge.api
from conftest import write_checkpoint, write_yaml
from moemerge.config import parse_config
from moemerge.errors import ConfigError, OutputError
from moemerge.io import space, swap
from moemerge.io import writer as writer_mod
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import to_torch
from moemerge.io.journal import JOURNAL_NAME
from moemerge.io.lease import hold_lease, lock_location, take_lease
from moemerge.io.writer import LocalModelWriter
from moemerge.methods import REGISTRY
from moemerge.methods.base import Interval
from moemerge.pma.state import POINTER_NAME, StateStore, array_name
from moemerge.pma.update import update
from moemerge.verify import verify
from test_s3 import _config, _objects, _open_uploads, fast, models  # noqa: F401  (fixtures)

#: tiny test models need `--shard-size` below the CLI's 1 MB minimum to get several shards
pytestmark = pytest.mark.usefixtures("small_shards")

MANIFEST = "moemerge-manifest.json"
INDEX = "model.safetensors.index.json"


# -- row 1: two `pma update` on one state ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
BUSY = "is being written by"


#: A long-lived CLI runner: reads {"argv": [...], "at": unix time} lines, starts `moemerge ARGV`
#: in-process at that moment, answers {"code", "err"}. Two of them start jobs within about a
#: millisecond of each other, without paying the interpreter and torch start-up per trial.
#: `prepare` of the writers sleeps HOLD s first, so a winner holds its lock while the other job
#: starts whatever the machine's load (the code before the fix had no lock: both proceeded).
_WORKER = r'''
import contextlib, io, json, sys, time
sys.path.insert(0, sys.argv[1])
HOLD = float(sys.argv[2])
import moemerge.cli as cli, moemerge.api, moemerge.pma.update
from moemerge.io.writer import LocalModelWriter
from moemerge.pma.state import StateStore
from rich.console import Console


def slow(fn):
    def wrapper(*a, **k):
        time.sleep(HOLD)
        return fn(*a, **k)
    return wrapper

LocalModelWriter.prepare = slow(LocalModelWriter.prepare)
StateStore.begin = slow(StateStore.begin)
real_out = sys.stdout
real_out.write("ready\n"); real_out.flush()
for line in sys.stdin:
    req = json.loads(line)
    while time.time() < req["at"]:
        time.sleep(0.0005)
    out, err = io.StringIO(), io.StringIO()
    cli._out = Console(file=out, width=400, highlight=False, soft_wrap=True)
    cli._err = Console(file=err, width=400, highlight=False, soft_wrap=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(req["argv"])
        except SystemExit as e:
            code = int(e.code or 0)
    real_out.write(json.dumps({"code": code, "err": err.getvalue(), "out": out.getvalue()}) + "\n")
    real_out.flush()
'''


class Pair:
    """Two worker processes that start one command each at the same instant."""

    def __init__(self, tmp: Path, hold: float = 0.3) -> None:
        script = tmp / "worker.py"
        script.write_text(_WORKER)
        self.procs = [subprocess.Popen([sys.executable, str(script), str(REPO), str(hold)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                      for _ in range(2)]
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def both(self, a: list[str], b: list[str]) -> list[dict]:
        at = time.time() + 0.05
        for p, argv in zip(self.procs, (a, b)):
            assert p.stdin is not None
            p.stdin.write(json.dumps({"argv": [str(x) for x in argv], "at": at}) + "\n")
            p.stdin.flush()
        return [json.loads(p.stdout.readline()) for p in self.procs]  # type: ignore[union-attr]

    def close(self) -> None:
        for p in self.procs:  # idle between commands: nothing to lose
            p.kill()
            p.wait()


@pytest.fixture
def pair(tmp_path: Path):
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _load(out: str | Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint.open(str(out))
    try:
        res = {}
        for name, t in ck.tensors.items():
            buf = bytearray(t.nbytes)
            ck.read_rows(name, 0, t.rows, memoryview(buf))
            res[name] = torch.frombuffer(buf, dtype=to_torch(t.dtype)).reshape(t.shape).clone()
        return res
    finally:
        ck.close()


def _dyadic(g: torch.Generator, *shape: int) -> torch.Tensor:
    """fp32 values k/64, |k| < 512: any sum of a few, and a quarter of it, is exact in fp32 and
    fp64 alike, so every averaging path gives the same bits."""
    return torch.randint(-511, 512, shape, generator=g).float() / 64


def _snapshot(g: torch.Generator, step: int) -> dict[str, torch.Tensor]:
    return {"model.embed.weight": _dyadic(g, 12, 8), "model.norm.weight": _dyadic(g, 8),
            "model.layers.0.experts.w1": _dyadic(g, 3, 4, 8),
            "model.layers.0.step": torch.arange(4, dtype=torch.int64) + step}


def _check_state(state: Path, snaps: dict[int, dict[str, torch.Tensor]], window: list[int]) -> None:
    """The state is whole: the pointer names an existing version whose manifest agrees with it,
    no other version or lock is left, and its sums are exactly those of `window`."""
    pointer = json.loads((state / POINTER_NAME).read_text())
    names = sorted(p.name for p in state.iterdir())
    assert names == sorted([POINTER_NAME, pointer["path"]]), names
    cur = StateStore(str(state)).current()
    assert cur is not None
    try:
        assert cur.meta.version == pointer["version"] and cur.meta.state_id == pointer["state_id"]
        assert [s for s, _ in cur.meta.steps] == window
        for name, x in snaps[window[-1]].items():
            if not x.is_floating_point():
                continue
            t = cur.sums.tensors[array_name("S", name)]
            buf = bytearray(t.nbytes)
            cur.sums.read_rows(array_name("S", name), 0, t.rows, memoryview(buf))
            got = torch.frombuffer(buf, dtype=torch.float64)
            want = sum(snaps[s][name].double().reshape(-1) for s in window)
            assert torch.equal(got, want), f"S:{name} differs from the window's sum"
    finally:
        cur.close()


def test_two_pma_updates_started_together_never_both_proceed(tmp_path: Path, pair: Pair, run_cli) -> None:
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def night(step: int) -> None:
        snaps[step] = _snapshot(g, step)
        write_checkpoint(tmp_path / "ckpt" / f"step-{step:08d}", snaps[step])

    pattern = str(tmp_path / "ckpt" / "step-*")
    state, out = tmp_path / "state", tmp_path / "latest"
    for s in (1, 2, 3, 4):
        night(s)
    assert update(str(state), pattern, str(out), method="sma", last=4).action == "built"
    argv = ["pma", "update", state, pattern, "-o", out, "--no-progress"]
    busy = 0
    for trial in range(20):
        step = 5 + trial
        night(step)
        res = pair.both(argv, argv)
        codes = sorted(r["code"] for r in res)
        assert codes == [0, 1], f"trial {trial} (seed {seed}): exit codes {codes}: {res}"
        loser = next(r for r in res if r["code"] == 1)["err"]
        assert BUSY in loser and "moemerge pma update" in loser, loser
        assert str(state / "pma-state.lock") in loser and loser.count("\n") == 1, loser
        busy += 1
        _check_state(state, snaps, list(range(step - 3, step + 1)))
    assert busy == 20
    assert verify(str(out)) == 4
    # the next night, one update alone: equal, element for element, to `pma` over the same window
    night(25)
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--no-progress")
    assert code == 0, err
    _check_state(state, snaps, [22, 23, 24, 25])
    code, _, err = run_cli("pma", pattern, "--last", "4", "-o", tmp_path / "scratch", "--no-progress")
    assert code == 0, err
    got, scratch = _load(out), _load(tmp_path / "scratch")
    assert got.keys() == scratch.keys() == snaps[25].keys()
    for name in got:
        assert torch.equal(got[name], scratch[name]), f"{name} (seed {seed})"
    assert verify(str(out)) == 4 and verify(str(tmp_path / "scratch")) == 4


def test_a_live_state_lock_refuses_pma_update(tmp_path: Path, run_cli) -> None:
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    for s in (1, 2):
        write_checkpoint(tmp_path / "ckpt" / f"step-{s}", _snapshot(g, s))
    pattern, state, out = str(tmp_path / "ckpt" / "step-*"), tmp_path / "state", tmp_path / "avg"
    update(str(state), pattern, str(out), last=2)
    before = {p.relative_to(state): p.read_bytes() for p in state.rglob("*") if p.is_file()}
    write_checkpoint(tmp_path / "ckpt" / "step-3", _snapshot(g, 3))
    with hold_lease(str(state), kind="state", what="moemerge pma update"):
        code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--no-progress")
    assert code == 1 and f"the PMA state {state} {BUSY}" in err, err
    assert {p.relative_to(state): p.read_bytes() for p in state.rglob("*") if p.is_file()} == before
    assert verify(str(out)) == 4
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--no-progress")
    assert code == 0, err


def test_pointer_changed_by_another_job_fails_the_commit(tmp_path: Path, monkeypatch) -> None:
    import moemerge.pma.update as upd

    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    for s in (1, 2):
        write_checkpoint(tmp_path / "ckpt" / f"step-{s}", _snapshot(g, s))
    pattern, state, out = str(tmp_path / "ckpt" / "step-*"), tmp_path / "state", tmp_path / "avg"
    update(str(state), pattern, str(out), last=2)
    write_checkpoint(tmp_path / "ckpt" / "step-3", _snapshot(g, 3))
    real = upd._Job._pass
    other: dict[str, str] = {}

    def another_job_commits(self, *a, **k):  # as if a job that ignored the lock committed meanwhile
        digests = real(self, *a, **k)
        store = StateStore(str(state))
        cur = store.current()
        assert cur is not None
        import shutil

        name = "v000002-0123abcd"
        shutil.copytree(cur.url, state / name)
        cur.close()
        pointer = json.loads((state / POINTER_NAME).read_text())
        other.update(old=pointer["path"], new=name)
        (state / POINTER_NAME).write_text(json.dumps({**pointer, "version": 2, "path": name}))
        return digests

    monkeypatch.setattr(upd._Job, "_pass", another_job_commits)
    with pytest.raises(OutputError, match="another job committed the PMA state while this update ran") as e:
        update(str(state), pattern, str(out))
    assert other["new"] in str(e.value) and other["old"] in str(e.value)
    # ours discarded; the other job's state as it left it; no lock left
    assert sorted(p.name for p in state.iterdir()) == sorted([POINTER_NAME, other["old"], other["new"]])
    assert json.loads((state / POINTER_NAME).read_text())["path"] == other["new"]
    assert StateStore(str(state)).current() is not None


def test_s3_pointer_is_replaced_only_if_unchanged(tmp_path: Path, s3_server) -> None:
    import boto3
    import s3fs

    from moemerge.pma.state import new_meta

    boto3.client("s3").create_bucket(Bucket="pma")
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    for s in (1, 2):
        write_checkpoint(tmp_path / "ckpt" / f"step-{s}", _snapshot(g, s))
    url = "s3://pma/state"
    update(url, str(tmp_path / "ckpt" / "step-*"), str(tmp_path / "avg"), last=2)
    fs = s3fs.S3FileSystem()
    store = StateStore(url)
    cur = store.current()
    assert cur is not None
    meta = new_meta(cur.meta.settings, list(cur.meta.steps), skipped=[], tensors={}, version=2,
                    updates_since_recompute=0, ops_since_recompute=0)
    writer = store.begin([], meta)
    ours = writer.root.rsplit("/", 1)[-1]
    # another job commits meanwhile: a pointer naming its own version
    pointer = json.loads(fs.cat_file("pma/state/" + POINTER_NAME))
    theirs = {**pointer, "version": 2, "path": "v000002-0badc0de", "state_id": "x" * 32}
    fs.pipe_file("pma/state/" + POINTER_NAME, json.dumps(theirs).encode())
    with pytest.raises(OutputError, match="another job committed the PMA state") as e:
        store.commit(writer, meta, previous=cur.name)
    assert "v000002-0badc0de" in str(e.value)
    cur.close()
    fs.invalidate_cache()
    assert json.loads(fs.cat_file("pma/state/" + POINTER_NAME)) == theirs  # theirs stands
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("pma/state")}
    assert ours not in names and cur.name in names  # ours discarded, nothing else touched


# -- row 2: two `run`s into one output -------------------------------------------------------------

def test_two_runs_into_one_output_never_both_proceed(tmp_path: Path, pair: Pair, ckpt_factory, run_cli) -> None:
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    a = ckpt_factory("a", {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g)})
    b = ckpt_factory("b", {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g)})
    extra = {"linear": {}, "ties": {"density": 0.5}}
    cfgs = {name: write_yaml(tmp_path / f"{name}.yml", {
        "merge_method": name, **({"base_model": str(a)} if name == "ties" else {}),
        "models": [{"model": str(a), "parameters": {"weight": 0.3, **extra[name]}},
                   {"model": str(b), "parameters": {"weight": 0.7, **extra[name]}}],
        "dtype": "float32"}) for name in ("linear", "ties")}
    refs = {}
    for name, cfg in cfgs.items():
        code, _, err = run_cli("run", cfg, tmp_path / f"ref-{name}", "--no-progress")
        assert code == 0, err
        refs[name] = _load(tmp_path / f"ref-{name}")
    assert not torch.equal(refs["linear"]["w"], refs["ties"]["w"])
    inputs = {p: sorted((q.name, q.read_bytes()) for q in p.iterdir()) for p in (a, b)}
    for trial in range(20):
        out = tmp_path / "merged" / f"out{trial}"
        res = pair.both(["run", cfgs["linear"], out, "--no-progress"], ["run", cfgs["ties"], out, "--no-progress"])
        codes = [r["code"] for r in res]
        assert sorted(codes) == [0, 1], f"trial {trial}: exit codes {codes}: {res}"
        loser = res[codes.index(1)]["err"]
        assert BUSY in loser and "moemerge run" in loser and lock_location(str(out)) in loser, loser
        winner = ("linear", "ties")[codes.index(0)]
        assert verify(str(out)) == 2
        got = _load(out)
        for name, x in refs[winner].items():
            assert torch.equal(got[name], x), f"trial {trial}: {name} is not the {winner} merge"
        man = json.loads((out / MANIFEST).read_text())
        assert man["method"] == winner
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(f"out{i}" for i in range(20))
    assert {p: sorted((q.name, q.read_bytes()) for q in p.iterdir()) for p in (a, b)} == inputs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock_record(pid: int, host: str | None = None) -> str:
    return json.dumps({"owner": "ghost", "host": host or socket.gethostname(), "pid": pid,
                       "started": "2026-01-02T03:04:05Z", "command": "moemerge run", "token": "f" * 32})


def _lock_linear(tmp_path: Path, ckpt_factory) -> Path:
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    a = ckpt_factory("a", {"w": torch.randn(32, 8, generator=g)})
    b = ckpt_factory("b", {"w": torch.randn(32, 8, generator=g)})
    return write_yaml(tmp_path / "merge.yml", {
        "merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                             {"model": str(b), "parameters": {"weight": 0.5}}]})


def test_a_dead_jobs_lock_is_taken_over_with_a_note(tmp_path: Path, ckpt_factory, run_cli) -> None:
    cfg = _lock_linear(tmp_path, ckpt_factory)
    out = tmp_path / "out"
    lock = Path(lock_location(str(out)))
    assert lock == tmp_path / ".out.moemerge-lock"
    pid = _dead_pid()
    lock.write_text(_lock_record(pid))
    code, _, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 0, err
    assert "note: took over the lock" in err and f"ghost@{socket.gethostname()} pid {pid}" in err, err
    assert not lock.exists() and verify(str(out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "merge.yml", "out"]
    # a state's lock the same way
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    for s in (1, 2):
        write_checkpoint(tmp_path / "ckpt" / f"step-{s}", _snapshot(g, s))
    state = tmp_path / "state"
    state.mkdir()
    pid = _dead_pid()
    (state / "pma-state.lock").write_text(_lock_record(pid))
    code, _, err = run_cli("pma", "update", state, tmp_path / "ckpt" / "step-*", "-o", tmp_path / "avg",
                           "--last", "2", "--no-progress")
    assert code == 0, err
    assert "note: took over the lock" in err and f"pid {pid}" in err, err
    assert not (state / "pma-state.lock").exists() and verify(str(tmp_path / "avg")) == 4


def test_a_live_lock_refuses_and_changes_nothing(tmp_path: Path, ckpt_factory, run_cli) -> None:
    cfg = _lock_linear(tmp_path, ckpt_factory)
    out = tmp_path / "out"
    with hold_lease(str(out), what="moemerge run") as lease:
        code, _, err = run_cli("run", cfg, out, "--no-progress")
        assert code == 1
        assert err.startswith("moemerge: error: ") and err.count("\n") == 1, err
        assert f"{out} is being written by {lease.holder.owner}@{socket.gethostname()} pid {os.getpid()} " \
               "(moemerge run) since " in err, err
        assert f"remove the lock file {lease.location}" in err
        assert not out.exists()  # nothing laid out, not even the directory
    assert not Path(lease.location).exists()
    # a finished output under a live lock: --overwrite refuses too, and the output is untouched
    assert run_cli("run", cfg, out, "--no-progress")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with hold_lease(str(out), what="moemerge export"):
        code, _, err = run_cli("run", cfg, out, "--overwrite", "--no-progress")
        assert code == 1 and BUSY in err and "(moemerge export)" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and verify(str(out)) == 1
    # a lock of a job on another host is never presumed dead
    lock = Path(lock_location(str(out)))
    lock.write_text(_lock_record(_dead_pid(), host="elsewhere"))
    code, _, err = run_cli("run", cfg, out, "--overwrite", "--no-progress")
    assert code == 1 and "ghost@elsewhere" in err and "dead on another host remove the lock file" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    lock.unlink()


def _lease_doc(expires: float, pid: int = 4242) -> bytes:
    return json.dumps({"owner": "ghost", "host": "node9", "pid": pid, "started": "2026-01-02T03:04:05Z",
                       "command": "moemerge run", "token": "e" * 32, "expires_unix": expires}).encode()


def test_s3_leases_refuse_expire_renew_and_vanish(tmp_path: Path, ckpt_factory, run_cli, s3_server, monkeypatch) -> None:
    import boto3
    import s3fs

    import moemerge.api as api
    from moemerge.io import lease as lease_mod

    boto3.client("s3").create_bucket(Bucket="out")
    fs = s3fs.S3FileSystem()
    cfg = _lock_linear(tmp_path, ckpt_factory)
    url = "s3://out/m"
    where = lock_location(url)
    assert where == "s3://out/m.moemerge-lease"
    # a live (unexpired) lease refuses: nothing written
    fs.pipe_file("out/m.moemerge-lease", _lease_doc(time.time() + 600))
    code, _, err = run_cli("run", cfg, url, "--no-progress")
    assert code == 1 and f"{url} {BUSY} ghost@node9 pid 4242 (moemerge run)" in err, err
    assert "lease expires at" in err and where in err
    fs.invalidate_cache()
    assert fs.find("out/m") == []
    # an expired one is taken over with a note; the run's own lease is gone after it
    fs.pipe_file("out/m.moemerge-lease", _lease_doc(time.time() - 1))
    code, _, err = run_cli("run", cfg, url, "--no-progress")
    assert code == 0, err
    assert "note: took over the expired lease" in err and "ghost@node9" in err, err
    fs.invalidate_cache()
    assert not fs.exists("out/m.moemerge-lease")
    assert "moemerge-manifest.json" in [p.rsplit("/", 1)[-1] for p in fs.find("out/m")]
    # a live job renews its lease; losing it (taken over) fails the check before a commit
    # (a TTL of seconds, and a wait for the renewal rather than a fixed sleep: a loaded CI machine
    # may delay the renewal thread, and this checks renewal, not scheduling)
    lease = take_lease("s3://out/other", ttl=6.0, what="test")
    try:
        first = lease.holder.expires
        deadline = time.monotonic() + 30
        while lease.holder.expires == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.holder.expires > first  # renewed (every TTL/3) by the lease's own thread
        lease.check()
        fs.pipe_file("out/other.moemerge-lease", _lease_doc(time.time() + 600))
        with pytest.raises(OutputError, match="lost its lease"):
            lease.check()
    finally:
        lease.release()
    fs.invalidate_cache()
    assert json.loads(fs.cat_file("out/other.moemerge-lease"))["token"] == "e" * 32  # not ours: left
    # a run whose lease is taken over mid-run fails before its commit
    real = api.run_local

    def stolen(*a, **k):
        res = real(*a, **k)
        fs.pipe_file("out/m2.moemerge-lease", _lease_doc(time.time() + 600, pid=777))
        return res

    monkeypatch.setattr(api, "run_local", stolen)
    monkeypatch.setattr(lease_mod, "DEFAULT_TTL", 30.0)
    code, _, err = run_cli("run", cfg, "s3://out/m2", "--no-progress")
    assert code == 1 and "lost its lease" in err and "nothing was committed" in err, err
    fs.invalidate_cache()
    assert "moemerge-manifest.json" not in [p.rsplit("/", 1)[-1] for p in fs.find("out/m2")]


# -- row 3: `--resume` after an input changed in place ---------------------------------------------

N_TENSORS = 24

#: Settings of every run here: small shards, so that the output has several.
KW = {"memory_budget": "1MB", "shard_size": "10KB"}
ARGS = ("--memory-budget", "1MB", "--shard-size", "10KB", "--no-progress")


def _resume_model(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    return {f"model.layers.{k}.mlp.weight": torch.randn(32, 24 + k % 7, generator=g).to(torch.bfloat16)
            for k in range(n)}


@pytest.fixture
def resume_inputs(tmp_path: Path) -> list[Path]:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return [write_checkpoint(tmp_path / f"m{i}", _resume_model(g, N_TENSORS), shards=3) for i in range(3)]


def _resume_cfg(inputs: list[Path] | list[str]) -> dict:
    return {"merge_method": "ties", "base_model": str(inputs[0]),
            "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.4}} for p in inputs[1:]]}


def _write_cfg(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(json.dumps(cfg))
    return p


def _journal(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / JOURNAL_NAME).read_text().splitlines() if ln.strip()]


def _resume_files(out: Path) -> dict[str, bytes]:
    """Every file of an output but the manifest (its `created` time differs from run to run)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name != "moemerge-manifest.json"}


def _crash_after(monkeypatch: pytest.MonkeyPatch, calls: int, tensor: str | None = None) -> None:
    """Make the output writer fail on its `calls`-th write (or the first of `tensor`), as a full
    disk would."""
    real = LocalModelWriter.write_rows
    seen = [0]

    def failing(self, name, row_start, data):
        seen[0] += 1
        if seen[0] == calls or name == tensor:
            raise OutputError(f"{self.url}: simulated crash while writing `{name}`")
        return real(self, name, row_start, data)

    monkeypatch.setattr(LocalModelWriter, "write_rows", failing)


def _crashed_run(cfg_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *, after: int,
                 every_bytes: int | None = 1, tensor: str | None = None) -> set[str]:
    """A run that dies on its `after`-th write (or on `tensor`); the tensors its journal lists."""
    with monkeypatch.context() as m:
        if every_bytes is not None:
            m.setattr(moemerge.api, "JOURNAL_EVERY", every_bytes)
        _crash_after(m, after, tensor)
        with pytest.raises(OutputError, match="simulated crash"):
            moemerge.run(str(cfg_path), str(out), **KW)
    assert not (out / "moemerge-manifest.json").exists()
    return {e["t"] for e in _journal(out)[1:]}


def _rewrite_data_in_place(shard: Path, *, restore_mtime: bool) -> None:
    """New random tensor bytes in `shard`, same size and byte-identical header."""
    st = shard.stat()
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_len = len(raw) - 8 - n
    with open(shard, "r+b") as f:
        f.seek(8 + n)
        # bf16 bit patterns of finite values: random uint16 with a bounded exponent
        vals = torch.randn(data_len // 2).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        f.write(vals + os.urandom(data_len - len(vals)))
    if restore_mtime:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = shard.stat()
    assert after.st_size == st.st_size and shard.read_bytes()[:8 + n] == raw[:8 + n]
    assert (after.st_mtime_ns == st.st_mtime_ns) == restore_mtime


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["mtime-changed", "mtime-restored"])
def test_resume_refuses_an_input_rewritten_in_place(resume_inputs: list[Path], tmp_path: Path, run_cli,
                                                   monkeypatch: pytest.MonkeyPatch, restore_mtime: bool) -> None:
    """Row 3: headers equal, bytes different. Was: exit 0, `verify` OK, the kept tensors from
    the old inputs. The journal records each input file's size, mtime, ctime and header hash;
    `os.utime` can put mtime back but not ctime, so both cases are caught."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_resume_cfg(resume_inputs)))
    out = tmp_path / "out"
    done = _crashed_run(cfg, out, monkeypatch, after=N_TENSORS * 2 // 3)
    assert 0 < len(done) < N_TENSORS
    changed = resume_inputs[1] / "model-00001-of-00003.safetensors"
    _rewrite_data_in_place(changed, restore_mtime=restore_mtime)
    before = _resume_files(out)

    code, _, err = run_cli("run", cfg, out, *ARGS, "--resume")
    assert code == 1
    assert str(changed) in err and "changed since the interrupted run" in err, err
    assert "without --resume" in err and len(err.strip().splitlines()) == 1, err
    assert _resume_files(out) == before  # refused before the output was touched
    assert not (out / "moemerge-manifest.json").exists()

    # starting over gives what a fresh run of the new inputs gives
    code, _, err = run_cli("run", cfg, out, *ARGS)
    assert code == 0, err
    code, _, err = run_cli("run", cfg, tmp_path / "clean", *ARGS)
    assert code == 0, err
    assert _resume_files(out) == _resume_files(tmp_path / "clean")
    code, _, err = run_cli("verify", out)
    assert code == 0, err


def test_resume_refuses_an_object_storage_input_rewritten_in_place(resume_inputs: list[Path], tmp_path: Path, run_cli,
                                                                  monkeypatch: pytest.MonkeyPatch, s3_server) -> None:
    """Row 3 with inputs on S3: the same key rewritten with a same-size body and the same
    header has another ETag, so the journal of the earlier run is refused."""
    import boto3
    import s3fs

    boto3.client("s3").create_bucket(Bucket="models")
    fs = s3fs.S3FileSystem()
    for p in resume_inputs:
        for f in sorted(p.iterdir()):
            fs.put_file(str(f), f"models/{p.name}/{f.name}")
    cfg = _write_cfg(tmp_path, _resume_cfg([f"s3://models/{p.name}" for p in resume_inputs]))
    out = tmp_path / "out"
    done = _crashed_run(cfg, out, monkeypatch, after=N_TENSORS * 2 // 3)
    assert done
    local = resume_inputs[2] / "model-00002-of-00003.safetensors"
    _rewrite_data_in_place(local, restore_mtime=False)
    fs.put_file(str(local), "models/m2/model-00002-of-00003.safetensors")
    before = _resume_files(out)

    code, _, err = run_cli("run", cfg, out, *ARGS, "--resume")
    assert code == 1
    assert "s3://models/m2/model-00002-of-00003.safetensors: changed since the interrupted run" in err, err
    assert "ETag" in err and "without --resume" in err, err
    assert _resume_files(out) == before
    code, _, err = run_cli("run", cfg, out, *ARGS)
    assert code == 0, err
    code, _, err = run_cli("run", cfg, tmp_path / "clean", *ARGS)
    assert code == 0, err
    assert _resume_files(out) == _resume_files(tmp_path / "clean")
    code, _, err = run_cli("verify", out)
    assert code == 0, err


# -- row 4: `--resume` after a finished shard was deleted; journal cadence -------------------------

_RESUME_LINE = re.compile(r"resume: (\d+) tensors kept \((.+) re-read and verified\), (\d+) recomputed")


def _resume_counts(text: str) -> tuple[int, int]:
    m = _RESUME_LINE.search(text)
    assert m, text
    return int(m.group(1)), int(m.group(3))


def test_resume_recomputes_the_tensors_of_a_deleted_shard(resume_inputs: list[Path], tmp_path: Path, run_cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 4. Was: the shard recreated as zeros, its journaled tensors skipped, exit 0, `verify`
    failing. Now every kept tensor is re-read and must hash to its journal line."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_resume_cfg(resume_inputs)))
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, tmp_path / "clean", *ARGS)
    assert code == 0, err
    done = _crashed_run(cfg, out, monkeypatch, after=N_TENSORS * 2 // 3)
    index = json.loads((tmp_path / "clean" / "model.safetensors.index.json").read_text())["weight_map"]
    first = sorted({index[t] for t in done})[0]
    lost = {t for t in done if index[t] == first}
    assert lost and lost != done
    (out / first).unlink()

    code, stdout, err = run_cli("run", cfg, out, *ARGS, "--resume")
    assert code == 0, err
    kept, recomputed = _resume_counts(stdout)
    assert kept == len(done) - len(lost) and recomputed == len(lost), stdout
    assert "did not match the journal" in stdout
    assert _resume_files(out) == _resume_files(tmp_path / "clean")
    assert not (out / JOURNAL_NAME).exists()
    code, _, err = run_cli("verify", out)
    assert code == 0, err


def test_resume_recomputes_a_kept_tensor_whose_bytes_changed(resume_inputs: list[Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    """A journaled tensor with one byte flipped on disk is recomputed, not trusted."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_resume_cfg(resume_inputs)))
    out = tmp_path / "out"
    clean = moemerge.run(str(cfg), str(tmp_path / "clean"), **KW)
    done = _crashed_run(cfg, out, monkeypatch, after=N_TENSORS * 2 // 3)
    victim = sorted(done)[0]
    p = clean.plan.placements()[victim]
    with open(out / p.file, "r+b") as f:
        f.seek(p.offset + p.nbytes // 2)
        b = f.read(1)
        f.seek(p.offset + p.nbytes // 2)
        f.write(bytes([b[0] ^ 0x40]))

    res = moemerge.run(str(cfg), str(out), **KW, resume=True)
    assert res.resumed is not None
    assert (res.resumed.kept, res.resumed.recomputed) == (len(done) - 1, 1)
    assert res.resumed.kept_bytes == sum(clean.plan.placements()[t].nbytes for t in done - {victim})
    assert res.checksums == clean.checksums
    assert _resume_files(out) == _resume_files(tmp_path / "clean")
    code, _, err = run_cli("verify", out)
    assert code == 0, err


def test_journal_is_written_by_tensor_count_for_small_outputs(tmp_path: Path, run_cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Default cadence: a few KB of output never reach the byte threshold, yet a run that dies
    at tensor 150 of 200 keeps 128 (an entry every 64 tensors, at most one a second: here a
    tensor takes 20 ms). Was: the journal only had its header line, and --resume recomputed
    everything."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    n = 200
    ins = [write_checkpoint(tmp_path / f"m{i}", {f"t.{k:03d}": torch.randn(4, 8, generator=g).to(torch.bfloat16)
                                                 for k in range(n)}) for i in range(2)]
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps({"merge_method": "linear",
                               "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in ins]}))
    out = tmp_path / "out"
    assert moemerge.api.JOURNAL_EVERY >= 1 << 30  # the byte threshold is not what saves the work here
    real = LocalModelWriter.write_rows

    def slow(self, name, row_start, data):  # 64 tensors take more than the 1 s between entries
        if row_start == 0:
            time.sleep(0.02)
        return real(self, name, row_start, data)

    with monkeypatch.context() as m:
        m.setattr(LocalModelWriter, "write_rows", slow)
        done = _crashed_run(cfg, out, m, after=-1, every_bytes=None, tensor="t.150")
    assert 128 <= len(done) < 150, len(done)  # 128 unless the machine stalls for 30 s

    code, stdout, err = run_cli("run", cfg, out, *ARGS, "--resume")
    assert code == 0, err
    assert _resume_counts(stdout) == (len(done), 0)
    code, _, err = run_cli("run", cfg, tmp_path / "clean", *ARGS)
    assert code == 0, err
    assert _resume_files(out) == _resume_files(tmp_path / "clean")
    code, _, err = run_cli("verify", out)
    assert code == 0, err


def test_cadence_reports_by_bytes_tensors_or_time() -> None:
    from moemerge.engine.cadence import Cadence, Tally

    t = Tally(Cadence(nbytes=100, tensors=3, seconds=3600, min_seconds=0))
    assert not t.add(10) and not t.add(10) and t.add(10)  # the third tensor
    t.reset()
    assert not t.add(99, tensors=0) and t.add(1, tensors=0)  # 100 bytes
    t = Tally(Cadence(nbytes=1 << 40, tensors=1 << 40, seconds=0.0))
    assert t.add(0)  # no time left: every finished tensor
    assert not Tally(Cadence.of(1 << 30)).add(1, tensors=10**6)  # an int: bytes alone, as before
    t = Tally(Cadence(tensors=2, seconds=3600, min_seconds=0.2))
    assert not t.add(1) and not t.add(1)  # enough tensors, but the last report was just now
    time.sleep(0.25)
    assert t.add(1)


def test_dask_journal_by_tensor_count_and_resume_rechecks(resume_inputs: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On Dask: the journal is written every few tensors (was: by input bytes, so only at the
    end of a small output), and a resumed run re-reads what it keeps (a deleted shard is
    recomputed)."""
    pytest.importorskip("distributed")
    from moemerge.io.journal import Journal
    from moemerge.verify import verify

    cfg = _resume_cfg(resume_inputs)
    clean = moemerge.run(cfg, str(tmp_path / "clean"), **KW)
    done = _crashed_run(_write_cfg(tmp_path, cfg), tmp_path / "out", monkeypatch, after=N_TENSORS * 2 // 3)
    first = sorted({clean.plan.placements()[t].file for t in done})[0]
    lost = {t for t in done if clean.plan.placements()[t].file == first}
    (tmp_path / "out" / first).unlink()

    calls: list[int] = []
    real = Journal.record
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY_TENSORS", 4)
    monkeypatch.setattr(moemerge.api, "JOURNAL_MIN_SECONDS", 0.0)  # tiny tasks finish within a second
    monkeypatch.setattr(Journal, "record", lambda self, d: (calls.append(len(d)), real(self, d))[1])
    from distributed import Client

    with Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None) as client:
        res = moemerge.run(cfg, str(tmp_path / "out"), client=client, resume=True, unit_size="4KB", **KW)
    assert res.resumed is not None
    assert (res.resumed.kept, res.resumed.recomputed) == (len(done) - len(lost), len(lost))
    recomputed = N_TENSORS - res.resumed.kept
    assert sum(calls) == recomputed and len(calls) >= 2 and all(c >= 4 for c in calls[:-1]), calls
    assert res.checksums == clean.checksums
    assert _resume_files(tmp_path / "out") == _resume_files(tmp_path / "clean")
    verify(str(tmp_path / "out"))


# -- row 5: a missing Zarr chunk reads as zeros ----------------------------------------------------

def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))


def _reads_model(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g),
        "model.layers.0.mlp.experts.w1": torch.randn(4, 6, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
    }


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` -> sha256 of its bytes (what "nothing changed" compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _reads_refused(run_cli, tmp_path: Path, a: Path, b: Path, message: str) -> None:
    """A linear merge of a and b is refused with `message` in one error (exit 1, no traceback; a
    list of problems continues on indented lines): no finished output, input a unchanged."""
    before = _tree(a)
    out = tmp_path / "out"
    code, _, err = run_cli("run", write_yaml(tmp_path / "m.yaml", _reads_linear(a, b)), out, "--no-progress")
    assert code == 1, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and err.count("moemerge: error:") == 1, err
    assert lines[0].startswith("moemerge: error:") and all(ln.startswith(" ") for ln in lines[1:]), err
    assert message in err, err
    assert not out.exists() or not (out / "moemerge-manifest.json").exists()
    assert _tree(a) == before


def _reads_linear(a: Path, b: Path) -> dict:
    return {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.4}},
        {"model": str(b), "parameters": {"weight": 0.6}}]}


def test_zarr_input_with_a_missing_chunk_is_refused(tmp_path: Path, run_cli) -> None:
    g = _gen()
    a = write_checkpoint(tmp_path / "a", _reads_model(g))
    b = write_checkpoint(tmp_path / "b", _reads_model(g))
    store = tmp_path / "merged.zarr"
    code, _, err = run_cli("run", write_yaml(tmp_path / "m.yaml", _reads_linear(a, b)), store,
                           "--format", "zarr", "--memory-budget", "1MB", "--no-progress")
    assert code == 0, err
    chunk = store / "model.embed_tokens.weight" / "c"
    keys = sorted(p for p in chunk.rglob("*") if p.is_file())
    assert keys, "the Zarr output has no chunk files"
    victim = keys[len(keys) // 2]
    coords = ".".join(victim.relative_to(chunk).parts)
    victim.unlink()
    before = _tree(store)
    out = tmp_path / "out"
    code, _, err = run_cli("run", write_yaml(tmp_path / "n.yaml", _reads_linear(store, a)), out, "--no-progress")
    assert code == 1
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert f"{store}/model.embed_tokens.weight: chunk {coords} is missing" in line
    assert "the store is damaged" in line
    assert not (out / "moemerge-manifest.json").exists()  # no finished-looking output
    assert _tree(store) == before  # the input is untouched


def test_zarr_input_missing_chunk_direct_read_names_array_and_chunk(tmp_path: Path) -> None:
    from moemerge import api

    g = _gen()
    a = write_checkpoint(tmp_path / "a", _reads_model(g))
    b = write_checkpoint(tmp_path / "b", _reads_model(g))
    store = tmp_path / "m.zarr"
    api.run(_reads_linear(a, b), str(store), out_format="zarr", chunk_rows=8, progress=False)
    (store / "model.layers.0.mlp.experts.w1" / "c" / "1" / "0" / "0").unlink()
    ck = Checkpoint.open(str(store))
    try:
        t = ck.tensors["model.layers.0.mlp.experts.w1"]
        ck.read_rows(t.name, 0, 6, memoryview(bytearray(t.nbytes)))  # chunk 0: present
        with pytest.raises(OSError, match=r"m\.zarr/model\.layers\.0\.mlp\.experts\.w1: chunk 1\.0\.0 is missing"):
            ck.read_rows(t.name, 0, t.rows, memoryview(bytearray(t.nbytes)))
    finally:
        ck.close()


def _pma_setup(tmp_path: Path, run_cli) -> tuple[Path, Path, str, torch.Generator]:
    g = _gen()
    ckpt = tmp_path / "ckpt"
    for step in (10, 20, 30):
        write_checkpoint(ckpt / f"step-{step:08d}", _reads_model(g), shards=2)
    state, out = tmp_path / "state", tmp_path / "avg"
    code, _, err = run_cli("pma", "update", state, str(ckpt / "step-*"), "-o", out, "--method", "sma",
                           "--last", "3", "--memory-budget", "1MB", "--no-progress")
    assert code == 0, err
    write_checkpoint(ckpt / f"step-{40:08d}", _reads_model(g), shards=2)
    return state, out, str(ckpt / "step-*"), g


def _state_version(state: Path) -> Path:
    return state / json.loads((state / POINTER_NAME).read_text())["path"]


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_pma_state_with_a_damaged_chunk_fails_the_update_and_keeps_the_state(tmp_path: Path, run_cli,
                                                                           damage: str) -> None:
    state, out, pattern, _ = _pma_setup(tmp_path, run_cli)
    version = _state_version(state)
    pointer = (state / POINTER_NAME).read_bytes()
    chunks = sorted(p for p in (version / "S%3Amodel.embed_tokens.weight" / "c").rglob("*") if p.is_file())
    victim = chunks[-1]
    coords = ".".join(victim.relative_to(version / "S%3Amodel.embed_tokens.weight" / "c").parts)
    if damage == "delete":
        victim.unlink()
    else:  # same size, one byte different: only the recorded checksum can tell
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
    before, out_before = _tree(state), _tree(out)
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--memory-budget", "1MB", "--no-progress")
    assert code == 1
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    what = "is missing" if damage == "delete" else "does not match the checksum"
    assert f"{version}/S%3Amodel.embed_tokens.weight: chunk {coords} {what}" in line, line
    assert "--recompute-every 1" in line and "new STATE" in line
    # the state is not changed: the pointer and every file of the named version as they were
    assert (state / POINTER_NAME).read_bytes() == pointer
    after = _tree(state)
    assert {k: v for k, v in after.items() if k.startswith(version.name + "/")} == \
        {k: v for k, v in before.items() if k.startswith(version.name + "/")}
    # the previous output is still there and verifies
    assert (out / "moemerge-manifest.json").exists()
    code, _, err = run_cli("verify", out)
    assert code == 0, err
    # the documented way out works: recompute from the snapshots (reads no state sums)
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--recompute-every", "1",
                           "--memory-budget", "1MB", "--no-progress")
    assert code == 0, err
    assert (state / POINTER_NAME).read_bytes() != pointer


def test_state_manifest_records_a_checksum_per_chunk(tmp_path: Path, run_cli) -> None:
    state, _, _, _ = _pma_setup(tmp_path, run_cli)
    version = _state_version(state)
    man = json.loads((version / "moemerge-manifest.json").read_text())
    chunks = {str(p.relative_to(version)) for p in version.rglob("*")
              if p.is_file() and "/c/" in str(p.relative_to(version)) + "/"}
    assert set(man["chunk_checksums"]) == chunks


# -- row 6: `--overwrite` deletes the old merge before the new one succeeds ------------------------

N = 12


@pytest.fixture
def ow_inputs(tmp_path: Path) -> list[Path]:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return [write_checkpoint(tmp_path / f"m{i}", {f"model.layers.{k}.w": torch.randn(32, 16 + k, generator=g)
                                                  for k in range(N)}, shards=2)
            for i in range(2)]


def _ow_cfg(tmp_path: Path, inputs: list[Path], w: float, name: str = "c.yml") -> Path:
    return write_yaml(tmp_path / name, {
        "merge_method": "linear",
        "models": [{"model": str(inputs[0]), "parameters": {"weight": w}},
                   {"model": str(inputs[1]), "parameters": {"weight": 1 - w}}]})


def _ow_files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    """Leftovers of an overwrite beside `out` (the lock file is another helper's business)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(out.name + ".moemerge-") and "lock" not in p.name and "lease" not in p.name)


def _fail_on_write(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    real = LocalModelWriter.write_rows
    seen = [0]

    def failing(self, name, row_start, data):
        seen[0] += 1
        if seen[0] == calls:
            raise OutputError(f"{self.url}: simulated failure while writing `{name}`")
        return real(self, name, row_start, data)

    monkeypatch.setattr(LocalModelWriter, "write_rows", failing)


@pytest.fixture
def finished(tmp_path: Path, ow_inputs: list[Path], run_cli) -> tuple[Path, dict[str, str]]:
    """A finished output at tmp_path/out (weight 0.3), and its files' hashes."""
    out = tmp_path / "out"
    code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), out, "--no-progress")
    assert code == 0, err
    return out, _ow_files(out)


def _inputs_unchanged(inputs: list[Path], before: list[dict[str, str]]) -> None:
    assert [_ow_files(p) for p in inputs] == before


def test_failed_overwrite_keeps_the_old_output_and_a_good_one_replaces_it(
        tmp_path, ow_inputs, finished, run_cli, monkeypatch):
    out, old = finished
    before = [_ow_files(p) for p in ow_inputs]
    cfg2 = _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml")
    with monkeypatch.context() as m:
        _fail_on_write(m, N // 2)
        code, _, err = run_cli("run", cfg2, out, "--overwrite", "--no-progress")
    assert code == 1 and "simulated failure" in err and "Traceback" not in err
    assert _ow_files(out) == old  # byte-identical, still verifying
    assert verify(str(out)) == N
    assert _siblings(out) == ["out.moemerge-new"]  # the unfinished new one, for --resume --overwrite
    _inputs_unchanged(ow_inputs, before)

    code, _, err = run_cli("run", cfg2, out, "--overwrite", "--no-progress")
    assert code == 0, err
    assert _siblings(out) == []
    assert verify(str(out)) == N
    clean = tmp_path / "clean"
    assert run_cli("run", cfg2, clean, "--no-progress")[0] == 0
    new = _ow_files(out)
    assert {k: v for k, v in new.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in _ow_files(clean).items() if k.endswith(".safetensors")} != \
        {k: v for k, v in old.items() if k.endswith(".safetensors")}
    _inputs_unchanged(ow_inputs, before)


def test_resume_overwrite_continues_the_unfinished_new_output(tmp_path, ow_inputs, finished, run_cli, monkeypatch):
    out, old = finished
    cfg2 = _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml")
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY_TENSORS", 1, raising=False)
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1, raising=False)
    with monkeypatch.context() as m:
        _fail_on_write(m, N - 2)
        assert run_cli("run", cfg2, out, "--overwrite", "--no-progress")[0] == 1
    assert _ow_files(out) == old
    code, _, err = run_cli("run", cfg2, out, "--overwrite", "--resume", "--no-progress")
    assert code == 0, err
    assert _siblings(out) == [] and verify(str(out)) == N
    assert _ow_files(out)[MANIFEST] != old[MANIFEST]


def test_sigkill_during_overwrite_keeps_the_old_output(tmp_path, ow_inputs, finished, run_cli):
    out, old = finished
    cfg2 = _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from moemerge.io.writer import LocalModelWriter
        real, seen = LocalModelWriter.write_rows, [0]
        def kill(self, *a):
            seen[0] += 1
            if seen[0] == {N // 2}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a)
        LocalModelWriter.write_rows = kill
        from moemerge.cli import main
        sys.exit(main(["run", {str(cfg2)!r}, {str(out)!r}, "--overwrite", "--no-progress"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).parent.parent))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _ow_files(out) == old and verify(str(out)) == N
    # the next run without --overwrite refuses (OUT is finished) and changes nothing
    code, _, err = run_cli("run", cfg2, out, "--no-progress")
    assert code == 1 and "already holds a finished merge" in err
    assert _ow_files(out) == old


@pytest.mark.parametrize("exchange", [False, True], ids=["two-renames", "exchange"])
def test_kill_inside_the_swap_leaves_a_state_the_next_run_fixes(
        tmp_path, ow_inputs, finished, run_cli, monkeypatch, exchange):
    out, old = finished
    cfg2 = _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml")
    if not exchange:
        monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    elif swap._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    real, seen = swap._rename, [0]

    def cut(src: str, dst: str) -> None:
        seen[0] += 1
        if seen[0] == (2 if not exchange else 1):  # between the renames / right after the exchange
            raise KeyboardInterrupt
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(swap, "_rename", cut)
        code, _, err = run_cli("run", cfg2, out, "--overwrite", "--no-progress")
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    if not exchange:  # OUT is gone for a moment: verify says so instead of "not a model"
        assert not out.exists() and _siblings(out) == ["out.moemerge-new", "out.moemerge-old"]
        code, _, err = run_cli("verify", out)
        assert code == 1 and "is unfinished" in err
        # the next run completes the swap with a note, then refuses (OUT is finished again)
        code, _, err = run_cli("run", cfg2, out, "--no-progress")
        assert code == 1 and "already holds a finished merge" in err, err
        assert "note:" in err and "completed an overwrite" in err
        assert _siblings(out) == [] and verify(str(out)) == N
    else:  # OUT already holds the new output; the old one waits beside it under the staging name
        assert verify(str(out)) == N and _siblings(out) == ["out.moemerge-new"]
        code, _, err = run_cli("run", cfg2, out, "--overwrite", "--no-progress")
        assert code == 0 and "note:" in err and "removed" in err, err
        assert _siblings(out) == [] and verify(str(out)) == N
    clean = tmp_path / "clean"
    assert run_cli("run", cfg2, clean, "--no-progress")[0] == 0
    shards = [k for k in _ow_files(clean) if k.endswith(".safetensors")]
    assert {k: _ow_files(out)[k] for k in shards} == {k: _ow_files(clean)[k] for k in shards}  # the new one


def test_zarr_failed_overwrite_keeps_the_old_store(tmp_path, ow_inputs, run_cli, monkeypatch):
    from moemerge.io.zarr_writer import ZarrModelWriter

    out = tmp_path / "z"
    assert run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), out, "--format", "zarr", "--no-progress")[0] == 0
    tree = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, seen = ZarrModelWriter.write_rows, [0]

    def failing(self, name, row_start, data):
        seen[0] += 1
        if seen[0] == N // 2:
            raise OutputError(f"{self.url}: simulated failure")
        return real(self, name, row_start, data)

    cfg2 = _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml")
    with monkeypatch.context() as m:
        m.setattr(ZarrModelWriter, "write_rows", failing)
        code, _, err = run_cli("run", cfg2, out, "--format", "zarr", "--overwrite", "--no-progress")
    assert code == 1 and "simulated failure" in err
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == tree
    code, _, err = run_cli("run", cfg2, out, "--format", "zarr", "--overwrite", "--no-progress")
    assert code == 0, err
    assert _siblings(out) == []
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} != tree
    code, _, err = run_cli("export", out, tmp_path / "hf")
    assert code == 0, err


@pytest.fixture
def s3_models(ckpt_factory, s3_server, monkeypatch):
    import boto3

    from moemerge.io import s3_writer, storage

    monkeypatch.setattr(s3_writer, "DEFAULT_PART_SIZE", s3_writer.S3_MIN_PART)
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(attempts=2, base_delay=0.0))
    boto3.client("s3").create_bucket(Bucket="out")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return [ckpt_factory(f"s{i}", {f"t{k}": torch.randn(64, 32, generator=g) for k in range(6)})
            for i in range(2)]


def _ow_objects(prefix: str) -> dict[str, str]:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    try:
        found = fs.find(prefix)
    except FileNotFoundError:
        return {}
    return {p: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(found)}


def test_s3_failed_overwrite_keeps_the_old_output(tmp_path, s3_models, run_cli, monkeypatch):
    from moemerge.io.s3_writer import RemoteModelWriter

    cfg1, cfg2 = _ow_cfg(tmp_path, s3_models, 0.3), _ow_cfg(tmp_path, s3_models, 0.8, "c2.yml")
    assert run_cli("run", cfg1, "s3://out/m", "--no-progress")[0] == 0
    old = _ow_objects("out/m")
    real, seen = RemoteModelWriter.write_rows, [0]

    def failing(self, name, row_start, data):
        seen[0] += 1
        if seen[0] == 3:
            raise OutputError(f"{self.url}: simulated failure")
        return real(self, name, row_start, data)

    with monkeypatch.context() as m:
        m.setattr(RemoteModelWriter, "write_rows", failing)
        code, _, err = run_cli("run", cfg2, "s3://out/m", "--overwrite", "--no-progress")
    assert code == 1 and "simulated failure" in err
    assert _ow_objects("out/m") == old and _ow_objects("out/m.moemerge-new") == {}
    # a commit cut short (copy fails half way): OUT unfinished, the next run completes it
    calls = [0]
    real_copy = swap._copy

    def flaky_copy(fs, src, dst):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("simulated outage")
        return real_copy(fs, src, dst)

    with monkeypatch.context() as m:
        m.setattr(swap, "_copy", flaky_copy)
        code, _, err = run_cli("run", cfg2, "s3://out/m", "--overwrite", "--no-progress")
    assert code == 1 and "cut short" in err, err
    assert "out/m/" + MANIFEST not in _ow_objects("out/m")  # not finished-looking while mixed
    code, _, err = run_cli("run", cfg2, "s3://out/m", "--no-progress")
    assert code == 1 and "completed an overwrite" in err and "already holds a finished merge" in err, err
    assert _ow_objects("out/m.moemerge-new") == {}
    assert run_cli("run", cfg2, tmp_path / "local", "--no-progress")[0] == 0
    new = _ow_objects("out/m")
    for f in (tmp_path / "local").glob("*.safetensors"):
        assert new[f"out/m/{f.name}"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert set(p.rsplit("/", 1)[-1] for p in new) == {p.name for p in (tmp_path / "local").iterdir()}


# -- row 7: out-of-range parameters silently clamped -----------------------------------------------

def _tensors(seed: int, nan: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.layers.0.mlp.w.weight": torch.randn(16, 8, generator=g),
        "model.layers.1.mlp.w.weight": torch.randn(16, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g) + 1,
    }
    if nan:
        t["model.layers.1.mlp.w.weight"][3, 5] = float("nan")
    return t


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture
def three(ckpt_factory) -> dict[str, Path]:
    return {n: ckpt_factory(n, _tensors(i + 7)) for i, n in enumerate(("base", "a", "b"))}


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("density", [1.5, -1])
def test_density_out_of_range_is_refused_before_any_output(three, tmp_path, run_cli, method, density):
    before = {n: _digests(p) for n, p in three.items()}
    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": method, "base_model": str(three["base"]),
        "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0, "density": density}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    })
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 1
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    for part in (method, "`density`", repr(float(density)) if isinstance(density, float) else str(density),
                 "[0, 1]", str(three["a"]), "models[0].parameters.density"):
        assert part in line, (part, line)
    assert not out.exists()  # nothing written, not even the directory
    assert {n: _digests(p) for n, p in three.items()} == before


def test_density_zero_and_one_are_accepted_and_zero_gives_the_base(three, tmp_path, run_cli):
    from safetensors.torch import load_file

    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": "ties", "base_model": str(three["base"]),
        "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0, "density": 0}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0, "density": 0.0}}],
    })
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    base = load_file(str(three["base"] / "model.safetensors"))
    assert all(torch.equal(got[k], base[k]) for k in base)
    assert run_cli("verify", tmp_path / "out")[0] == 0


def test_one_bad_gradient_entry_is_named(three, tmp_path, run_cli):
    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": "ties", "base_model": str(three["base"]),
        "parameters": {"density": [0.2, 0.5, 1.25, 0.7]},
        "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0}}],
    })
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 1 and "Traceback" not in err
    assert "`parameters.density[2]`" in err and "1.25" in err and "[0, 1]" in err
    assert "layer gradient [0.2, 0.5, 1.25, 0.7]" in err and "every model" in err
    assert not (tmp_path / "out").exists()


def test_filter_rule_value_out_of_range_is_named(three):
    doc = {"merge_method": "slerp", "base_model": str(three["base"]),
           "parameters": {"t": [{"filter": "mlp", "value": 1.2}, {"value": 0.5}]},
           "models": [{"model": str(three["base"])}, {"model": str(three["a"])}]}
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert "`parameters.t[0].value`" in str(e.value) and "tensors matching 'mlp'" in str(e.value)
    assert "slerp" in str(e.value) and "[0, 1]" in str(e.value) and "1.2" in str(e.value)


def test_all_problems_are_reported_at_once(three):
    doc = {"merge_method": "della", "base_model": str(three["base"]),
           "parameters": {"lambda": 1.0, "normalize": 3},
           "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0, "density": 2, "epsilon": -0.1}},
                      {"model": str(three["b"]), "parameters": {"weight": 1.0, "density": [0.5, -0.5]}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    msg = str(e.value)
    assert msg.count("\n") == 4, msg  # one line each: density, epsilon, normalize, the gradient entry
    assert "`models[1].parameters.density[1]`" in msg and "`parameters.normalize`" in msg


def _neighbours(r: Interval, integer: bool) -> tuple[list[float], list[float]]:
    """(values just inside, values just outside) an interval's ends."""
    inside, outside = [], []
    for end, open_, sign in ((r.lo, r.lo_open, -1), (r.hi, r.hi_open, 1)):
        if end is None:
            inside.append(sign * 10**6)
            continue
        step = 1 if integer else max(1e-6, abs(end) * 1e-6)
        inside.append(end - sign * step if open_ else end)
        outside.append(end if open_ else end + sign * step)
    if integer:
        outside.append(inside[0] + 0.5)  # not an integer
    return inside, outside


_CASES = [(m.name, p.name) for m in REGISTRY.values() for p in m.params if p.kind != "bool"]


def _doc(method_name: str, param: str, value: float, paths: dict[str, Path]) -> dict:
    method = REGISTRY[method_name]
    spec = method.spec(param)
    assert spec is not None
    n = max(2, method.min_inputs)
    if method.max_inputs is not None:
        n = min(n, method.max_inputs)
    names = ["a", "b"][:n] if n <= 2 else ["a", "b", "base"][:n]
    models = [{"model": str(paths[x]), "parameters": {}} for x in names]
    params: dict = {}
    for m in models:  # required per-model parameters, e.g. weight
        for s in method.params:
            if s.scope == "model" and s.default is None:
                m["parameters"][s.name] = 1.0
    for s in method.params:
        if s.scope == "global" and s.default is None:
            params[s.name] = 0.5
    if spec.scope == "model":
        models[0]["parameters"][param] = value
    else:
        params[param] = value
    doc = {"merge_method": method_name, "models": models, "parameters": params}
    if method.base != "none":
        doc["base_model"] = str(paths["base"])
    return doc


@pytest.mark.parametrize(("method_name", "param"), _CASES, ids=[f"{m}-{p}" for m, p in _CASES])
def test_every_declared_range_is_enforced(method_name, param, tmp_path):
    """Parametrized over the registry: just outside a declared range, NaN and Inf are refused
    naming method, parameter and range; just inside is accepted."""
    paths = {n: tmp_path / n for n in ("base", "a", "b")}  # parse_config does not open them
    spec = REGISTRY[method_name].spec(param)
    assert spec is not None
    inside, outside = _neighbours(spec.range, spec.kind == "int")
    for v in inside:
        parse_config(_doc(method_name, param, v, paths))
    for v in [*outside, float("nan"), float("inf"), -float("inf")]:
        with pytest.raises(ConfigError) as e:
            parse_config(_doc(method_name, param, v, paths))
        msg = str(e.value)
        assert param in msg and "\n" not in msg, msg
        if math.isfinite(v):
            assert f"{method_name} parameter `{param}`" in msg and str(spec.range) in msg, msg


def test_resolved_values_are_checked_per_tensor(three):
    """A config built in code (not parsed) is still checked per resolved tensor value."""
    from moemerge.api import plan
    from moemerge.config import Gradient, MergeConfig, ModelSpec
    from moemerge.errors import PlanError

    cfg = MergeConfig(merge_method="ties", base_model=str(three["base"]),
                      models=(ModelSpec(model=str(three["a"]), parameters={"weight": 1.0, "density": Gradient((0.5, 3.0))}),
                              ModelSpec(model=str(three["b"]), parameters={"weight": 1.0})))
    with pytest.raises(PlanError) as e:
        plan(cfg)
    msg = str(e.value)
    assert "model.layers.1.mlp.w.weight" in msg and "density" in msg and "[0, 1]" in msg and str(three["a"]) in msg


def test_pma_options_out_of_range(three, tmp_path, run_cli):
    snaps = [str(three[n]) for n in ("base", "a", "b")]
    for flags, needle in ((["--method", "ema", "--alpha", "1.5"], "--alpha"),
                          (["--method", "ema", "--alpha", "0"], "--alpha"),
                          (["--method", "ema", "--alpha", "nan"], "alpha"),
                          (["--last", "0"], "--last"),
                          (["--weights", "1,nan,1"], "--weights"),
                          (["--weights", "1,inf,1"], "--weights")):
        code, _, err = run_cli("pma", *snaps, "-o", tmp_path / "pout", "--no-progress", *flags)
        assert code != 0 and needle in err and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "pout").exists()


# -- row 8: a duplicated key in the index ----------------------------------------------------------

def test_duplicate_key_in_index_is_refused(tmp_path: Path, run_cli) -> None:
    g = _gen()
    a = write_checkpoint(tmp_path / "a", _reads_model(g), shards=2)
    b = write_checkpoint(tmp_path / "b", _reads_model(g), shards=2)
    index = a / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    wmap = doc["weight_map"]
    dup, other = "model.norm.weight", next(f for f in set(wmap.values()) if f != wmap["model.norm.weight"])
    # the same tensor listed twice, pointing at two shards: JSON would let the last one win
    body = ", ".join(f'"{k}": "{v}"' for k, v in wmap.items()) + f', "{dup}": "{other}"'
    index.write_text('{"metadata": {"total_size": 1}, "weight_map": {' + body + "}}")
    _reads_refused(run_cli, tmp_path, a, b, f"{a}/model.safetensors.index.json: names `{dup}` twice")


# -- row 9: resource exhaustion from inputs --------------------------------------------------------

def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, run_cli) -> None:
    g = _gen()
    a = write_checkpoint(tmp_path / "a", _reads_model(g))
    b = write_checkpoint(tmp_path / "b", _reads_model(g))
    lines = ["storage_options:", '  x0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines += ["merge_method: linear", "models:",
              f"  - model: {a}", "    parameters: {weight: 0.5}",
              f"  - model: {b}", "    parameters: {weight: 0.5}"]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, _, err = run_cli("run", cfg, out, "--no-progress")
    took = time.monotonic() - t0
    assert code == 1
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert f"{cfg}: YAML aliases expand this config to more than 100,000 values" in line
    assert took < 2.0, f"took {took:.1f} s"
    assert not out.exists()


def test_recursive_yaml_alias_is_refused(tmp_path: Path, run_cli) -> None:
    cfg = tmp_path / "rec.yaml"
    cfg.write_text("merge_method: linear\nstorage_options: &s\n  x: [*s]\nmodels: []\n")
    code, _, err = run_cli("plan", cfg)
    assert code == 1
    assert "recursive alias" in err and "\n" not in err.strip()


def test_oversized_config_json_is_refused_before_it_is_read(tmp_path: Path, run_cli) -> None:
    from moemerge.io.limits import MAX_JSON_BYTES

    g = _gen()
    a = write_checkpoint(tmp_path / "a", _reads_model(g))
    b = write_checkpoint(tmp_path / "b", _reads_model(g))
    big = a / "config.json"
    with open(big, "wb") as f:  # valid JSON, 1 MB over the limit
        f.write(b'{"model_type": "test"}')
        f.write(b" " * (MAX_JSON_BYTES + 1_000_000))
    size = big.stat().st_size
    _reads_refused(run_cli, tmp_path, a, b,
                   f"{a}/config.json: is {size / 1e6:.2f} MB, above the 64.00 MB limit for config.json")


def test_oversized_tokenizer_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.errors import CheckpointError
    from moemerge.io import limits
    from moemerge.io.sidefiles import read_side_files

    monkeypatch.setattr(limits, "MAX_TOKENIZER_BYTES", 1000)
    (tmp_path / "tokenizer.json").write_bytes(b"{}" + b" " * 2000)
    (tmp_path / "config.json").write_text("{}")
    assert read_side_files(str(tmp_path), None, model=True, tokenizer=False) == {"config.json": b"{}"}
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: is 2.00 KB, above the 1.00 KB limit"):
        read_side_files(str(tmp_path), None, model=False, tokenizer=True)


def _many_tensor_checkpoint(path: Path, n: int, seed: int) -> Path:
    """A safetensors file of `n` F32 tensors of shape [2], its header written directly (torch
    takes minutes for a million tensors)."""
    import struct

    import numpy as np

    path.mkdir(parents=True)
    entries = ",".join(f'"t.{i}":{{"dtype":"F32","shape":[2],"data_offsets":[{8 * i},{8 * i + 8}]}}'
                       for i in range(n))
    body = ("{" + entries + "}").encode()
    body += b" " * ((-(8 + len(body))) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.write(np.random.default_rng(seed).standard_normal(2 * n).astype(np.float32).tobytes())
    (path / "config.json").write_text('{"model_type": "test"}')
    return path


def test_too_many_tensors_are_refused_at_header_parse(tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.io import limits

    monkeypatch.setattr(limits, "MAX_TENSORS", 1000)  # the real limit is 500,000: see the slow test
    seed = random.SystemRandom().randrange(2**31)
    a = _many_tensor_checkpoint(tmp_path / "a", 1001, seed)
    b = _many_tensor_checkpoint(tmp_path / "b", 1001, seed + 1)
    _reads_refused(run_cli, tmp_path, a, b,
                   f"{a}/model.safetensors: holds 1,001 tensors, above moemerge's limit of 1,000 per checkpoint")
    monkeypatch.setattr(limits, "MAX_TENSORS", 1001)  # at the limit: planned
    code, _, err = run_cli("plan", write_yaml(tmp_path / "m.yaml", _reads_linear(a, b)))
    assert code == 0, err


@pytest.mark.slow
def test_two_million_tiny_tensors_are_refused_fast_and_small(tmp_path: Path) -> None:
    """2 x 1M tensors: refused in seconds and well under 1 GB (was 451 s and 4.0 GB)."""
    a = _many_tensor_checkpoint(tmp_path / "a", 1_000_000, 1)
    b = _many_tensor_checkpoint(tmp_path / "b", 1_000_000, 2)
    cfg = write_yaml(tmp_path / "m.yaml", _reads_linear(a, b))
    code = ("import resource, sys\nfrom moemerge.cli import main\nrc = main(['plan', sys.argv[1]])\n"
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "holds 1,000,000 tensors, above moemerge's limit of 500,000 per checkpoint" in proc.stderr
    rss_kb = int(proc.stdout.split("maxrss_kb")[1].split()[0])
    assert rss_kb < 1_000_000, f"{rss_kb} KB"


# -- row 10: the Dask dashboard listens on 0.0.0.0 -------------------------------------------------

def test_parse_dashboard():
    from moemerge.engine.cluster import parse_dashboard

    assert parse_dashboard(None) == "127.0.0.1:0"
    assert parse_dashboard("off") is None
    assert parse_dashboard(":8787") == "127.0.0.1:8787"
    assert parse_dashboard("0.0.0.0:8787") == "0.0.0.0:8787"
    with pytest.raises(ConfigError, match="--dashboard"):
        parse_dashboard("everywhere")


def test_local_cluster_listens_on_loopback_only():
    import psutil
    from urllib.parse import urlparse

    from moemerge.engine.cluster import start_client

    client, cluster = start_client(workers=1, scheduler=None, memory_budget=64 << 20)
    try:
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        assert urlparse(cluster.scheduler_address).hostname == "127.0.0.1"
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = [c.laddr for p in procs for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening
        assert all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    finally:
        client.close()
        cluster.close()
    client, cluster = start_client(workers=1, scheduler=None, memory_budget=64 << 20, dashboard="off")
    try:
        assert cluster.scheduler_spec["options"]["dashboard"] is False
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        assert all(c.laddr.ip in ("127.0.0.1", "::1") for p in procs for c in p.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN)
    finally:
        client.close()
        cluster.close()


# -- row 11: multipart uploads left open -----------------------------------------------------------

def _start_upload(key: str, bucket: str = "out") -> str:
    s3 = boto3.client("s3")
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=1, Body=b"x" * (5 << 20))
    return up


def test_stale_uploads_under_the_prefix_are_aborted_with_a_note(models, tmp_path, run_cli):
    _start_upload("merged/model-00001-of-00003.safetensors")
    _start_upload("merged/sub/left.safetensors")
    _start_upload("merged2/other.safetensors")  # a sibling prefix: not ours
    _start_upload("elsewhere/x.safetensors")
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    assert code == 0, err
    assert "aborted 2 unfinished uploads under s3://out/merged/ left by an earlier run" in err
    left = sorted(u["Key"] for u in _open_uploads("out"))
    assert left == ["elsewhere/x.safetensors", "merged2/other.safetensors"]
    assert MANIFEST in _objects(models["fs"], "out/merged")
    assert run_cli("verify", "s3://out/merged")[0] == 0


@pytest.mark.parametrize("fault", ["outage", "interrupt"])
def test_failed_or_interrupted_run_leaves_no_open_upload(fault, models, tmp_path, run_cli, monkeypatch):
    real = s3fs.S3FileSystem.call_s3
    aborts: list[str] = []

    def flaky(self, method, *args, **kw):
        if method == "upload_part" and kw.get("PartNumber") == 2:
            if fault == "interrupt":
                raise KeyboardInterrupt()
            raise PermissionError("injected: S3 outage")
        if method == "abort_multipart_upload" and not aborts:
            aborts.append(kw["Key"])  # the first abort fails too (the outage goes on)
            raise ConnectionResetError("injected: abort failed")
        return real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", flaky)
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress", "--shard-size", "4MB")
    assert code == (130 if fault == "interrupt" else 1), err
    assert "Traceback" not in err
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", real)
    assert aborts  # the sink's own abort failed ...
    assert _open_uploads("out") == []  # ... and the sweep after the failure caught it
    assert not {INDEX, MANIFEST} & set(_objects(models["fs"], "out/merged"))


# -- row 12: unclear errors (signals, messages, free space, verify, NaN/Inf, storage_options) ------

def _interrupt_at_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving after the index was written, before the manifest."""
    real = writer_mod.atomic_write

    def cut(path: str, data: bytes) -> None:
        if path.endswith(MANIFEST):
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(writer_mod, "atomic_write", cut)


def test_sigint_during_the_commit_says_the_index_is_there(tmp_path, ow_inputs, run_cli, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_at_manifest(m)
        code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), out, "--no-progress")
    assert code == 130
    assert (out / INDEX).exists() and not (out / MANIFEST).exists()
    assert err.count("\n") == 1 and "has its index but no manifest" in err and "not finished" in err, err
    assert "no index or manifest" not in err
    code, _, err = run_cli("verify", out)
    assert code == 1 and "is unfinished (a run was interrupted or is still running); rerun with --resume" in err
    code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), out, "--resume", "--no-progress")
    assert code == 0, err
    assert verify(str(out)) == N


def test_sigint_during_an_overwrite_says_the_old_output_is_untouched(
        tmp_path, ow_inputs, finished, run_cli, monkeypatch):
    out, old = finished
    with monkeypatch.context() as m:
        _interrupt_at_manifest(m)
        code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml"), out, "--overwrite", "--no-progress")
    assert code == 130
    assert f"the previous output at {out} is untouched" in err and err.count("\n") == 1, err
    assert _ow_files(out) == old and verify(str(out)) == N
    code, _, err = run_cli("verify", f"{out}.moemerge-new")
    assert code == 1 and "is unfinished" in err


def test_verify_on_an_unfinished_output_says_unfinished(tmp_path, ow_inputs, run_cli, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_on_write(m, 3)
        assert run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), out, "--no-progress")[0] == 1
    code, _, err = run_cli("verify", out)
    assert code == 1
    assert f"{out} is unfinished (a run was interrupted or is still running); rerun with --resume" in err
    assert "Hugging Face" not in err


def test_free_space_is_checked_before_anything_is_written(tmp_path, ow_inputs, finished, run_cli, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    fresh = tmp_path / "fresh"
    code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), fresh, "--no-progress")
    assert code == 1 and "the output needs" in err and "1,000 bytes) free" in err, err
    assert err.count("\n") == 1
    assert not fresh.exists()
    # overwriting keeps the old output until the swap: the new one needs its full size too
    out, old = finished
    code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.8, "c2.yml"), out, "--overwrite", "--no-progress")
    assert code == 1 and "the output needs" in err
    assert _ow_files(out) == old and _siblings(out) == []
    monkeypatch.setattr(space.shutil, "disk_usage", real)
    code, _, err = run_cli("run", _ow_cfg(tmp_path, ow_inputs, 0.3), fresh, "--no-progress")
    assert code == 0, err


def test_sigterm_is_one_line_exit_143_and_cleans_up(tmp_path, ow_inputs, run_cli):
    out = tmp_path / "out"
    started = tmp_path / "started"
    cfg = _ow_cfg(tmp_path, ow_inputs, 0.3)
    script = textwrap.dedent(f"""
        import sys, time
        from moemerge.io.writer import LocalModelWriter
        real = LocalModelWriter.write_rows
        def slow(self, *a):
            open({str(started)!r}, "w").close()
            time.sleep(0.5)
            return real(self, *a)
        LocalModelWriter.write_rows = slow
        from moemerge.cli import main
        sys.exit(main(["run", {str(cfg)!r}, {str(out)!r}, "--no-progress"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(Path(__file__).parent.parent))
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("moemerge: terminated") and "not finished" in err
    assert not (out / MANIFEST).exists()
    assert not list(tmp_path.glob(".out.moemerge-lock*"))  # the lock went with the job
    # nothing holds OUT: the next run proceeds at once and finishes
    code, _, err = run_cli("run", cfg, out, "--resume", "--no-progress")
    assert code == 0, err
    assert verify(str(out)) == N


_STAT_METHODS = {
    "slerp": {"parameters": {"t": 0.5}, "models": [("base", {}), ("nan", {})]},
    "nuslerp": {"models": [("a", {"weight": 1.0}), ("nan", {"weight": 1.0})]},
    "model_stock": {"models": [("a", {}), ("nan", {})]},
    "ties": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "dare_linear": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "breadcrumbs": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "della": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "sce": {"parameters": {"select_topk": 0.5}, "models": [("a", {}), ("nan", {})]},
    "multislerp": {"models": [("a", {"weight": 1.0}), ("nan", {"weight": 1.0})]},
    "karcher": {"models": [("a", {}), ("nan", {})]},
}


@pytest.mark.parametrize("method", sorted(_STAT_METHODS))
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_statistics_methods_refuse_nan_naming_tensor_and_model(method, chunk_rows, ckpt_factory, tmp_path,
                                                               run_cli):
    """Whole tensors (one read, every pass) through the CLI; streamed 2-row chunks via the API."""
    paths = {"base": ckpt_factory("base", _tensors(1)), "a": ckpt_factory("a", _tensors(2)),
             "nan": ckpt_factory("nan", _tensors(3, nan=True))}
    before = _digests(paths["nan"])
    spec = _STAT_METHODS[method]
    doc = {"merge_method": method, "parameters": spec.get("parameters", {}),
           "models": [{"model": str(paths[n]), "parameters": p} for n, p in spec["models"]]}
    if REGISTRY[method].base != "none":
        doc["base_model"] = str(paths["base"])
    cfg = write_yaml(tmp_path / "m.yml", doc)
    out = tmp_path / "out"
    if chunk_rows:
        import moemerge
        from moemerge.errors import MergeRuntimeError

        with pytest.raises(MergeRuntimeError) as e:  # the API raises; the CLI prints it as one line
            moemerge.run(str(cfg), str(out), chunk_rows=chunk_rows)
        err = str(e.value)
    else:
        code, _, err = run_cli("run", cfg, out, "--no-progress")
        assert code == 1 and err.startswith("moemerge: error:"), err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert "model.layers.1.mlp.w.weight" in line and str(paths["nan"]) in line and "NaN or Inf" in line
    assert method in line
    assert not (out / INDEX).exists() and not (out / MANIFEST).exists()  # nothing looks finished
    assert run_cli("verify", out)[0] != 0
    assert _digests(paths["nan"]) == before


def test_elementwise_methods_pass_nan_through(ckpt_factory, tmp_path, run_cli):
    from safetensors.torch import load_file

    a, n = ckpt_factory("a", _tensors(2)), ckpt_factory("nan", _tensors(3, nan=True))
    cfg = write_yaml(tmp_path / "m.yml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(n), "parameters": {"weight": 1.0}}]})
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))["model.layers.1.mlp.w.weight"]
    assert torch.isnan(got).sum() == 1 and torch.isnan(got[3, 5])


@pytest.mark.parametrize(("options", "needle"), [
    ({"client_kwargs": "notadict"}, "storage_options.client_kwargs"),
    ({"not_an_option": 1}, "storage_options.not_an_option"),
    ({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "bogus": 1}}, "client_kwargs.bogus"),
    ({"config_kwargs": {"retries": 3, "nope": 1}}, "storage_options.config_kwargs"),
    ({"anon": "yes"}, "storage_options.anon"),
])
def test_malformed_storage_options_are_one_line(options, needle, three, tmp_path, run_cli):
    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": "linear", "storage_options": options,
        "models": [{"model": "s3://nobucket/a", "parameters": {"weight": 1.0}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    code, stdout, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not out.exists() or not any(out.iterdir())
