"""One writer at a time (issue 11, rows 1 and 2): two jobs on one PMA state or one output, started
together, never both proceed; a dead holder's lock is taken over with a note, a live one refuses
and nothing changes; remote leases expire and are renewed; the state pointer is compare-and-swapped."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_checkpoint, write_yaml
from moemerge.errors import OutputError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import to_torch
from moemerge.io.lease import hold_lease, lock_location, take_lease
from moemerge.pma.state import POINTER_NAME, StateStore, array_name
from moemerge.pma.update import update
from moemerge.verify import verify

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "moemerge-manifest.json"
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


# -- row 1: two `pma update` on one state --------------------------------------------------------

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


# -- row 2: two `run`s into one output -----------------------------------------------------------

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


# -- stale and live locks --------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock_record(pid: int, host: str | None = None) -> str:
    return json.dumps({"owner": "ghost", "host": host or socket.gethostname(), "pid": pid,
                       "started": "2026-01-02T03:04:05Z", "command": "moemerge run", "token": "f" * 32})


def _linear(tmp_path: Path, ckpt_factory) -> Path:
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    a = ckpt_factory("a", {"w": torch.randn(32, 8, generator=g)})
    b = ckpt_factory("b", {"w": torch.randn(32, 8, generator=g)})
    return write_yaml(tmp_path / "merge.yml", {
        "merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                             {"model": str(b), "parameters": {"weight": 0.5}}]})


def test_a_dead_jobs_lock_is_taken_over_with_a_note(tmp_path: Path, ckpt_factory, run_cli) -> None:
    cfg = _linear(tmp_path, ckpt_factory)
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
    cfg = _linear(tmp_path, ckpt_factory)
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


# -- the pointer's compare-and-swap ----------------------------------------------------------------

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


# -- object storage: leases --------------------------------------------------------------------------

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
    cfg = _linear(tmp_path, ckpt_factory)
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
    lease = take_lease("s3://out/other", ttl=0.6, what="test")
    try:
        first = lease.holder.expires
        time.sleep(0.5)
        lease.check()
        assert lease.holder.expires > first  # renewed
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
