"""Issue 11, rows 3 and 4: `--resume` checks before it trusts (inputs unchanged, kept bytes
still hash to the journal), and the journal is written often enough that a kill keeps work."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch

import moemerge
import moemerge.api
from moemerge.errors import OutputError
from moemerge.io.journal import JOURNAL_NAME
from moemerge.io.writer import LocalModelWriter
from tests.conftest import write_checkpoint

N_TENSORS = 24
#: Settings of every run here: small shards, so that the output has several.
KW = {"memory_budget": "1MB", "shard_size": "10KB"}
ARGS = ("--memory-budget", "1MB", "--shard-size", "10KB", "--no-progress")


def _model(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    return {f"model.layers.{k}.mlp.weight": torch.randn(32, 24 + k % 7, generator=g).to(torch.bfloat16)
            for k in range(n)}


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return [write_checkpoint(tmp_path / f"m{i}", _model(g, N_TENSORS), shards=3) for i in range(3)]


def _cfg(inputs: list[Path] | list[str]) -> dict:
    return {"merge_method": "ties", "base_model": str(inputs[0]),
            "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.4}} for p in inputs[1:]]}


def _journal(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / JOURNAL_NAME).read_text().splitlines() if ln.strip()]


def _files(out: Path) -> dict[str, bytes]:
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


_RESUME_LINE = re.compile(r"resume: (\d+) tensors kept \((.+) re-read and verified\), (\d+) recomputed")


def _resume_counts(text: str) -> tuple[int, int]:
    m = _RESUME_LINE.search(text)
    assert m, text
    return int(m.group(1)), int(m.group(3))


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["mtime-changed", "mtime-restored"])
def test_resume_refuses_an_input_rewritten_in_place(inputs: list[Path], tmp_path: Path, run_cli,
                                                   monkeypatch: pytest.MonkeyPatch, restore_mtime: bool) -> None:
    """Row 3: headers equal, bytes different. Was: exit 0, `verify` OK, the kept tensors from
    the old inputs. The journal records each input file's size, mtime, ctime and header hash;
    `os.utime` can put mtime back but not ctime, so both cases are caught."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_cfg(inputs)))
    out = tmp_path / "out"
    done = _crashed_run(cfg, out, monkeypatch, after=N_TENSORS * 2 // 3)
    assert 0 < len(done) < N_TENSORS
    changed = inputs[1] / "model-00001-of-00003.safetensors"
    _rewrite_data_in_place(changed, restore_mtime=restore_mtime)
    before = _files(out)

    code, _, err = run_cli("run", cfg, out, *ARGS, "--resume")
    assert code == 1
    assert str(changed) in err and "changed since the interrupted run" in err, err
    assert "without --resume" in err and len(err.strip().splitlines()) == 1, err
    assert _files(out) == before  # refused before the output was touched
    assert not (out / "moemerge-manifest.json").exists()

    # starting over gives what a fresh run of the new inputs gives
    code, _, err = run_cli("run", cfg, out, *ARGS)
    assert code == 0, err
    code, _, err = run_cli("run", cfg, tmp_path / "clean", *ARGS)
    assert code == 0, err
    assert _files(out) == _files(tmp_path / "clean")
    code, _, err = run_cli("verify", out)
    assert code == 0, err


def test_resume_recomputes_the_tensors_of_a_deleted_shard(inputs: list[Path], tmp_path: Path, run_cli,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 4. Was: the shard recreated as zeros, its journaled tensors skipped, exit 0, `verify`
    failing. Now every kept tensor is re-read and must hash to its journal line."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_cfg(inputs)))
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
    assert _files(out) == _files(tmp_path / "clean")
    assert not (out / JOURNAL_NAME).exists()
    code, _, err = run_cli("verify", out)
    assert code == 0, err


def test_resume_recomputes_a_kept_tensor_whose_bytes_changed(inputs: list[Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    """A journaled tensor with one byte flipped on disk is recomputed, not trusted."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_cfg(inputs)))
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
    assert _files(out) == _files(tmp_path / "clean")
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
    assert _files(out) == _files(tmp_path / "clean")
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


def test_dask_journal_by_tensor_count_and_resume_rechecks(inputs: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On Dask: the journal is written every few tensors (was: by input bytes, so only at the
    end of a small output), and a resumed run re-reads what it keeps (a deleted shard is
    recomputed)."""
    pytest.importorskip("distributed")
    from moemerge.io.journal import Journal
    from moemerge.verify import verify

    cfg = _cfg(inputs)
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
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")
    verify(str(tmp_path / "out"))


def _write_cfg(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(json.dumps(cfg))
    return p


def test_resume_refuses_an_object_storage_input_rewritten_in_place(inputs: list[Path], tmp_path: Path, run_cli,
                                                                  monkeypatch: pytest.MonkeyPatch, s3_server) -> None:
    """Row 3 with inputs on S3: the same key rewritten with a same-size body and the same
    header has another ETag, so the journal of the earlier run is refused."""
    import boto3
    import s3fs

    boto3.client("s3").create_bucket(Bucket="models")
    fs = s3fs.S3FileSystem()
    for p in inputs:
        for f in sorted(p.iterdir()):
            fs.put_file(str(f), f"models/{p.name}/{f.name}")
    cfg = _write_cfg(tmp_path, _cfg([f"s3://models/{p.name}" for p in inputs]))
    out = tmp_path / "out"
    done = _crashed_run(cfg, out, monkeypatch, after=N_TENSORS * 2 // 3)
    assert done
    local = inputs[2] / "model-00002-of-00003.safetensors"
    _rewrite_data_in_place(local, restore_mtime=False)
    fs.put_file(str(local), "models/m2/model-00002-of-00003.safetensors")
    before = _files(out)

    code, _, err = run_cli("run", cfg, out, *ARGS, "--resume")
    assert code == 1
    assert "s3://models/m2/model-00002-of-00003.safetensors: changed since the interrupted run" in err, err
    assert "ETag" in err and "without --resume" in err, err
    assert _files(out) == before
    code, _, err = run_cli("run", cfg, out, *ARGS)
    assert code == 0, err
    code, _, err = run_cli("run", cfg, tmp_path / "clean", *ARGS)
    assert code == 0, err
    assert _files(out) == _files(tmp_path / "clean")
    code, _, err = run_cli("verify", out)
    assert code == 0, err
