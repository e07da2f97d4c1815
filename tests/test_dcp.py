"""PyTorch DCP input: checkpoints written by `torch.distributed.checkpoint.save` itself.

A single process writes one chunk per tensor, so `SplitPlanner` (a DefaultSavePlanner that
emits each tensor as a grid of SHARD write items, as FSDP/TP ranks do) makes multi-chunk
checkpoints with torch's own writer and metadata; torch's own loader reads them back.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from moemerge import api
from moemerge.config import parse_config
from moemerge.errors import CheckpointError, ConfigError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dcp import DcpCheckpoint
from moemerge.names import DcpNames, parse_dcp_names, select_names
from tests.conftest import write_checkpoint
from tests.reference_methods import fp32_bound

# -- writing DCP checkpoints with torch ---------------------------------------------------


class SplitPlanner(DefaultSavePlanner):
    """Save each tensor of >= 1 dim as a grid of chunks: `splits[d]` pieces along dim d."""

    def __init__(self, splits: tuple[int, ...]) -> None:
        super().__init__()
        self.splits = splits

    def create_local_plan(self):  # type: ignore[no-untyped-def]
        plan = super().create_local_plan()
        items = []
        for it in plan.items:
            if it.type != WriteItemType.TENSOR or len(it.tensor_data.size) == 0:
                items.append(it)
                continue
            size = it.tensor_data.size
            edges = []
            for d, n in enumerate(size):
                k = max(1, min(self.splits[d] if d < len(self.splits) else 1, n))
                cuts = sorted({round(i * n / k) for i in range(k + 1)})
                edges.append(list(zip(cuts[:-1], cuts[1:])))
            for box in itertools.product(*edges):
                off = torch.Size([a for a, _ in box])
                sz = torch.Size([b - a for a, b in box])
                items.append(WriteItem(
                    index=MetadataIndex(it.index.fqn, off), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=sz),
                                                properties=it.tensor_data.properties, size=size)))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, item):  # type: ignore[no-untyped-def]
        if item.type != WriteItemType.SHARD:
            return super().resolve_data(item)
        t = self.state_dict[item.index.fqn]
        for d, (o, s) in enumerate(zip(item.tensor_data.chunk.offsets, item.tensor_data.chunk.sizes)):
            t = t.narrow(d, o, s)
        return t


def save_dcp(path: Path, state: dict[str, Any], *, splits: tuple[int, ...] = (2, 3, 2),
             per_chunk_files: bool = False, fmt: SerializationFormat = SerializationFormat.TORCH_SAVE) -> Path:
    """`dcp.save` of `state` in this process; one file for everything, or one per chunk."""
    writer = FileSystemWriter(str(path), single_file_per_rank=not per_chunk_files, sync_files=False,
                              serialization_format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, storage_writer=writer, planner=SplitPlanner(splits), no_dist=True)
    return path


def model_tensors(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fresh random bf16 / fp32 tensors of 1, 2 and 3 dims (and an odd 4-D one)."""
    def r(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return {
        "embed.weight": r(11, 8),
        "layers.0.attn.q.weight": r(8, 8, dtype=torch.float32),
        "layers.0.mlp.experts.w1": r(4, 6, 10),  # fused experts [E, H, C]
        "layers.0.norm.weight": r(8, dtype=torch.float32),
        "layers.0.odd": r(3, 5, 4, 7),
        "head.bias": r(13),
    }


def optimizer_state(model: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, Any]:
    return {
        "state": {k: {"exp_avg": torch.randn(v.shape, generator=gen), "exp_avg_sq": torch.rand(v.shape, generator=gen),
                      "step": torch.tensor(7.0)} for k, v in model.items() if isinstance(v, torch.Tensor)},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": list(model)}],
    }


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_all(ck: Checkpoint, name: str, step: int) -> bytes:
    """Tensor `name` read `step` rows at a time (the last range shorter)."""
    t = ck.tensors[name]
    buf = bytearray(t.nbytes)
    for r0 in range(0, t.rows, step):
        r1 = min(t.rows, r0 + step)
        ck.read_rows(name, r0, r1, memoryview(buf)[r0 * t.row_bytes:r1 * t.row_bytes])
    return bytes(buf)


def load_out(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged output directory."""
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


class Recorder:
    """Wraps `storage.open_source` to record every file opened and every byte range read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.reads: list[tuple[str, int, int]] = []
        real = storage.open_source
        rec = self

        class Counting:
            def __init__(self, fs: Any, path: str) -> None:
                self._src = real(fs, path)
                self.name, self.size = self._src.name, self._src.size
                rec.opened.append(str(path))

            def read_into(self, offset: int, out: memoryview) -> None:
                rec.reads.append((str(self.name), offset, offset + len(out)))
                self._src.read_into(offset, out)

            def close(self) -> None:
                self._src.close()

        monkeypatch.setattr(storage, "open_source", Counting)

    def overlap(self, ranges: list[tuple[str, int, int]]) -> int:
        """Bytes read inside any of `ranges` (file path, start, end)."""
        n = 0
        for f, a, b in self.reads:
            for g, c, d in ranges:
                if f == g:
                    n += max(0, min(b, d) - max(a, c))
        return n

    def outside(self, ranges: list[tuple[str, int, int]], suffix: str) -> list[tuple[str, int, int]]:
        """Reads of files ending in `suffix` not contained in one of `ranges`."""
        return [(f, a, b) for f, a, b in self.reads if f.endswith(suffix)
                and not any(f == g and c <= a and b <= d for g, c, d in ranges)]


def torch_metadata(path: Path) -> Any:
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # noqa: S301 - our own test checkpoint


def stored_ranges(path: Path, prefix: str) -> list[tuple[str, int, int]]:
    """(file path, start, end) of every stored item whose key starts with `prefix`."""
    md = torch_metadata(path)
    return [(str(path / info.relative_path), info.offset, info.offset + info.length)
            for idx, info in md.storage_data.items() if idx.fqn.startswith(prefix)]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


# -- reading ------------------------------------------------------------------------------

LAYOUTS = {
    "one-file-grid": dict(splits=(2, 3, 2)),
    "file-per-chunk": dict(splits=(3, 2, 3, 2), per_chunk_files=True),
    "whole-tensors": dict(splits=()),
    "safetensors-files": dict(splits=(2, 2), per_chunk_files=True, fmt=SerializationFormat.SAFETENSORS),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_model_tensor_reads_back_byte_identical(tmp_path: Path, gen: torch.Generator, layout: str) -> None:
    model = model_tensors(gen)
    model["layers.0.counts"] = torch.randint(0, 1000, (9, 2), generator=gen)
    model["scale"] = torch.randn((), generator=gen)
    path = save_dcp(tmp_path / "ck", {"model": model, "optimizer": optimizer_state(model, gen)}, **LAYOUTS[layout])
    ck = Checkpoint.open(str(path))
    try:
        assert isinstance(ck, DcpCheckpoint)
        assert set(ck.tensors) == set(model)  # prefix stripped, no optimizer keys
        for name, src in model.items():
            t = ck.tensors[name]
            assert t.shape == tuple(src.shape) and t.nbytes == src.numel() * src.element_size()
            want = as_bytes(src)
            for step in (1, 2, 3, 7, t.rows):
                assert read_all(ck, name, max(1, step)) == want, (name, step)
    finally:
        ck.close()


def test_reads_agree_with_torchs_own_loader(tmp_path: Path, gen: torch.Generator) -> None:
    model = model_tensors(gen)
    path = save_dcp(tmp_path / "ck", {"model": model})
    back = {"model": {k: torch.zeros_like(v) for k, v in model.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(back, checkpoint_id=str(path), no_dist=True)
    ck = Checkpoint.open(str(path))
    try:
        for name in model:
            assert read_all(ck, name, 5) == as_bytes(back["model"][name])
    finally:
        ck.close()


def test_extra_state_is_exposed_as_bytes_and_other_objects_skipped(tmp_path: Path, gen: torch.Generator) -> None:
    model: dict[str, Any] = model_tensors(gen)
    blob = os.urandom(300)
    model["layers.0.attn._extra_state"] = io.BytesIO(blob)  # TransformerEngine's opaque state
    model["layers.0.note"] = {"anything": 1}  # another non-tensor entry: not a weight
    path = save_dcp(tmp_path / "ck", {"model": model, "optimizer": optimizer_state(model_tensors(gen), gen)})
    ck = Checkpoint.open(str(path))
    try:
        t = ck.tensors["layers.0.attn._extra_state"]
        assert t.dtype == "U8" and len(t.shape) == 1
        (f, start, end), = stored_ranges(path, "model.layers.0.attn._extra_state")
        assert read_all(ck, t.name, 64) == Path(f).read_bytes()[start:end]
        # the stored bytes are DCP's torch.save of the object, which holds the payload
        assert torch.load(io.BytesIO(read_all(ck, t.name, t.rows)), weights_only=False).getvalue() == blob
        assert not any(n.startswith("layers.0.note") for n in ck.tensors)
    finally:
        ck.close()


def test_names_custom_prefix_and_rename(tmp_path: Path, gen: torch.Generator) -> None:
    model = model_tensors(gen)
    path = save_dcp(tmp_path / "ck", {"model": model, "optimizer": optimizer_state(model, gen)})
    names = DcpNames(prefix="model.", rename=(("layers.", "model.layers."), ("embed.", "model.embed_tokens."),
                                                ("model.layers.0.", "never.")))
    ck = Checkpoint.open(str(path), names=names)
    try:
        assert set(ck.tensors) == {"model.embed_tokens.weight", "model.layers.0.attn.q.weight",
                                   "model.layers.0.mlp.experts.w1", "model.layers.0.norm.weight",
                                   "model.layers.0.odd", "head.bias"}  # first matching rule only
        assert read_all(ck, "model.layers.0.mlp.experts.w1", 4) == as_bytes(model["layers.0.mlp.experts.w1"])
    finally:
        ck.close()
    # an explicit prefix reads that part of the state dict (here: the optimizer's state)
    ck = Checkpoint.open(str(path), names=DcpNames(prefix="optimizer.state"))
    try:
        assert "embed.weight.exp_avg" in ck.tensors and "embed.weight" not in ck.tensors
    finally:
        ck.close()


def test_flat_state_dict_without_model_prefix_skips_training_state(tmp_path: Path, gen: torch.Generator) -> None:
    model = model_tensors(gen)  # torchtitan style: model keys at the top level
    state = {**model, "optimizer": optimizer_state(model, gen),
             "lr_scheduler": {"last_lr": torch.tensor([1e-4])}, "rng_state": torch.get_rng_state()}
    path = save_dcp(tmp_path / "ck", state)
    ck = Checkpoint.open(str(path))
    try:
        assert set(ck.tensors) == set(model)
    finally:
        ck.close()


def test_select_names_rules() -> None:
    keys = ["model.a", "model.b.c", "optimizer.state.a.exp_avg", "modelx.d"]
    assert select_names(keys, None, where="x") == {"model.a": "a", "model.b.c": "b.c"}
    assert select_names(keys, DcpNames(prefix=""), where="x") == {"model.a": "model.a", "model.b.c": "model.b.c",
                                                                 "modelx.d": "modelx.d"}
    assert select_names(["a.x", "optim.s", "lr_scheduler.k", "train_state"], None, where="x") == {"a.x": "a.x"}
    with pytest.raises(CheckpointError, match=r"`model.a` and `model.b.c` both become `z`"):
        select_names(keys, DcpNames(rename=(("a", "z"), ("b.c", "z"))), where="x")
    with pytest.raises(CheckpointError, match=r"ck: no model tensors under the prefix `net.`.*model, modelx, optimizer"):
        select_names(keys, DcpNames(prefix="net"), where="ck")


def test_dcp_config_key_is_parsed_and_checked() -> None:
    doc = {"merge_method": "sma", "models": ["a", "b"],
           "dcp": {"prefix": "model", "rename": {"layers.": "model.layers.", "tok.": "model.embed."}}}
    cfg = parse_config(doc)
    assert cfg.dcp == DcpNames(prefix="model", rename=(("layers.", "model.layers."), ("tok.", "model.embed.")))
    assert parse_config({"merge_method": "sma", "models": ["a"]}).dcp is None
    with pytest.raises(ConfigError, match="dcp.rename"):
        parse_dcp_names({"rename": {"": "x"}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_dcp_names({"prefix": "model", "renames": {}})
    with pytest.raises(ConfigError, match="dcp.prefix"):
        parse_dcp_names({"prefix": 3})


# -- merging: optimizer bytes never read, PMA equals the reference -------------------------


def _snapshots(tmp_path: Path, gen: torch.Generator, n: int, **layout: Any) -> tuple[list[dict], list[Path]]:
    models, paths = [], []
    first = model_tensors(gen)
    for i in range(n):
        model = {k: (v.double() + 0.2 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(v.dtype)
                 for k, v in first.items()}
        model["counts"] = torch.arange(6) * 3  # integer tensor: copied, not averaged
        model["layers.0.attn._extra_state"] = io.BytesIO(os.urandom(64))
        p = save_dcp(tmp_path / f"step-{(i + 1) * 1000}", {"model": model, "optimizer": optimizer_state(model, gen)},
                     **layout)
        (p / "config.json").write_text(json.dumps({"model_type": "test", "num_hidden_layers": 1}))
        models.append(model)
        paths.append(p)
    return models, paths


@pytest.mark.parametrize("per_chunk_files", [False, True], ids=["shared-file", "file-per-chunk"])
def test_merge_never_reads_optimizer_bytes(tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                           per_chunk_files: bool) -> None:
    _, paths = _snapshots(tmp_path, gen, 3, per_chunk_files=per_chunk_files)
    rec = Recorder(monkeypatch)
    api.run({"merge_method": "sma", "models": [str(p) for p in paths]}, str(tmp_path / "out"), chunk_rows=2)
    optim = [r for p in paths for r in stored_ranges(p, "optimizer.")]
    model = [r for p in paths for r in stored_ranges(p, "model.")]
    assert optim and rec.reads
    assert rec.overlap(optim) == 0
    assert rec.outside(model, ".distcp") == []  # every data-file read lies inside a model item
    assert rec.overlap(model) >= sum(e - s for _, s, e in model)  # and every model item is read
    if per_chunk_files:
        optim_files = {f for f, _, _ in optim}
        assert optim_files.isdisjoint({f for f, _, _ in model})
        assert optim_files.isdisjoint(rec.opened)  # never even opened


def test_sma_of_three_dcp_snapshots_equals_float64_reference(tmp_path: Path, gen: torch.Generator) -> None:
    models, paths = _snapshots(tmp_path, gen, 3)
    res = api.run({"merge_method": "sma", "models": [str(p) for p in paths]}, str(tmp_path / "out"), chunk_rows=3)
    out = load_out(tmp_path / "out")
    assert res.plan.method == "sma"
    for name, first in models[0].items():
        if isinstance(first, io.BytesIO):
            continue
        got = out[name]
        if not first.is_floating_point():
            assert torch.equal(got, first)
            continue
        xs = [m[name].double() for m in models]
        ref = sum(xs) / 3
        fi = torch.finfo(first.dtype)
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(fi.tiny)))) * fi.eps
        bound = ulp + fp32_bound(None, xs, [{}] * 3, {}, "sma")
        assert got.dtype == first.dtype and got.shape == first.shape
        assert ((got.double() - ref).abs() <= bound).all(), name
        assert not torch.equal(got, models[-1][name])
    # copied from the newest snapshot, byte for byte
    (f, s, e), = stored_ranges(paths[-1], "model.layers.0.attn._extra_state")
    assert as_bytes(out["layers.0.attn._extra_state"]) == Path(f).read_bytes()[s:e]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "test"


def test_dcp_input_merges_like_the_same_weights_in_safetensors(tmp_path: Path, gen: torch.Generator) -> None:
    models, paths = _snapshots(tmp_path, gen, 3, splits=(3, 2, 2))
    hf = [write_checkpoint(tmp_path / f"hf-{i}", {k: v for k, v in m.items() if isinstance(v, torch.Tensor)})
          for i, m in enumerate(models)]
    doc = {"merge_method": "ema", "parameters": {"alpha": 0.3}, "dcp": {"rename": {"layers.": "model.layers."}}}
    api.run({**doc, "models": [str(p) for p in paths]}, str(tmp_path / "from-dcp"), chunk_rows=2)
    api.run({**doc, "models": [str(p) for p in hf]}, str(tmp_path / "from-hf"), chunk_rows=5)
    a, b = load_out(tmp_path / "from-dcp"), load_out(tmp_path / "from-hf")
    assert "model.layers.0.odd" in a and "layers.0.odd" in b  # the config's rename applied
    for name, t in b.items():
        dname = name.replace("layers.", "model.layers.", 1) if name.startswith("layers.") else name
        assert as_bytes(a[dname]) == as_bytes(t), name


def test_inspect_lists_a_dcp_directory(tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    model = model_tensors(gen)
    path = save_dcp(tmp_path / "ck", {"model": model, "optimizer": optimizer_state(model, gen)})
    code, out, err = run_cli("inspect", str(path))
    assert code == 0, err
    for name in model:
        assert name in out
    assert "exp_avg" not in out


def test_reads_from_s3(tmp_path: Path, gen: torch.Generator, s3_server: str) -> None:
    import fsspec

    model = model_tensors(gen)
    path = save_dcp(tmp_path / "ck", {"model": model, "optimizer": optimizer_state(model, gen)}, per_chunk_files=True)
    fs = fsspec.filesystem("s3")
    fs.mkdir("bucket")
    fs.put(str(path) + "/", "bucket/ck/", recursive=True)
    assert fs.isfile("bucket/ck/.metadata")
    ck = Checkpoint.open("s3://bucket/ck")
    try:
        assert isinstance(ck, DcpCheckpoint)
        for name, src in model.items():
            assert read_all(ck, name, 3) == as_bytes(src), name
    finally:
        ck.close()


# -- hostile and broken checkpoints -------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_that_runs_code_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"bad/.metadata: refers to `(posix|os|nt).system`.*refusing"):
        Checkpoint.open(str(bad))
    assert not marker.exists()
    # the payload hidden deep inside otherwise genuine metadata
    assert pickle.loads(pickle.dumps(_RunsCode(marker))) == 0 and marker.exists()  # the payload is live
    marker.unlink()


def test_payload_inside_genuine_metadata_is_rejected(tmp_path: Path, gen: torch.Generator) -> None:
    marker = tmp_path / "pwned"
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)})
    md = torch_metadata(path)
    md.planner_data = {"model.embed.weight": (_RunsCode(marker),)}
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        Checkpoint.open(str(path))
    assert not marker.exists()


def test_crafted_chunk_archive_is_rejected(tmp_path: Path, gen: torch.Generator) -> None:
    """A chunk whose data.pkl would run code: torch.save of a hostile object, appended to the
    data file, with .metadata pointing one chunk at it."""
    marker = tmp_path / "pwned"
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)})
    payload = io.BytesIO()
    torch.save(_RunsCode(marker), payload)
    data = path / "__0_0.distcp"
    at = data.stat().st_size
    with open(data, "ab") as f:
        f.write(payload.getvalue())
    md = torch_metadata(path)
    idx = next(i for i in md.storage_data if i.fqn == "model.head.bias")
    md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], offset=at, length=len(payload.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: tensor `model.head.bias` chunk .*refers to `(posix|os).system`"):
        Checkpoint.open(str(path))
    assert not marker.exists()


def test_truncated_data_file_is_reported_with_file_and_tensor(tmp_path: Path, gen: torch.Generator) -> None:
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)})
    data = path / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size - 100)
    with pytest.raises(CheckpointError, match=r"ck/__0_0.distcp: tensor `model\.[\w.]+` is stored at bytes .*\(truncated"):
        Checkpoint.open(str(path))


