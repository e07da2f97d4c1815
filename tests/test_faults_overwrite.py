"""Issue 11 rows 6 and 12 (part): `--overwrite` never loses the old output; SIGTERM, interrupt
messages, free space and `verify` on unfinished outputs say what is on disk."""

from __future__ import annotations

import hashlib
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
from moemerge.errors import OutputError
from moemerge.io import space, swap
from moemerge.io import writer as writer_mod
from moemerge.io.writer import LocalModelWriter
from moemerge.verify import verify
from tests.conftest import write_checkpoint, write_yaml

MANIFEST = "moemerge-manifest.json"
INDEX = "model.safetensors.index.json"
N = 12


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return [write_checkpoint(tmp_path / f"m{i}", {f"model.layers.{k}.w": torch.randn(32, 16 + k, generator=g)
                                                  for k in range(N)}, shards=2)
            for i in range(2)]


def _cfg(tmp_path: Path, inputs: list[Path], w: float, name: str = "c.yml") -> Path:
    return write_yaml(tmp_path / name, {
        "merge_method": "linear",
        "models": [{"model": str(inputs[0]), "parameters": {"weight": w}},
                   {"model": str(inputs[1]), "parameters": {"weight": 1 - w}}]})


def _files(d: Path) -> dict[str, str]:
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
def finished(tmp_path: Path, inputs: list[Path], run_cli) -> tuple[Path, dict[str, str]]:
    """A finished output at tmp_path/out (weight 0.3), and its files' hashes."""
    out = tmp_path / "out"
    code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.3), out, "--no-progress")
    assert code == 0, err
    return out, _files(out)


def _inputs_unchanged(inputs: list[Path], before: list[dict[str, str]]) -> None:
    assert [_files(p) for p in inputs] == before


# -- row 6: --overwrite ---------------------------------------------------------------------------


def test_failed_overwrite_keeps_the_old_output_and_a_good_one_replaces_it(
        tmp_path, inputs, finished, run_cli, monkeypatch):
    out, old = finished
    before = [_files(p) for p in inputs]
    cfg2 = _cfg(tmp_path, inputs, 0.8, "c2.yml")
    with monkeypatch.context() as m:
        _fail_on_write(m, N // 2)
        code, _, err = run_cli("run", cfg2, out, "--overwrite", "--no-progress")
    assert code == 1 and "simulated failure" in err and "Traceback" not in err
    assert _files(out) == old  # byte-identical, still verifying
    assert verify(str(out)) == N
    assert _siblings(out) == ["out.moemerge-new"]  # the unfinished new one, for --resume --overwrite
    _inputs_unchanged(inputs, before)

    code, _, err = run_cli("run", cfg2, out, "--overwrite", "--no-progress")
    assert code == 0, err
    assert _siblings(out) == []
    assert verify(str(out)) == N
    clean = tmp_path / "clean"
    assert run_cli("run", cfg2, clean, "--no-progress")[0] == 0
    new = _files(out)
    assert {k: v for k, v in new.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in _files(clean).items() if k.endswith(".safetensors")} != \
        {k: v for k, v in old.items() if k.endswith(".safetensors")}
    _inputs_unchanged(inputs, before)


def test_resume_overwrite_continues_the_unfinished_new_output(tmp_path, inputs, finished, run_cli, monkeypatch):
    out, old = finished
    cfg2 = _cfg(tmp_path, inputs, 0.8, "c2.yml")
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY_TENSORS", 1, raising=False)
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1, raising=False)
    with monkeypatch.context() as m:
        _fail_on_write(m, N - 2)
        assert run_cli("run", cfg2, out, "--overwrite", "--no-progress")[0] == 1
    assert _files(out) == old
    code, _, err = run_cli("run", cfg2, out, "--overwrite", "--resume", "--no-progress")
    assert code == 0, err
    assert _siblings(out) == [] and verify(str(out)) == N
    assert _files(out)[MANIFEST] != old[MANIFEST]


def test_sigkill_during_overwrite_keeps_the_old_output(tmp_path, inputs, finished, run_cli):
    out, old = finished
    cfg2 = _cfg(tmp_path, inputs, 0.8, "c2.yml")
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
    assert _files(out) == old and verify(str(out)) == N
    # the next run without --overwrite refuses (OUT is finished) and changes nothing
    code, _, err = run_cli("run", cfg2, out, "--no-progress")
    assert code == 1 and "already holds a finished merge" in err
    assert _files(out) == old


@pytest.mark.parametrize("exchange", [False, True], ids=["two-renames", "exchange"])
def test_kill_inside_the_swap_leaves_a_state_the_next_run_fixes(
        tmp_path, inputs, finished, run_cli, monkeypatch, exchange):
    out, old = finished
    cfg2 = _cfg(tmp_path, inputs, 0.8, "c2.yml")
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
    shards = [k for k in _files(clean) if k.endswith(".safetensors")]
    assert {k: _files(out)[k] for k in shards} == {k: _files(clean)[k] for k in shards}  # the new one


