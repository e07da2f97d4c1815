"""`--format dcp`: a merge written as a PyTorch DCP directory that `torch.distributed.checkpoint
.load` reads into the training model's state dict (PMA-init), streamed, atomic, named back."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moemerge.errors import ConfigError
from moemerge.io.dcp_archive import crc32_combine, tensor_archive
from moemerge.names import DcpNames, select_names, stored_keys
from moemerge.verify import verify
from tests.conftest import write_checkpoint, write_yaml
from tests.reference_methods import fp32_bound

ROOT = Path(__file__).parent.parent


class Tiny(torch.nn.Module):
    """A training model's shapes: embedding, attention, fused experts, norms; bf16 and fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(13, 8, dtype=torch.bfloat16)
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({
            "q": torch.nn.Linear(8, 8, dtype=torch.bfloat16),
            "norm": torch.nn.LayerNorm(8),
        }) for _ in range(2)])
        self.experts = torch.nn.Parameter(torch.zeros(4, 8, 6))
        self.head = torch.nn.Linear(8, 13, bias=False)


def _fresh(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The Tiny model's state dict filled with fresh random values."""
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype)
            for k, v in Tiny().state_dict().items()}


def _save(path: Path, model: dict[str, torch.Tensor], gen: torch.Generator, *, extra: bytes) -> None:
    """A training snapshot: model, optimizer state and a TransformerEngine-style `_extra_state`."""
    state: dict[str, Any] = {
        "model": {**model, "layers.0._extra_state": io.BytesIO(extra)},
        "optimizer": {"state": {k: {"exp_avg": torch.randn(v.shape, generator=gen)} for k, v in model.items()}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _load(path: Path) -> tuple[Tiny, dict[str, Any]]:
    """`dcp.load` of `path` into a fresh Tiny model, as a training job resumes (PMA-init)."""
    model = Tiny()
    state = {"model": {**model.state_dict(), "layers.0._extra_state": io.BytesIO()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    extra = state["model"].pop("layers.0._extra_state")
    model.load_state_dict(state["model"])
    return model, {"extra": extra}


def _snapshots(tmp_path: Path, gen: torch.Generator, n: int) -> tuple[list[dict[str, torch.Tensor]], list[Path]]:
    models, paths = [], []
    for i in range(n):
        m = _fresh(gen)
        p = tmp_path / "run" / f"step-{(i + 1) * 100}"
        _save(p, m, gen, extra=f"extra state {i}".encode() * 3)
        models.append(m)
        paths.append(p)
    return models, paths


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for p in paths for f in sorted(p.rglob("*")) if f.is_file()}


def _check_average(model: Tiny, models: list[dict[str, torch.Tensor]], weights: list[float]) -> None:
    """Every weight of `model` is the weighted average of `models` within fp32 + output rounding."""
    total = sum(weights)
    for name, got in model.state_dict().items():
        xs = [m[name].double() for m in models]
        ref = sum(w / total * x for w, x in zip(weights, xs))
        fi = torch.finfo(got.dtype)
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))) * fi.eps
        bound = ulp + fp32_bound(None, xs, [{"weight": w} for w in weights], {}, "linear")
        assert got.dtype == models[0][name].dtype and got.shape == models[0][name].shape, name
        assert ((got.double() - ref).abs() <= bound).all(), name
        assert not torch.equal(got, models[-1][name]), name


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


# -- the archive format ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (3, 5)), (torch.bfloat16, (7,)), (torch.float64, ()),
                                         (torch.int64, (2, 3, 4)), (torch.float16, (0, 4)), (torch.bool, (5, 2))])
def test_archive_is_what_torch_save_writes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.randn(shape, dtype=torch.float64) * 100).to(dtype)
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    ref = io.BytesIO()
    torch.save(t, ref)
    theirs = zipfile.ZipFile(ref)
    for force in (False, True):
        a = tensor_archive(dtype, shape, ident="layers.0.w", force_zip64=force)
        raw = bytearray(a.head + data + a.tail)
        for at in a.crc_at:
            raw[at:at + 4] = zlib.crc32(data).to_bytes(4, "little")
        assert len(raw) == a.length and a.data_offset % 64 == 0
        back = torch.load(io.BytesIO(bytes(raw)), weights_only=True)
        assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
        ours = zipfile.ZipFile(io.BytesIO(bytes(raw)))
        assert ours.testzip() is None  # every record's CRC, the data's included
        assert ours.namelist() == theirs.namelist()
        for rec in theirs.namelist():
            if not rec.endswith("serialization_id"):
                assert ours.read(rec) == theirs.read(rec), rec
        if t.numel() and not force:  # byte for byte torch.save, but for the serialization id
            mine, real = bytes(raw), ref.getvalue()
            sid = theirs.getinfo("archive/.data/serialization_id")
            diff = [i for i in range(len(real)) if mine[i] != real[i]]
            assert len(mine) == len(real) and diff and min(diff) >= sid.header_offset