def test_missing_data_file_is_reported(tmp_path: Path, gen: torch.Generator) -> None:
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)}, per_chunk_files=True)
    victim = Path(stored_ranges(path, "model.layers.0.odd")[1][0])
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"ck/{victim.name}: data file of tensor `model.layers.0.odd` .* does not exist"):
        Checkpoint.open(str(path))


def test_corrupt_chunk_archive_is_reported(tmp_path: Path, gen: torch.Generator) -> None:
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)})
    (_, start, end), *_ = stored_ranges(path, "model.embed.weight")
    data = path / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[end - 22:end] = b"\0" * 22  # the archive's end-of-central-directory record
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: tensor `model.embed.weight` chunk at offsets .* not a readable torch.save archive"):
        Checkpoint.open(str(path))


@pytest.mark.parametrize("damage,message", [
    ("drop", r"its chunks hold \d+ of its 88 elements"),
    ("overlap", r"chunks at offsets \[.*\] and \[.*\] overlap"),
    ("outside", r"lies outside the tensor's shape \[11, 8\]"),
])
def test_chunks_not_covering_the_tensor_are_reported(tmp_path: Path, gen: torch.Generator, damage: str,
                                                      message: str) -> None:
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)}, splits=(2, 2))
    md = torch_metadata(path)
    tm = md.state_dict_metadata["model.embed.weight"]
    chunks = tm.chunks
    if damage == "drop":
        chunks.pop()
    elif damage == "overlap":
        chunks[1] = ChunkStorageMetadata(offsets=chunks[1].offsets, sizes=torch.Size([chunks[1].sizes[0] + 1, chunks[1].sizes[1]]))
    else:
        chunks[-1] = ChunkStorageMetadata(offsets=torch.Size([10, 4]), sizes=torch.Size([2, 4]))
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"ck/.metadata: tensor `model.embed.weight`: .*" + message):
        Checkpoint.open(str(path))


