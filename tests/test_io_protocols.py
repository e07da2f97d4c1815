"""The io boundary: one Manifest type for every manifest, one ordered list of readable formats,
writer capabilities as protocols, remote reads landing in the caller's buffer."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

from moemerge import api
from moemerge.errors import CheckpointError
from moemerge.export import export
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dcp import DcpCheckpoint
from moemerge.io.formats import FORMATS, CheckpointReader, open_checkpoint, unwrap
from moemerge.io.manifest import MANIFEST_NAME, Manifest, TensorEntry
from moemerge.io.output import output_target
from moemerge.io.s3_writer import RemoteModelWriter
from moemerge.io.writer import LocalModelWriter, SupportsAdopt, SupportsFlush, SupportsReadBack
from moemerge.io.zarr_reader import ZarrCheckpoint
from moemerge.io.zarr_writer import ZarrModelWriter


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(8, 4, generator=g),
            "model.layers.0.mlp.experts.w1": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(4, generator=g)}


def _config(a: Path, b: Path) -> dict[str, object]:
    return {"merge_method": "linear",
            "models": [{"model": str(a), "parameters": {"weight": 0.4}},
                       {"model": str(b), "parameters": {"weight": 0.6}}]}


@pytest.fixture
def merged(tmp_path: Path, ckpt_factory) -> dict[str, Path]:
    """A safetensors output, a Zarr output of the same merge, and its export."""
    a, b = ckpt_factory("a", _model(1)), ckpt_factory("b", _model(2))
    out, zout, exported = tmp_path / "out", tmp_path / "out.zarr", tmp_path / "exported"
    api.run(_config(a, b), str(out))
    api.run(_config(a, b), str(zout), out_format="zarr", manifest_extra={"pma": {"method": "sma"}})
    export(str(zout), str(exported))
    return {"input": a, "safetensors": out, "zarr": zout, "exported": exported}


# -- Manifest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "zarr", "exported"])
def test_manifest_round_trips_every_output_byte_for_byte(merged: dict[str, Path], kind: str) -> None:
    raw = (merged[kind] / MANIFEST_NAME).read_bytes()
    m = Manifest.from_json(raw, where=kind)
    assert m.to_json() == raw
    assert Manifest.from_json(m.to_json(), where=kind) == m
    assert m.tensors and all(e.sha256 for e in m.tensors.values())


def test_manifest_records_what_each_writer_adds(merged: dict[str, Path]) -> None:
    plain = Manifest.from_json((merged["safetensors"] / MANIFEST_NAME).read_bytes(), where="s")
    zarr = Manifest.from_json((merged["zarr"] / MANIFEST_NAME).read_bytes(), where="z")
    exported = Manifest.from_json((merged["exported"] / MANIFEST_NAME).read_bytes(), where="e")
    assert plain.format is None and zarr.format == "zarr" and exported.format is None
    assert zarr.files == {} and exported.files == plain.files
    assert zarr.pma == {"method": "sma"} and list(zarr.to_dict())[-2:] == ["pma", "format"]
    assert all(e.array for e in (zarr.tensors or {}).values())
    assert exported.exported_from == str(merged["zarr"]) and list(exported.to_dict())[-1] == "exported_from"
    assert {n: e.sha256 for n, e in (exported.tensors or {}).items()} == \
        {n: e.sha256 for n, e in (plain.tensors or {}).items()}


def test_manifest_built_in_code_keeps_the_key_order_moemerge_writes() -> None:
    m = Manifest(moemerge_version="0", method="linear", seed=0, files={"m.safetensors": 8},
                 tensors={"w": TensorEntry(file="m.safetensors", dtype="F32", shape=(2,), sha256="ab")})
    assert list(m.to_dict()) == ["moemerge_version", "method", "seed", "files", "tensors"]
    assert m.to_dict()["tensors"] == {"w": {"file": "m.safetensors", "dtype": "F32", "shape": [2], "sha256": "ab"}}
    later = m.updated(format="zarr", method="slerp").with_extra({"custom": [1]})
    assert list(later.to_dict()) == ["moemerge_version", "method", "seed", "files", "tensors", "format", "custom"]
    assert later.method == "slerp" and later.extra == {"custom": [1]}
    assert Manifest.from_json(later.to_json(), where="x") == later


@pytest.mark.parametrize("raw, said", [
    (b"{garbage", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b'{"tensors": {"w": 3}}', "tensor `w`"),
    (b'{"tensors": {"w": {"shape": "big"}}}', "`shape`"),
    (b'{"tensors": {}, "seed": "zero"}', "`seed`"),
])
def test_a_damaged_manifest_is_one_clear_error_naming_the_file(raw: bytes, said: str) -> None:
    with pytest.raises(CheckpointError, match=r"^out/moemerge-manifest\.json: .*damaged") as e:
        Manifest.from_json(raw, where=f"out/{MANIFEST_NAME}")
    assert said in str(e.value) and "\n" not in str(e.value)


def test_a_manifest_without_tensors_is_damaged_for_its_readers() -> None:
    m = Manifest.from_json(b'{"x": 1}', where="m")
    assert m.extra == {"x": 1} and m.to_json() == b'{\n "x": 1\n}'
    with pytest.raises(CheckpointError, match="has no `tensors` map"):
        m.listed("out/" + MANIFEST_NAME)


# -- formats ------------------------------------------------------------------------------------


def _dcp_dir(path: Path) -> Path:
    state = {"model": {"layers.0.w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=False), no_dist=True)
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_each_format_is_sniffed_and_opened_by_its_reader(merged: dict[str, Path], tmp_path: Path) -> None:
    places = {
        "zarr": (merged["zarr"], ZarrCheckpoint),
        "safetensors-file": (merged["safetensors"] / "model-00001-of-00001.safetensors", Checkpoint),
        "safetensors": (merged["safetensors"], Checkpoint),
        "safetensors-single": (merged["input"], Checkpoint),
        "dcp": (_dcp_dir(tmp_path / "dcp"), DcpCheckpoint),
    }
    assert [f.name for f in FORMATS] == list(places)  # every format has a case here
    fs = fsspec.filesystem("file")
    for fmt in FORMATS:
        where, cls = places[fmt.name]
        first = next(f for f in FORMATS if f.sniff(fs, str(where), str(where)))
        assert first is fmt, (fmt.name, first.name)
        ck = open_checkpoint(str(where))
        try:
            assert type(ck) is cls and ck.tensors
            reader: CheckpointReader = ck  # every reader offers the protocol
            assert reader.url == str(where)
        finally:
            ck.close()


def test_an_unknown_directory_names_every_format(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(str(tmp_path / "stuff"))
    text = str(e.value)
    for fmt in FORMATS:
        if fmt.name != "safetensors-file":
            assert fmt.marker in text and fmt.what in text, fmt.name
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(str(tmp_path / "nothing"))


def test_a_view_unwraps_to_the_checkpoint_holding_the_files(merged: dict[str, Path]) -> None:
    ck = Checkpoint.open(str(merged["input"]))
    try:
        assert unwrap(ck) is ck
    finally:
        ck.close()


# -- writers ------------------------------------------------------------------------------------


def test_the_writer_kind_is_decided_once_from_the_target(tmp_path: Path) -> None:
    assert output_target(str(tmp_path / "o")).kind == "local"
    assert output_target(f"file://{tmp_path}/o").kind == "local"
    assert output_target("memory://o").kind == "remote"
    assert output_target(str(tmp_path / "o"), "zarr").kind == "zarr"


def test_writer_capabilities_are_protocols() -> None:
    assert issubclass(LocalModelWriter, SupportsFlush) and issubclass(LocalModelWriter, SupportsReadBack)
    assert not issubclass(LocalModelWriter, SupportsAdopt)
    assert issubclass(RemoteModelWriter, SupportsAdopt) and not issubclass(RemoteModelWriter, SupportsFlush)
    assert issubclass(ZarrModelWriter, SupportsReadBack) and not issubclass(ZarrModelWriter, SupportsAdopt)


# -- remote reads -------------------------------------------------------------------------------


def test_a_remote_range_lands_in_the_buffer_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = fsspec.filesystem("memory")
    blob = bytes(range(256)) * 40
    fs.pipe_file("/ranges/blob", blob)
    asked: list[int] = []
    real = fs.cat_file

    def cat_file(path: str, start: int | None = None, end: int | None = None, **kw: object) -> bytes:
        asked.append((end or 0) - (start or 0))
        return bytes(real(path, start=start, end=end, **kw))

    monkeypatch.setattr(fs, "cat_file", cat_file)
    monkeypatch.setattr(storage, "REMOTE_PIECE", 1000)
    src = storage.open_source(fs, "/ranges/blob")
    out = bytearray(3333)
    src.read_into(17, memoryview(out))
    assert bytes(out) == blob[17:17 + 3333]
    assert asked == [1000, 1000, 1000, 333]  # no piece above REMOTE_PIECE: a bounded extra copy


def test_a_state_version_manifest_keeps_the_bytes_moemerge_wrote(tmp_path: Path) -> None:
    """A PMA state version (pma.state) is a Zarr group whose manifest holds the state's meta."""
    import json

    from moemerge.io.zarr_writer import ZarrArraySpec

    spec = ZarrArraySpec(name="S:w", shape=(4, 2), dtype="F64", rows_per_chunk=2)
    w = ZarrModelWriter(str(tmp_path / "v1"), [spec], attributes={}, overwrite=False, checksums=True)
    w.prepare()
    for r0 in (0, 2):
        w.write_rows("S:w", r0, memoryview(bytes(range(32))))
    meta = {"format": 1, "version": 1, "steps": [{"step": 5, "url": "s"}]}
    w.finish(side_files={}, index={}, manifest=Manifest(pma_state=meta, tensors={}))
    raw = (tmp_path / "v1" / MANIFEST_NAME).read_bytes()
    doc = json.loads(raw)
    # the layout moemerge has always written: the dict {"pma_state", "tensors"} plus what the
    # Zarr writer adds, in that order
    legacy = {"pma_state": meta, "tensors": {}, "format": "zarr", "files": {},
              "chunk_checksums": doc["chunk_checksums"]}
    assert raw == json.dumps(legacy, indent=1).encode()
    assert len(doc["chunk_checksums"]) == 2
    assert Manifest.from_json(raw, where="v1").to_json() == raw