def test_crc32_combine_equals_zlib_over_pieces() -> None:
    data = os.urandom(70_001)
    for cuts in ([0], [1], [35_000], [69_999, 70_001], [3, 77, 4096, 50_000]):
        crc, prev = 0, 0
        for c in [*cuts, len(data)]:
            crc = crc32_combine(crc, zlib.crc32(data[prev:c]), c - prev)
            prev = c
        assert crc == zlib.crc32(data)


def test_stored_keys_invert_select_names() -> None:
    keys = ["model.layers.0.w", "model.tok.w", "model.layers.1.x", "optimizer.state.layers.0.w"]
    for names in (DcpNames(prefix="model"), DcpNames(prefix="model", rename=(("layers.", "model.layers."),)),
                  DcpNames(prefix="model", rename=(("layers.", "h."), ("tok.", "embed."))), None):
        forward = select_names(keys, names, where="in")
        back = stored_keys(forward.values(), names, where="out")
        assert {back[n]: n for n in forward.values()} == forward
    assert stored_keys(["a.b"], DcpNames(prefix=""), where="out") == {"a.b": "a.b"}
    with pytest.raises(ConfigError, match="optimizer/scheduler state; give --dcp-prefix"):
        stored_keys(["optimizer.x"], DcpNames(prefix=""), where="out")
    with pytest.raises(ConfigError, match="`layers.0.w` has no DCP key"):
        stored_keys(["layers.0.w"], DcpNames(rename=(("layers.", "h."),)), where="out")


# -- PMA-init: average snapshots to DCP, load into the model ---------------------------------


def test_pma_to_dcp_loads_into_the_model_and_equals_float64_reference(tmp_path: Path, gen: torch.Generator,
                                                                     run_cli) -> None:
    models, paths = _snapshots(tmp_path, gen, 3)
    before = _digest(paths)
    out = tmp_path / "init"
    code, text, err = run_cli("pma", *map(str, paths), "-o", str(out), "--format", "dcp", "--method", "wma",
                              "--dcp-prefix", "model.", "--rename", "layers.=model.layers.",
                              "--memory-budget", "1MB", "--no-progress")
    assert code == 0, err
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "moemerge-config.yml", "moemerge-manifest.json"]
    model, got = _load(out)
    _check_average(model, models, [1.0, 2.0, 3.0])  # WMA: weights 1..n, oldest first
    assert got["extra"].getvalue() == b"extra state 2" * 3  # copied from the newest, as training wrote it
    # the keys are the training model's, under `model.` (the rename went back); no optimizer state
    with open(out / ".metadata", "rb") as f:
        import pickle

        md = pickle.load(f)  # noqa: S301 - our own output
    assert set(md.state_dict_metadata) == {f"model.{k}" for k in Tiny().state_dict()} | {"model.layers.0._extra_state"}
    assert verify(str(out)) == len(Tiny().state_dict()) + 1
    code, _, err = run_cli("verify", str(out))
    assert code == 0, err
    assert _digest(paths) == before  # inputs unchanged