def test_unsupported_dtype_names_the_tensor(tmp_path: Path, gen: torch.Generator) -> None:
    model = model_tensors(gen)
    model["rot.freqs"] = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
    path = save_dcp(tmp_path / "ck", {"model": model})
    with pytest.raises(CheckpointError, match=r"tensor `model.rot.freqs`: dtype torch.complex64 is not supported"):
        Checkpoint.open(str(path))


def test_non_row_major_chunk_is_refused(tmp_path: Path, gen: torch.Generator) -> None:
    model = model_tensors(gen)
    model["tied.weight"] = torch.randn(6, 9, generator=gen).t()  # dense, saved with its strides
    path = save_dcp(tmp_path / "ck", {"model": model}, splits=())
    with pytest.raises(CheckpointError, match=r"tensor `model.tied.weight` .*strides \[1, 9\], not row-major"):
        Checkpoint.open(str(path))


def test_a_directory_without_metadata_is_not_dcp(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "__0_0.distcp").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="or DCP .metadata here"):
        Checkpoint.open(str(tmp_path / "d"))


# -- a real multi-rank DTensor checkpoint (what FSDP2 / tensor parallel save) --------------

_RANK_SCRIPT = '''
import os, sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

rank, world, out, store, seed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
g = torch.Generator().manual_seed(seed)
full = {"embed.weight": torch.randn(11, 8, generator=g).to(torch.bfloat16),
        "layers.0.experts.w1": torch.randn(5, 6, 9, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.randn(7, generator=g),
        "head.weight": torch.randn(9, 10, generator=g)}
places = {"embed.weight": [Shard(0), Shard(1)], "layers.0.experts.w1": [Shard(0), Shard(2)],
          "layers.0.norm.weight": [Shard(0), Replicate()], "head.weight": [Replicate(), Shard(1)]}
model = {k: distribute_tensor(v, mesh, places[k]) for k, v in full.items()}
optim = {"state": {k: {"exp_avg": distribute_tensor(torch.randn(v.shape, generator=g), mesh, places[k])}
                   for k, v in full.items()}}
dcp.save({"model": model, "optimizer": optim}, checkpoint_id=out)
if rank == 0:
    torch.save(full, out + ".full.pt")
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_reads_a_four_rank_dtensor_checkpoint(tmp_path: Path) -> None:
    """Four gloo ranks on a 2x2 mesh save DTensors sharded along rows, columns and experts."""
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "ck"
    seed = str(int(torch.randint(0, 2**31 - 1, ())))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "4", str(out), str(tmp_path / "store"), seed])
             for r in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    full = torch.load(str(out) + ".full.pt")
    ck = Checkpoint.open(str(out))
    try:
        assert set(ck.tensors) == set(full)
        for name, src in full.items():
            for step in (1, 4, ck.tensors[name].rows):
                assert read_all(ck, name, step) == as_bytes(src), (name, step)
    finally:
        ck.close()


class _BytesSource:
    """An in-memory ByteSource."""

    def __init__(self, raw: bytes) -> None:
        self.name, self.size, self._raw = "mem", len(raw), raw

    def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self._raw[offset:offset + len(out)]

    def close(self) -> None:
        pass


def _zipfile_entries(raw: bytes) -> dict:
    import zipfile

    from moemerge.io.dcp_layout import ZipEntry

    return {i.filename: ZipEntry(i.header_offset, i.compress_type, i.compress_size, i.CRC)
            for i in zipfile.ZipFile(io.BytesIO(raw)).infolist()}


@pytest.mark.parametrize("kind", ["torch.save", "zip64-fields", "comment"])
def test_archive_directory_parse_agrees_with_zipfile(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The direct central-directory parse (zip64 records included) gives zipfile's answer, or
    steps aside (None) for archives it does not handle."""
    import zipfile

    from moemerge.io.dcp_layout import RangeFile, zip_entries, zip_entries_fast

    buf = io.BytesIO()
    if kind == "torch.save":
        torch.save(torch.randn(40, 30), buf)  # torch writes zip64 end records even when small
    else:
        members = {"archive/data.pkl": os.urandom(300), "archive/data/0": os.urandom(5000)}
        if kind == "zip64-fields":
            # sizes and offsets above this limit are written as zip64 extra fields, as torch
            # does for members and archives above 4 GiB
            monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in members.items():
                with zf.open(name, "w", force_zip64=True) as f:
                    f.write(data)
            if kind == "comment":
                zf.comment = b"not what torch writes"
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", (1 << 31) - 1)
    raw = buf.getvalue()
    rf = RangeFile(_BytesSource(raw), 0, len(raw))
    want = _zipfile_entries(raw)
    fast = zip_entries_fast(rf)
    if kind == "comment":
        assert fast is None
    else:
        assert fast == want
    assert zip_entries(rf) == want


def test_locating_a_chunk_costs_two_small_reads(tmp_path: Path, gen: torch.Generator,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = {"w": torch.randn(64, 96, generator=gen), "v": torch.randn(3, 128, 40, generator=gen).to(torch.bfloat16)}
    path = save_dcp(tmp_path / "ck", {"model": model, "optimizer": optimizer_state(model, gen)}, splits=(2, 2))
    chunks = stored_ranges(path, "model.")
    assert min(e - s for _, s, e in chunks) > 3 * 1024  # bigger than both windows together
    rec = Recorder(monkeypatch)
    Checkpoint.open(str(path)).close()
    data_reads = [r for r in rec.reads if r[0].endswith(".distcp")]
    assert len(data_reads) == 2 * len(chunks)
    assert sum(b - a for _, a, b in data_reads) <= 3 * 1024 * len(chunks)


def test_chunks_stored_through_extensions_are_refused(tmp_path: Path, gen: torch.Generator) -> None:
    path = save_dcp(tmp_path / "ck", {"model": model_tensors(gen)})
    md = torch_metadata(path)
    idx = next(i for i in md.storage_data if i.fqn == "model.embed.weight")
    md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], transform_descriptors=["stream.zstd"])
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"tensor `model.embed.weight`: stored through DCP extensions \['stream.zstd'\]"):
        Checkpoint.open(str(path))


def test_pma_update_over_dcp_snapshots_keeps_its_name_mapping(tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    """`pma update --rename` maps DCP keys on the first night, later nights take it from the
    state, and a different mapping is refused."""
    models = []
    for step in (100, 200, 300):
        m = model_tensors(gen)
        models.append(m)
        save_dcp(tmp_path / "ckpt" / f"step-{step}", {"model": m, "optimizer": optimizer_state(m, gen)})
    pattern = str(tmp_path / "ckpt" / "step-*")
    state, out = tmp_path / "state", tmp_path / "out"
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--last", "2", "--rename",
                           "layers.=model.layers.", "--no-progress")
    assert code == 0, err
    got = load_out(out)
    assert "model.layers.0.attn.q.weight" in got and "layers.0.attn.q.weight" not in got
    expect = (models[1]["layers.0.attn.q.weight"].double() + models[2]["layers.0.attn.q.weight"].double()) / 2
    torch.testing.assert_close(got["model.layers.0.attn.q.weight"].double(), expect, rtol=1e-6, atol=1e-6)
    m = model_tensors(gen)
    save_dcp(tmp_path / "ckpt" / "step-400", {"model": m, "optimizer": optimizer_state(m, gen)})
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--no-progress")  # mapping from the state
    assert code == 0, err
    got = load_out(out)
    expect = (models[2]["layers.0.attn.q.weight"].double() + m["layers.0.attn.q.weight"].double()) / 2
    torch.testing.assert_close(got["model.layers.0.attn.q.weight"].double(), expect, rtol=1e-6, atol=1e-6)
    code, _, err = run_cli("pma", "update", state, pattern, "-o", out, "--rename", "layers.=x.", "--no-progress")
    assert code != 0 and "--rename layers.=model.layers." in err and "--rename layers.=x." in err
