"""The synthetic checkpoint generator: valid files, deterministic bytes, HF layout, loadable models."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moemerge.errors import ConfigError, OutputError
from moemerge.io.safetensors_format import parse_header, parse_header_length
from moemerge.synthetic import (
    BLOCK,
    FAMILIES,
    CheckpointSpec,
    make_checkpoint,
    make_family,
    make_single_tensor_checkpoint,
)

TINY = dict(layers=2, hidden=32, intermediate=48, experts=4, vocab=64, heads=4, kv_heads=2)
LOADABLE = ("mixtral", "qwen3_moe", "dense", "deepseek", "fused")  # all five load in transformers 5


def _load_all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _files_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_files_parse_and_match_the_spec(tmp_path: Path, family: str) -> None:
    spec = CheckpointSpec(family=family, shard_size=40_000, **TINY)
    path = make_checkpoint(tmp_path / family, spec, seed=3)
    expected = {t.name: t for t in spec.tensors()}
    assert len(expected) == len(spec.tensors()), "duplicate tensor names"
    seen: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        raw = f.read_bytes()
        n = parse_header_length(raw[:8], file_size=len(raw), where=f.name)
        header = parse_header(raw[8 : 8 + n], file_size=len(raw), where=f.name)
        assert header.metadata == {"format": "pt"}
        with safe_open(f, framework="pt") as st:
            assert set(st.keys()) == set(header.tensors)
            for name, entry in header.tensors.items():
                t = expected[name]
                assert (entry.dtype, entry.shape) == (t.dtype, t.shape)
                seen[name] = st.get_tensor(name)
    assert set(seen) == set(expected)
    for name, x in seen.items():
        x = x.float()
        assert x.std() > 0, f"{name} is constant"
        mean = 1.0 if expected[name].kind == "norm" else 0.0
        assert abs(x.mean() - mean) < 0.1, name
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    assert json.loads((path / "tokenizer_config.json").read_text())["name_or_path"].endswith("seed3")


def test_bytes_do_not_depend_on_chunk_size(tmp_path: Path) -> None:
    # 1.5 blocks of F16, so chunk boundaries fall inside and across generator blocks.
    shape = (3, BLOCK // 2)
    a = make_single_tensor_checkpoint(tmp_path / "a", "w", shape, "F16", seed=7, chunk_bytes=777_777)
    b = make_single_tensor_checkpoint(tmp_path / "b", "w", shape, "F16", seed=7, chunk_bytes=64 << 20)
    c = make_single_tensor_checkpoint(tmp_path / "c", "w", shape, "F16", seed=8)
    assert _files_bytes(a) == _files_bytes(b)
    assert _files_bytes(a) != _files_bytes(c)
    # A whole family checkpoint, written with tiny odd chunks vs one chunk per tensor.
    kw = dict(family="deepseek", seed=2, base_seed=1, dtype="BF16", **TINY)
    small = make_checkpoint(tmp_path / "small", chunk_bytes=7, **kw)
    big = make_checkpoint(tmp_path / "big", **kw)
    assert _files_bytes(small) == _files_bytes(big)


def test_single_tensor_values_look_like_weights(tmp_path: Path) -> None:
    path = make_single_tensor_checkpoint(tmp_path / "one", "x.weight", (300, 500), "BF16", seed=1)
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors"]
    x = _load_all(path)["x.weight"]
    assert x.dtype == torch.bfloat16 and x.shape == (300, 500)
    assert 0.018 < x.float().std() < 0.022 and (x != 0).float().mean() > 0.99


@pytest.mark.parametrize("shard_size", [25_000, 60_000])
def test_sharding_respects_shard_size_and_index_is_consistent(tmp_path: Path, shard_size: int) -> None:
    spec = CheckpointSpec(family="mixtral", shard_size=shard_size, **TINY)
    path = make_checkpoint(tmp_path / "m", spec)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == spec.total_bytes
    assert list(index["weight_map"]) == [t.name for t in spec.tensors()]
    assert set(index["weight_map"].values()) == set(shards)
    sizes = {t.name: t.nbytes for t in spec.tensors()}
    for shard in shards:
        with safe_open(path / shard, framework="pt") as st:
            names = list(st.keys())
        assert all(index["weight_map"][k] == shard for k in names)
        data = sum(sizes[k] for k in names)
        assert data <= shard_size or len(names) == 1, f"{shard}: {data} bytes"
    assert not list(path.glob("*.partial"))


def test_one_shard_means_model_safetensors_without_index(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", family="qwen3_moe", **TINY)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"
    ]


def test_family_members_share_a_base(tmp_path: Path) -> None:
    paths = make_family(tmp_path, 2, base_seed=5, with_base=True, family="mixtral", dtype="F32",
                        delta_scale=0.1, **TINY)
    assert paths == [tmp_path / "model_0", tmp_path / "model_1"]
    base, m0, m1 = (_load_all(p) for p in (tmp_path / "base", *paths))
    # The base written alone is exactly the shared base of the fine-tunes.
    alone = make_checkpoint(tmp_path / "alone", family="mixtral", dtype="F32", seed=5, **TINY)
    assert _files_bytes(alone)["model.safetensors"] == _files_bytes(tmp_path / "base")["model.safetensors"]
    w = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    for m in (m0, m1):
        for name in (w, "model.norm.weight"):
            tv = m[name] - base[name]
            rel = (tv.norm() / base[name].norm()).item()
            assert 0 < rel < 0.2, (name, rel)
            assert (tv != 0).float().mean() > 0.99
    # Task vectors are independent across models (each model draws its own delta).
    t0, t1 = (m0[w] - base[w]).flatten(), (m1[w] - base[w]).flatten()
    cos = torch.nn.functional.cosine_similarity(t0, t1, dim=0)
    assert abs(cos) < 0.2 and not torch.equal(m0[w], m1[w])


def _expected_in_memory(disk: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Disk names -> the names and fused expert tensors transformers 5 builds at load time."""
    if family == "mixtral":
        disk = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in disk.items()}
        parts = {"w1": "gate", "w3": "up", "w2": "down"}
        pat = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight")
    else:
        parts = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        pat = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for k, v in disk.items():
        m = pat.fullmatch(k)
        if m:
            experts.setdefault((m[1], parts[m[3]]), {})[int(m[2])] = v
        else:
            out[k] = v
    for prefix in {p for p, _ in experts}:
        stack = {part: torch.stack([w for _, w in sorted(experts[prefix, part].items())])
                 for part in ("gate", "up", "down")}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)  # [E, 2I, H]
        out[f"{prefix}.down_proj"] = stack["down"]
    return out


