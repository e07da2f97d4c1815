"""`--resume` (DESIGN promise 5): a crashed or killed run continues and skips finished work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import moemerge
import moemerge.api
from moemerge.errors import MoemergeError, OutputError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.journal import JOURNAL_NAME
from moemerge.io.writer import LocalModelWriter
from moemerge.verify import verify
from tests.conftest import write_checkpoint

N_TENSORS = 24


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        tensors = {f"model.layers.{k}.mlp.weight": torch.randn(64, 48 + k, generator=g).to(torch.bfloat16)
                   for k in range(N_TENSORS)}
        out.append(write_checkpoint(tmp_path / f"m{i}", tensors, shards=3))
    return out


def _cfg(inputs: list[Path], w: float = 0.5) -> dict:
    return {"merge_method": "ties", "base_model": str(inputs[0]),
            "models": [{"model": str(p), "parameters": {"weight": w, "density": 0.4}} for p in inputs[1:]]}


def _journal(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / JOURNAL_NAME).read_text().splitlines() if ln.strip()]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _crash_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make the output writer fail on its `calls`-th write, as a full disk would."""
    real = LocalModelWriter.write_rows
    seen = [0]

    def failing(self, name, row_start, data):
        seen[0] += 1
        if seen[0] == calls:
            raise OutputError(f"{self.url}: simulated crash while writing `{name}`")
        return real(self, name, row_start, data)

    monkeypatch.setattr(LocalModelWriter, "write_rows", failing)


def test_resume_skips_what_the_crashed_run_finished(inputs: list[Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clean = moemerge.run(_cfg(inputs), str(tmp_path / "clean"), memory_budget="1MB")
    out = tmp_path / "out"
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1)  # journal after every tensor
    with monkeypatch.context() as m:
        _crash_after(m, N_TENSORS * 2 // 3)
        with pytest.raises(OutputError, match="simulated crash"):
            moemerge.run(_cfg(inputs), str(out), memory_budget="1MB")
    assert not (out / "moemerge-manifest.json").exists()
    done = {e["t"] for e in _journal(out)[1:]}
    assert 0 < len(done) < N_TENSORS, done

    read: list[str] = []
    real_read = Checkpoint.read_rows

    def spy(self, name, r0, r1, buf):
        read.append(name)
        return real_read(self, name, r0, r1, buf)

    monkeypatch.setattr(Checkpoint, "read_rows", spy)
    res = moemerge.run(_cfg(inputs), str(out), memory_budget="1MB", resume=True)
    assert read and not done & set(read)  # finished tensors were not read again
    assert set(read) == set(clean.checksums) - done
    assert _shards(out) == _shards(tmp_path / "clean")
    assert res.checksums == clean.checksums
    assert not (out / JOURNAL_NAME).exists()  # committed: nothing left to resume
    verify(str(out))


def test_resume_refuses_another_plans_output(inputs: list[Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1)
    with monkeypatch.context() as m:
        _crash_after(m, 5)
        with pytest.raises(OutputError):
            moemerge.run(_cfg(inputs), str(out), memory_budget="1MB")
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    with pytest.raises(MoemergeError, match="another plan"):
        moemerge.run(_cfg(inputs, w=0.7), str(out), memory_budget="1MB", resume=True)
    # refused before the output was laid out again: the crashed run's files are as they were
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()} == before
    # without --resume the same directory starts over, and finishes
    moemerge.run(_cfg(inputs, w=0.7), str(out), memory_budget="1MB")
    assert (out / "moemerge-manifest.json").exists()


def test_resume_is_refused_where_there_is_no_journal(inputs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(MoemergeError, match="--resume.*local"):
        moemerge.run(_cfg(inputs), str(tmp_path / "o.zarr"), out_format="zarr", resume=True)
    assert not (tmp_path / "o.zarr").exists()


_CHILD = textwrap.dedent("""
    import sys, time
    import moemerge.api
    from moemerge.io.writer import LocalModelWriter
    moemerge.api.JOURNAL_EVERY = 1
    real = LocalModelWriter.write_rows
    def slow(self, *a):  # slow enough for the test to kill it half way
        time.sleep(0.05)
        return real(self, *a)
    LocalModelWriter.write_rows = slow
    from moemerge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_run_resumes_from_the_cli(inputs: list[Path], tmp_path: Path, run_cli) -> None:
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_cfg(inputs)))
    out = tmp_path / "out"
    args = ["run", str(cfg), str(out), "--memory-budget", "1MB", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / JOURNAL_NAME).exists() and len(_journal(out)) > 4:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "moemerge-manifest.json").exists()
    code, _, err = run_cli(*args[:2], str(out), "--memory-budget", "1MB", "--no-progress", "--resume")
    assert code == 0, err
    code, _, err = run_cli("run", str(cfg), str(tmp_path / "clean"), "--memory-budget", "1MB", "--no-progress")
    assert code == 0, err
    assert _shards(out) == _shards(tmp_path / "clean")
    code, _, err = run_cli("verify", str(out))
    assert code == 0, err