def test_zarr_failed_overwrite_keeps_the_old_store(tmp_path, inputs, run_cli, monkeypatch):
    from moemerge.io.zarr_writer import ZarrModelWriter

    out = tmp_path / "z"
    assert run_cli("run", _cfg(tmp_path, inputs, 0.3), out, "--format", "zarr", "--no-progress")[0] == 0
    tree = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, seen = ZarrModelWriter.write_rows, [0]

    def failing(self, name, row_start, data):
        seen[0] += 1
        if seen[0] == N // 2:
            raise OutputError(f"{self.url}: simulated failure")
        return real(self, name, row_start, data)

    cfg2 = _cfg(tmp_path, inputs, 0.8, "c2.yml")
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


# -- row 12: messages, SIGTERM, free space, verify -------------------------------------------------


def _interrupt_at_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving after the index was written, before the manifest."""
    real = writer_mod.atomic_write

    def cut(path: str, data: bytes) -> None:
        if path.endswith(MANIFEST):
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(writer_mod, "atomic_write", cut)


def test_sigint_during_the_commit_says_the_index_is_there(tmp_path, inputs, run_cli, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_at_manifest(m)
        code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.3), out, "--no-progress")
    assert code == 130
    assert (out / INDEX).exists() and not (out / MANIFEST).exists()
    assert err.count("\n") == 1 and "has its index but no manifest" in err and "not finished" in err, err
    assert "no index or manifest" not in err
    code, _, err = run_cli("verify", out)
    assert code == 1 and "is unfinished (a run was interrupted or is still running); rerun with --resume" in err
    code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.3), out, "--resume", "--no-progress")
    assert code == 0, err
    assert verify(str(out)) == N


def test_sigint_during_an_overwrite_says_the_old_output_is_untouched(
        tmp_path, inputs, finished, run_cli, monkeypatch):
    out, old = finished
    with monkeypatch.context() as m:
        _interrupt_at_manifest(m)
        code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.8, "c2.yml"), out, "--overwrite", "--no-progress")
    assert code == 130
    assert f"the previous output at {out} is untouched" in err and err.count("\n") == 1, err
    assert _files(out) == old and verify(str(out)) == N
    code, _, err = run_cli("verify", f"{out}.moemerge-new")
    assert code == 1 and "is unfinished" in err


def test_verify_on_an_unfinished_output_says_unfinished(tmp_path, inputs, run_cli, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_on_write(m, 3)
        assert run_cli("run", _cfg(tmp_path, inputs, 0.3), out, "--no-progress")[0] == 1
    code, _, err = run_cli("verify", out)
    assert code == 1
    assert f"{out} is unfinished (a run was interrupted or is still running); rerun with --resume" in err
    assert "Hugging Face" not in err


def test_free_space_is_checked_before_anything_is_written(tmp_path, inputs, finished, run_cli, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    fresh = tmp_path / "fresh"
    code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.3), fresh, "--no-progress")
    assert code == 1 and "the output needs" in err and "1,000 bytes) free" in err, err
    assert err.count("\n") == 1
    assert not fresh.exists()
    # overwriting keeps the old output until the swap: the new one needs its full size too
    out, old = finished
    code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.8, "c2.yml"), out, "--overwrite", "--no-progress")
    assert code == 1 and "the output needs" in err
    assert _files(out) == old and _siblings(out) == []
    monkeypatch.setattr(space.shutil, "disk_usage", real)
    code, _, err = run_cli("run", _cfg(tmp_path, inputs, 0.3), fresh, "--no-progress")
    assert code == 0, err


def test_sigterm_is_one_line_exit_143_and_cleans_up(tmp_path, inputs, run_cli):
    out = tmp_path / "out"
    started = tmp_path / "started"
    cfg = _cfg(tmp_path, inputs, 0.3)
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


# -- object storage --------------------------------------------------------------------------------

s3 = pytest.importorskip("s3fs")


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


def _objects(prefix: str) -> dict[str, str]:
    fs = s3.S3FileSystem()
    fs.invalidate_cache()
    try:
        found = fs.find(prefix)
    except FileNotFoundError:
        return {}
    return {p: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(found)}


def test_s3_failed_overwrite_keeps_the_old_output(tmp_path, s3_models, run_cli, monkeypatch):
    from moemerge.io.s3_writer import RemoteModelWriter

    cfg1, cfg2 = _cfg(tmp_path, s3_models, 0.3), _cfg(tmp_path, s3_models, 0.8, "c2.yml")
    assert run_cli("run", cfg1, "s3://out/m", "--no-progress")[0] == 0
    old = _objects("out/m")
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
    assert _objects("out/m") == old and _objects("out/m.moemerge-new") == {}
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
    assert "out/m/" + MANIFEST not in _objects("out/m")  # not finished-looking while mixed
    code, _, err = run_cli("run", cfg2, "s3://out/m", "--no-progress")
    assert code == 1 and "completed an overwrite" in err and "already holds a finished merge" in err, err
    assert _objects("out/m.moemerge-new") == {}
    assert run_cli("run", cfg2, tmp_path / "local", "--no-progress")[0] == 0
    new = _objects("out/m")
    for f in (tmp_path / "local").glob("*.safetensors"):
        assert new[f"out/m/{f.name}"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert set(p.rsplit("/", 1)[-1] for p in new) == {p.name for p in (tmp_path / "local").iterdir()}