def test_run_format_dcp_from_safetensors_inputs(tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    models = [_fresh(gen) for _ in range(2)]
    ins = [write_checkpoint(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    cfg = write_yaml(tmp_path / "merge.yml", {"merge_method": "linear", "models": [
        {"model": str(p), "parameters": {"weight": w}} for p, w in zip(ins, (0.25, 0.75))]})
    out = tmp_path / "out"
    code, _, err = run_cli("run", str(cfg), str(out), "--format", "dcp", "--no-progress")
    assert code == 0, err
    model = Tiny()
    state = {"model": model.state_dict()}  # no --dcp-prefix: keys go under `model.`
    dcp.load(state, checkpoint_id=str(out), no_dist=True)
    model.load_state_dict(state["model"])
    _check_average(model, models, [0.25, 0.75])
    assert (out / "config.json").is_file() and verify(str(out)) == len(models[0])


def test_a_tensor_larger_than_the_budget_is_written_in_row_chunks(tmp_path: Path, gen: torch.Generator,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge import api
    from moemerge.io.dcp_writer import DcpModelWriter

    big = [{"w": torch.randn(1024, 1024, generator=gen)} for _ in range(2)]  # 4 MiB each, budget 1 MB
    ins = [write_checkpoint(tmp_path / f"s{i}", m) for i, m in enumerate(big)]
    writes: list[int] = []
    real = DcpModelWriter.write_rows

    def record(self: DcpModelWriter, name: str, row_start: int, data: memoryview) -> None:
        writes.append(len(data))
        real(self, name, row_start, data)

    monkeypatch.setattr(DcpModelWriter, "write_rows", record)
    out = tmp_path / "out"
    api.run({"merge_method": "sma", "models": [str(p) for p in ins]}, str(out), out_format="dcp",
            memory_budget="1MB")
    assert len(writes) > 4 and max(writes) <= 10**6 and sum(writes) == 4 << 20
    got = {"model": {"w": torch.zeros(1024, 1024)}}
    dcp.load(got, checkpoint_id=str(out), no_dist=True)
    ref = (big[0]["w"].double() + big[1]["w"].double()) / 2
    assert (got["model"]["w"].double() - ref).abs().max() < 1e-6
    with zipfile.ZipFile(out / "__0_0.distcp") as z:  # the archive's CRC is the data's, combined from chunks
        assert z.testzip() is None


# -- atomic: a kill leaves nothing loadable; a rerun works; an overwrite keeps the old -------


_KILL = textwrap.dedent("""
    import os, signal, sys
    from moemerge.io.dcp_writer import DcpModelWriter
    real, seen = DcpModelWriter.write_rows, [0]
    def kill(self, *a):
        seen[0] += 1
        if seen[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a)
    DcpModelWriter.write_rows = kill
    from moemerge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_kill_mid_write_leaves_no_metadata_and_a_rerun_works(tmp_path: Path, gen: torch.Generator, run_cli,
                                                              overwrite: bool) -> None:
    models, paths = _snapshots(tmp_path, gen, 2)
    out = tmp_path / "init"
    args = ["pma", *map(str, paths), "-o", str(out), "--format", "dcp", "--memory-budget", "1MB", "--no-progress"]
    old: dict[str, str] = {}
    if overwrite:  # a finished output from an earlier night (the oldest snapshot alone)
        code, _, err = run_cli("pma", str(paths[0]), "-o", str(out), "--format", "dcp", "--no-progress")
        assert code == 0, err
        old = _digest([out])
        args.append("--overwrite")
    proc = subprocess.run([sys.executable, "-c", _KILL, *args], capture_output=True, text=True, timeout=120,
                          cwd=str(ROOT))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if overwrite:
        assert _digest([out]) == old and verify(str(out)) == len(models[0]) + 1  # the old one, intact
        model, _ = _load(out)
        assert all(torch.equal(v, models[0][k]) for k, v in model.state_dict().items())
    else:
        assert (out / ".moemerge-incomplete").is_file()
        assert not (out / ".metadata").exists() and not (out / "moemerge-manifest.json").exists()
        from torch.distributed.checkpoint.api import CheckpointException

        with pytest.raises(CheckpointException, match="metadata read failed"):
            _load(out)  # DCP finds no checkpoint here
        code, _, err = run_cli("verify", str(out))
        assert code == 1 and "unfinished" in err
    code, _, err = run_cli(*args)
    assert code == 0, err
    model, _ = _load(out)
    _check_average(model, models, [1.0, 1.0])
    assert verify(str(out)) == len(models[0]) + 1
    assert not list(tmp_path.glob("init.moemerge-*"))


def test_dcp_output_refusals_name_the_fix(tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    _, paths = _snapshots(tmp_path, gen, 2)
    out = tmp_path / "init"
    code, _, err = run_cli("pma", *map(str, paths), "-o", "memory://bucket/init", "--format", "dcp", "--no-progress")
    assert code == 1 and "--format dcp writes to a local or shared filesystem" in err
    code, _, err = run_cli("pma", *map(str, paths), "-o", str(out), "--format", "dcp", "--no-progress")
    assert code == 0, err
    before = _digest([out])
    code, _, err = run_cli("pma", *map(str, paths), "-o", str(out), "--format", "dcp", "--no-progress")
    assert code == 1 and "already holds a finished merge" in err and "--overwrite" in err
    code, _, err = run_cli("pma", *map(str, paths), "-o", str(out), "--format", "dcp", "--quantize", "fp8-block",
                           "--overwrite", "--no-progress")
    # a DCP output is unquantized: both ways out are named
    assert code == 1 and "--quantize none to write dcp unquantized" in err and "--format safetensors" in err, err
    assert _digest([out]) == before and verify(str(out)) > 0  # nothing lost


@pytest.mark.slow
def test_three_512mib_tensors_average_to_dcp_under_1gib_rss(big_inputs: list[Path], tmp_path: Path) -> None:
    from tests.test_memory import BUDGET, NAME, RSS_LIMIT, SHAPE, _run_child

    out = tmp_path / "out"
    peak = _run_child("pma", *big_inputs, "-o", out, "--format", "dcp", "--memory-budget", BUDGET, "--no-progress")
    assert peak < RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    assert verify(str(out)) == 1
    from moemerge.io.checkpoint import Checkpoint

    ck = Checkpoint.open(str(out))
    try:  # a few rows against the inputs' (never a whole tensor)
        t = ck.tensors[NAME]
        assert t.shape == SHAPE and t.dtype == "BF16"
    finally:
        ck.close()