@pytest.mark.parametrize("family", LOADABLE)
def test_transformers_loads_the_checkpoint_and_runs_it(tmp_path: Path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path = make_checkpoint(tmp_path / family, family=family, seed=4, shard_size=30_000, **TINY)
    # Our names, after transformers' own load-time renaming/fusing, are exactly the model's.
    config = transformers.AutoConfig.from_pretrained(path)
    fresh = transformers.AutoModelForCausalLM.from_config(config)
    expected = _expected_in_memory(_load_all(path), family)
    assert set(expected) == set(fresh.state_dict())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name].to(value.dtype)), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 20]])).logits
    assert logits.shape == (1, 4, TINY["vocab"]) and torch.isfinite(logits).all()


def test_sized_lands_near_the_target() -> None:
    spec = CheckpointSpec.sized(2 * 10**9, family="mixtral", layers=8, vocab=32000)
    assert abs(spec.total_bytes - 2 * 10**9) < 0.02 * 2 * 10**9
    assert spec.intermediate == 2 * spec.hidden  # the default ratio is kept
    tiny = CheckpointSpec.sized(1000, family="dense", vocab=16)
    assert tiny.hidden == 8 and tiny.total_bytes < 10_000  # bottoms out at the smallest valid model
    small = CheckpointSpec.sized(300_000, family="qwen3_moe")
    assert small.total_bytes == pytest.approx(300_000, rel=0.1)


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(family="gpt2"), "mixtral"),
        (dict(hidden=30, heads=4), "multiple of 2*heads"),
        (dict(top_k=5, experts=4), "exceeds experts"),
        (dict(dtype="F64"), "BF16"),
        (dict(family="deepseek", layers=1), "layers >= 2"),
    ],
)
def test_bad_specs_are_rejected_by_name(fields: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        CheckpointSpec(**fields)


def test_refuses_to_overwrite_weights_unless_asked(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "m", family="dense", shard_size=20_000, **TINY)
    with pytest.raises(OutputError, match="overwrite=True"):
        make_checkpoint(tmp_path / "m", family="dense", **TINY)
    make_checkpoint(tmp_path / "m", family="dense", overwrite=True, **TINY)
    assert sorted(p.name for p in (tmp_path / "m").glob("model*")) == ["model.safetensors"]


def test_cli_writes_a_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_checkpoints.py"
    spec = importlib.util.spec_from_file_location("make_checkpoints", script)
    assert spec and spec.loader
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [str(tmp_path), "--family", "qwen3_moe", "--models", "2", "--with-base", "--size", "200KB",
            "--shard-size", "50KB", "--dtype", "F16", "--vocab", "64"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("base", "model_0", "model_1"):
        assert f"wrote {tmp_path / name}" in printed
        assert (tmp_path / name / "model.safetensors.index.json").exists()
    assert cli.main([str(tmp_path / "bad"), "--shard-size", "lots"]) == 2


@pytest.mark.slow
def test_a_512mib_tensor_is_generated_in_bounded_memory(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import resource
        from moemerge.synthetic import make_single_tensor_checkpoint
        import torch; torch.randn(1 << 20)  # warm up allocator and kernels before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        make_single_tensor_checkpoint({str(tmp_path / 'big')!r}, "w", (16384, 16384), "BF16")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    root = Path(__file__).resolve().parents[1]
    grown = int(subprocess.run([sys.executable, "-c", code], cwd=root, check=True,
                               capture_output=True, text=True).stdout)
    assert (tmp_path / "big" / "model.safetensors").stat().st_size > 512 << 20
    assert grown < 100 << 20, f"peak RSS grew by {grown} bytes"
