"""Zarr v3 output, Zarr input and `moemerge export`: every path agrees with safetensors, bit for bit."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from moemerge import api
from moemerge.errors import CheckpointError, MergeRuntimeError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.writer import MANIFEST_NAME
from moemerge.io.zarr_reader import ZarrCheckpoint
from moemerge.io.zarr_store import array_path, tensor_name
from moemerge.io.zarr_writer import zarr_chunks
from moemerge.verify import verify

#: tiny test models need `--shard-size` below the CLI's 1 MB minimum to get several shards
pytestmark = pytest.mark.usefixtures("small_shards")

_LOGICAL = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def _tensors(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "model.embed_tokens.weight": r(10, 6),  # 2-D
        "model.layers.0.input_layernorm.weight": r(6),  # 1-D
        "model.layers.0.mlp.experts.w1": r(4, 3, 6),  # fused 3-D experts
        "model.layers.0.mlp.experts.w4d": r(3, 2, 2, 5),  # 4-D
        "model.layers.0.self_attn.zero": torch.full((4, 4), -0.0, dtype=dtype),  # -0.0 survives
        "model.position_ids": torch.arange(7),  # integer: copied
    }


def _linear(a: Path, b: Path, **extra: object) -> dict:
    return {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.3}},
        {"model": str(b), "parameters": {"weight": 0.7}}], **extra}


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _restore(arr: zarr.Array) -> torch.Tensor:
    """A plain-zarr array as the tensor it stands for (its logical dtype from the attributes)."""
    dtype = _LOGICAL[arr.attrs["moemerge"]["dtype"]]
    return torch.from_numpy(np.ascontiguousarray(arr[...])).view(dtype)


@pytest.fixture
def pair(ckpt_factory: Callable[..., Path]) -> Callable[[torch.dtype], tuple[Path, Path]]:
    def make(dtype: torch.dtype) -> tuple[Path, Path]:
        tag = str(dtype).split(".")[-1]
        return ckpt_factory(f"a-{tag}", _tensors(dtype, 1)), ckpt_factory(f"b-{tag}", _tensors(dtype, 2))

    return make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_zarr_output_read_by_plain_zarr_equals_safetensors_bit_for_bit(pair, tmp_path: Path, dtype: torch.dtype) -> None:
    a, b = pair(dtype)
    api.run(_linear(a, b), str(tmp_path / "st"), chunk_rows=2)
    api.run(_linear(a, b), str(tmp_path / "out.zarr"), chunk_rows=2, out_format="zarr")
    ref = load_file(str(next((tmp_path / "st").glob("*.safetensors"))))
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert group.attrs["moemerge"]["config"]["merge_method"] == "linear"
    assert group.attrs["moemerge"]["sources"] == [str(a), str(b)]
    got = {arr.attrs["moemerge"]["name"]: arr for _, arr in group.arrays()}
    assert set(got) == set(ref)
    for name, want in ref.items():
        arr = got[name]
        assert arr.shape == tuple(want.shape), name
        back = _restore(arr)
        assert back.dtype == want.dtype
        assert torch.equal(back.view(torch.uint8), want.contiguous().view(torch.uint8)), name
        assert arr.metadata.codecs[0].__class__.__name__ == "BytesCodec" and len(arr.metadata.codecs) == 1
    if dtype == torch.bfloat16:
        assert got["model.embed_tokens.weight"].dtype == np.uint16
    assert verify(str(tmp_path / "out.zarr")) == len(ref)


def test_each_engine_chunk_is_one_zarr_chunk_of_whole_dim0_slices(pair, tmp_path: Path) -> None:
    a, b = pair(torch.bfloat16)
    res = api.run(_linear(a, b), str(tmp_path / "out.zarr"), chunk_rows=4, out_format="zarr")
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    for t in res.plan.tensors:
        arr = group[array_path(t.name)]
        assert arr.chunks == zarr_chunks(t.shape, t.rows_per_chunk)
        if len(t.shape) >= 3:
            slab = int(np.prod(t.shape[1:-1]))
            assert t.rows_per_chunk % slab == 0 and arr.chunks[0] * slab == t.rows_per_chunk


@pytest.mark.parametrize("name", ["model.layers.0.w", "a/b/c", "100%", "__x", ".", "..", "sp ace", "é"])
def test_array_names_round_trip_exactly(name: str) -> None:
    path = array_path(name)
    assert "/" not in path and not path.startswith("__") and path not in (".", "..")
    assert tensor_name(path) == name


def test_reader_serves_any_row_range_of_a_3d_tensor(pair, tmp_path: Path) -> None:
    a, b = pair(torch.float32)
    api.run(_linear(a, b), str(tmp_path / "st"))
    api.run(_linear(a, b), str(tmp_path / "out.zarr"), out_format="zarr")
    st, zr = Checkpoint.open(str(tmp_path / "st")), Checkpoint.open(str(tmp_path / "out.zarr"))
    try:
        assert isinstance(zr, ZarrCheckpoint)
        for name in ("model.layers.0.mlp.experts.w1", "model.layers.0.mlp.experts.w4d"):
            t = zr.tensors[name]
            assert (t.dtype, t.shape) == (st.tensors[name].dtype, st.tensors[name].shape)
            for r0 in range(t.rows):
                for r1 in range(r0 + 1, t.rows + 1):
                    want, got = bytearray((r1 - r0) * t.row_bytes), bytearray((r1 - r0) * t.row_bytes + 3)
                    st.read_rows(name, r0, r1, memoryview(want))
                    zr.read_rows(name, r0, r1, memoryview(got))
                    assert got[:len(want)] == want, (name, r0, r1)
    finally:
        st.close()
        zr.close()


def test_zarr_output_as_model_chains_like_safetensors(pair, ckpt_factory, tmp_path: Path) -> None:
    a, b = pair(torch.bfloat16)
    c = ckpt_factory("c", _tensors(torch.bfloat16, 3))
    api.run(_linear(a, b), str(tmp_path / "st1"), chunk_rows=3)
    api.run(_linear(a, b), str(tmp_path / "z1.zarr"), chunk_rows=3, out_format="zarr")
    # the second merge chunks differently (2 rows): ranges that cut dim-0 slices
    api.run(_linear(tmp_path / "st1", c), str(tmp_path / "via-st"), chunk_rows=2)
    api.run(_linear(tmp_path / "z1.zarr", c), str(tmp_path / "via-zarr"), chunk_rows=2)
    assert _shard_bytes(tmp_path / "via-zarr") == _shard_bytes(tmp_path / "via-st")
    # and Zarr in, Zarr out
    api.run(_linear(tmp_path / "z1.zarr", c), str(tmp_path / "z2.zarr"), out_format="zarr")
    assert verify(str(tmp_path / "z2.zarr")) == len(_tensors(torch.bfloat16, 0))


def test_zarr_output_is_a_pma_snapshot(pair, run_cli, tmp_path: Path) -> None:
    a, b = pair(torch.bfloat16)
    code, _, err = run_cli("run", _yaml(tmp_path, _linear(a, b)), tmp_path / "z.zarr", "--format", "zarr", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("run", _yaml(tmp_path, _linear(a, b)), tmp_path / "s", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("pma", a, tmp_path / "z.zarr", "--method", "ema", "-o", tmp_path / "pz", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("pma", a, tmp_path / "s", "--method", "ema", "-o", tmp_path / "ps", "--no-progress")
    assert code == 0, err
    assert _shard_bytes(tmp_path / "pz") == _shard_bytes(tmp_path / "ps")


def _yaml(tmp_path: Path, doc: dict) -> Path:
    from conftest import write_yaml

    return write_yaml(tmp_path / f"cfg-{uuid.uuid4().hex[:6]}.yml", doc)


@pytest.mark.parametrize("shard_args", [(), ("--shard-size", "300B")])
def test_export_round_trips_to_identical_safetensors(pair, run_cli, tmp_path: Path, shard_args: tuple[str, ...]) -> None:
    a, b = pair(torch.bfloat16)
    cfg = _yaml(tmp_path, _linear(a, b))
    run_shards = ("--shard-size", "300B")
    code, _, err = run_cli("run", cfg, tmp_path / "st", *run_shards, "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("run", cfg, tmp_path / "z.zarr", "--format", "zarr", *run_shards, "--no-progress")
    assert code == 0, err
    code, out, err = run_cli("export", tmp_path / "z.zarr", tmp_path / "hf", *shard_args)
    assert code == 0, err
    assert "shard" in out
    want = _shard_bytes(tmp_path / "st")
    assert len(want) > 1
    assert _shard_bytes(tmp_path / "hf") == want
    idx = "model.safetensors.index.json"
    assert json.loads((tmp_path / "hf" / idx).read_text()) == json.loads((tmp_path / "st" / idx).read_text())
    for side in ("config.json", "moemerge-config.yml"):
        assert (tmp_path / "hf" / side).read_bytes() == (tmp_path / "st" / side).read_bytes()
    assert verify(str(tmp_path / "hf")) == len(_tensors(torch.bfloat16, 0))


def test_export_refuses_a_safetensors_directory(pair, run_cli, tmp_path: Path) -> None:
    a, _ = pair(torch.float32)
    code, _, err = run_cli("export", a, tmp_path / "hf")
    assert code == 1 and "not a moemerge Zarr output" in err


def test_failed_zarr_run_leaves_no_manifest_or_consolidated_metadata(ckpt_factory, tmp_path: Path) -> None:
    ta, tb = _tensors(torch.bfloat16, 1), _tensors(torch.bfloat16, 2)
    tb["model.position_ids"] = torch.arange(7) + 1  # integer tensors differ: fails mid-run
    a, b = ckpt_factory("a", ta), ckpt_factory("b", tb)
    out = tmp_path / "bad.zarr"
    with pytest.raises(MergeRuntimeError, match="model.position_ids"):
        api.run(_linear(a, b), str(out), out_format="zarr")
    assert not (out / MANIFEST_NAME).exists()
    root = json.loads((out / "zarr.json").read_text())
    assert root.get("consolidated_metadata") is None
    with pytest.raises(CheckpointError, match="unfinished"):
        Checkpoint.open(str(out))


def test_memory_url_output(pair, tmp_path: Path) -> None:
    a, b = pair(torch.bfloat16)
    url = f"memory://moemerge-test-{uuid.uuid4().hex}/out.zarr"
    try:
        api.run(_linear(a, b), str(tmp_path / "st"), chunk_rows=3)
        api.run(_linear(a, b), url, chunk_rows=3, out_format="zarr")
        ref = load_file(str(next((tmp_path / "st").glob("*.safetensors"))))
        group = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=True), mode="r")
        for name, want in ref.items():
            back = _restore(group[array_path(name)])
            assert torch.equal(back.view(torch.uint8), want.contiguous().view(torch.uint8)), name
        assert verify(url) == len(ref)
        # and as an input of a second merge
        api.run(_linear(url, b), str(tmp_path / "chain-z"))
        api.run(_linear(tmp_path / "st", b), str(tmp_path / "chain-s"))
        assert _shard_bytes(tmp_path / "chain-z") == _shard_bytes(tmp_path / "chain-s")
    finally:
        fs = fsspec.filesystem("memory")
        root = url.split("://", 1)[1].split("/", 1)[0]
        if fs.exists(f"/{root}"):
            fs.rm(f"/{root}", recursive=True)


def test_a_zarr_store_not_written_by_moemerge_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "foreign.zarr"), shape=(4,), dtype="float32")
    with pytest.raises(CheckpointError, match="not written by moemerge"):
        Checkpoint.open(str(tmp_path / "foreign.zarr"))


def test_an_existing_finished_zarr_output_needs_overwrite(pair, tmp_path: Path) -> None:
    from moemerge.errors import OutputError

    a, b = pair(torch.float16)
    out = str(tmp_path / "z.zarr")
    api.run(_linear(a, b), out, out_format="zarr")
    with pytest.raises(OutputError, match="--overwrite"):
        api.run(_linear(a, b), out, out_format="zarr")
    api.run(_linear(b, a), out, out_format="zarr", overwrite=True)
    assert verify(out) == len(_tensors(torch.float16, 0))


def test_zarr_output_never_deletes_a_foreign_remote_prefix(pair) -> None:
    from moemerge.errors import OutputError

    a, b = pair(torch.float32)
    fs = fsspec.filesystem("memory")
    root = f"/moemerge-test-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(f"{root}/keep.txt", b"precious")
        with pytest.raises(OutputError, match="not a moemerge output"):
            api.run(_linear(a, b), f"memory://{root}", out_format="zarr")
        assert fs.cat_file(f"{root}/keep.txt") == b"precious"
    finally:
        fs.rm(root, recursive=True)


class _Flaky:
    """A Zarr array whose first `fails` reads raise `error`, as a dropped connection would."""

    def __init__(self, arr, fails: int, error: Exception) -> None:
        self.arr, self.fails, self.error, self.calls = arr, fails, error, 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error

    def get_basic_selection(self, *a, **k):
        self._maybe_fail()
        return self.arr.get_basic_selection(*a, **k)

    def __getitem__(self, key):
        self._maybe_fail()
        return self.arr[key]


def test_zarr_reads_retry_transient_errors_and_name_the_tensor_on_permanent_ones(
        pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.io import storage

    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(attempts=4, base_delay=0.0))
    a, b = pair(torch.float32)
    api.run(_linear(a, b), str(tmp_path / "out.zarr"), out_format="zarr")
    zr = Checkpoint.open(str(tmp_path / "out.zarr"))
    try:
        for name in ("model.layers.0.mlp.experts.w1", "model.layers.0.mlp.experts.w4d"):
            t = zr.tensors[name]
            want = bytearray(t.nbytes)
            zr.read_rows(name, 0, t.rows, memoryview(want))
            real = zr._array(name)
            flaky = _Flaky(real, 2, ConnectionResetError("connection reset by peer"))
            monkeypatch.setattr(zr, "_array", lambda n, flaky=flaky: flaky)
            got = bytearray(t.nbytes)
            zr.read_rows(name, 0, t.rows, memoryview(got))
            assert got == want and flaky.calls >= 3
            monkeypatch.setattr(zr, "_array", lambda n, real=real: _Flaky(real, 1, PermissionError("denied")))
            with pytest.raises(CheckpointError, match=f"{name}.*denied"):
                zr.read_rows(name, 0, t.rows, memoryview(got))
            monkeypatch.undo()
            monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(attempts=4, base_delay=0.0))
    finally:
        zr.close()
