"""The `moemerge` command end to end: version, inspect, plan, run + verify, pma, and what a
finished output directory carries (side files, config copy, manifest checksums)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_yaml
from safetensors.torch import load_file

from moemerge import __version__

#: tiny test models need `--shard-size` below the CLI's 1 MB minimum to get several shards
pytestmark = pytest.mark.usefixtures("small_shards")

INDEX = "model.safetensors.index.json"
MANIFEST = "moemerge-manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tensors(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.randn(24, 16, generator=g),
        "model.layers.0.mlp.experts.1.up_proj.weight": torch.randn(24, 16, generator=g),
        "model.layers.1.mlp.experts.gate_up_proj": torch.randn(2, 16, 12, generator=g),
        "model.layers.1.input_layernorm.weight": torch.randn(16, generator=g) + 1,
        "model.norm.weight": torch.randn(16, generator=g) + 1,
    }
    return {k: v.to(dtype) for k, v in t.items()}


def _model(ckpt_factory, name: str, seed: int, *, shards: int = 1, dtype: torch.dtype = torch.bfloat16) -> Path:
    cfg = {"model_type": "test", "num_hidden_layers": 2, "torch_dtype": "float32", "tag": name}
    path = ckpt_factory(name, _tensors(seed, dtype), shards=shards, config=cfg)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "tag": name}))
    for f in TOKENIZER_FILES:
        (path / f).write_text(json.dumps({"file": f, "tag": name}))
    return path


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _header(path: Path) -> tuple[int, dict]:
    """(data start, header JSON) of a safetensors file, parsed here by hand."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return 8 + n, json.loads(blob[8:8 + n])


def _linear_cfg(tmp_path: Path, a: Path, b: Path, **extra) -> Path:
    doc = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.25}},
                   {"model": str(b), "parameters": {"weight": 0.75}}],
        **extra,
    }
    return write_yaml(tmp_path / "merge.yml", doc)


def test_version(run_cli) -> None:
    code, out, err = run_cli("--version")
    assert code == 0, err
    assert out.strip() == f"moemerge {__version__}"


def test_help_lists_every_command(run_cli) -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    for cmd in ("run", "plan", "pma", "inspect", "verify"):
        assert cmd in out


@pytest.mark.parametrize("shards", [1, 2])
def test_inspect_lists_every_tensor(ckpt_factory, run_cli, shards: int) -> None:
    tensors = _tensors(1)
    tensors["model.ids"] = torch.arange(5, dtype=torch.int64) + 3
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(8, 16, dtype=torch.float16)
    path = ckpt_factory("m", tensors, shards=shards)
    code, out, err = run_cli("inspect", path)
    assert code == 0, err
    lines = out.splitlines()
    for name, t in tensors.items():
        row = next((ln for ln in lines if name in ln.split()), None)
        assert row is not None, f"{name} not listed:\n{out}"
        dt = {torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}[t.dtype]
        assert dt in row and str(list(t.shape)) in row, row
    assert f"{len(tensors)} tensors" in out
    code, out, err = run_cli("inspect", path, "--json")
    assert code == 0, err
    listed = {d["name"]: d for d in json.loads(out)}
    assert set(listed) == set(tensors)
    for name, t in tensors.items():
        assert listed[name]["shape"] == list(t.shape)
        assert listed[name]["bytes"] == t.numel() * t.element_size()


def test_plan_and_plan_json(tmp_path: Path, ckpt_factory, run_cli) -> None:
    a, b = _model(ckpt_factory, "a", 1), _model(ckpt_factory, "b", 2, shards=2)
    cfg = _linear_cfg(tmp_path, a, b, out_dtype="float32")
    code, out, err = run_cli("plan", cfg)
    assert code == 0, err
    assert "linear" in out and str(a) in out and str(b) in out
    code, out, err = run_cli("plan", cfg, "--json")
    assert code == 0, err
    doc = json.loads(out)
    tensors = _tensors(1)
    in_bytes = sum(t.numel() * 2 for t in tensors.values())
    assert doc["method"] == "linear"
    assert doc["inputs"] == [str(a), str(b)]
    assert doc["tensors"] == len(tensors)
    assert doc["bytes_read"] == 2 * in_bytes  # elementwise: every input read once
    assert doc["bytes_written"] == sum(t.numel() * 4 for t in tensors.values())
    assert doc["statistics_passes"] == 0
    assert not (tmp_path / "out").exists()


def test_run_then_verify_then_detect_a_flipped_byte(tmp_path: Path, ckpt_factory, run_cli) -> None:
    a, b = _model(ckpt_factory, "a", 1), _model(ckpt_factory, "b", 2)
    out = tmp_path / "out"
    code, stdout, err = run_cli("run", _linear_cfg(tmp_path, a, b), out, "--shard-size", "2KB", "--no-progress")
    assert code == 0, err
    assert "wrote" in stdout
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1  # small shard size: really sharded
    merged = _load_dir(out)
    ta, tb = _tensors(1), _tensors(2)
    for name in ta:
        ref = (0.25 * ta[name].double() + 0.75 * tb[name].double()).to(torch.bfloat16)
        diff = (merged[name].double() - ref.double()).abs()
        assert diff.max() <= (ref.double().abs() * 2**-7).max() + 1e-6, name
    code, stdout, err = run_cli("verify", out)
    assert code == 0, err
    assert f"{len(ta)} tensors match" in stdout
    # flip one byte in the middle of one tensor's data
    victim = "model.layers.0.mlp.experts.1.up_proj.weight"
    wmap = json.loads((out / INDEX).read_text())["weight_map"]
    shard = out / wmap[victim]
    start, hdr = _header(shard)
    b0, b1 = hdr[victim]["data_offsets"]
    blob = bytearray(shard.read_bytes())
    blob[start + (b0 + b1) // 2] ^= 0x10
    shard.write_bytes(bytes(blob))
    code, _, err = run_cli("verify", out)
    assert code != 0
    assert err.startswith("moemerge: error:") and "Traceback" not in err
    assert victim in err and shard.name in err


def test_verify_refuses_an_unfinished_output(tmp_path: Path, ckpt_factory, run_cli) -> None:
    a, b = _model(ckpt_factory, "a", 1), _model(ckpt_factory, "b", 2)
    out = tmp_path / "out"
    assert run_cli("run", _linear_cfg(tmp_path, a, b), out, "--no-progress")[0] == 0
    (out / MANIFEST).unlink()
    code, _, err = run_cli("verify", out)
    assert code != 0 and err.startswith("moemerge: error:") and MANIFEST in err


@pytest.mark.parametrize("manifest", ["{garbage", "[]", '{"x": 1}', '{"tensors": {"w": 3}}'])
def test_verify_refuses_a_damaged_manifest(tmp_path: Path, ckpt_factory, run_cli, manifest: str) -> None:
    a, b = _model(ckpt_factory, "a", 1), _model(ckpt_factory, "b", 2)
    out = tmp_path / "out"
    assert run_cli("run", _linear_cfg(tmp_path, a, b), out, "--no-progress")[0] == 0
    (out / MANIFEST).write_text(manifest)
    code, _, err = run_cli("verify", out)
    assert code != 0 and "Traceback" not in err, err
    assert err.startswith("moemerge: error:") and MANIFEST in err and len(err.strip().splitlines()) == 1


def test_overwrite_leaves_no_side_files_of_the_old_output(tmp_path: Path, ckpt_factory, run_cli) -> None:
    a, b = _model(ckpt_factory, "a", 1), _model(ckpt_factory, "b", 2)
    out = tmp_path / "out"
    assert run_cli("run", _linear_cfg(tmp_path, a, b), out, "--no-progress", "--shard-size", "2KB")[0] == 0
    assert (out / "tokenizer.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    # new inputs without any side files: nothing of the old model may pass for theirs
    c = ckpt_factory("c", _tensors(3))
    d = ckpt_factory("d", _tensors(4))
    for p in (c, d):
        (p / "config.json").unlink()
    code, _, err = run_cli("run", _linear_cfg(tmp_path, c, d), out, "--overwrite", "--no-progress")
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    # README.md and mergekit_config.yml: the new run's model card (`run` writes one by default)
    assert names == sorted([INDEX, MANIFEST, "moemerge-config.yml", "model-00001-of-00001.safetensors",
                            "README.md", "mergekit_config.yml"]), names
    assert run_cli("verify", out)[0] == 0


def _ref(snaps: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * s[k].double() for w, s in zip(weights, snaps)) for k in snaps[0]}


def _assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Within one bf16 rounding of the float64 reference (rounded once, at the output)."""
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs()
    ulp = ref.abs() * 2**-7 + 1e-30
    assert (err <= ulp).all(), (name, err.max().item())
    # almost every element is exactly the correctly rounded reference
    assert (out == ref.to(torch.bfloat16)).double().mean() > 0.97, name


def test_pma_ema_equals_the_float64_reference(tmp_path: Path, ckpt_factory, run_cli) -> None:
    snaps = [_model(ckpt_factory, f"s{i}", 10 + i, shards=1 + i % 2) for i in range(3)]
    out = tmp_path / "ema"
    code, stdout, err = run_cli("pma", *snaps, "-o", out, "--method", "ema", "--alpha", "0.2", "--no-progress")
    assert code == 0, err
    a, n = 0.2, 3
    weights = [(1 - a) ** (n - 1)] + [a * (1 - a) ** (n - i) for i in range(2, n + 1)]
    assert weights == pytest.approx([0.64, 0.16, 0.2])
    for w in ("0.640000", "0.160000", "0.200000"):
        assert w in stdout
    ref = _ref([_tensors(10 + i) for i in range(3)], weights)
    merged = _load_dir(out)
    assert set(merged) == set(ref)
    for name, r in ref.items():
        _assert_bf16_close(merged[name], r, name)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["pma"]["method"] == "ema" and manifest["pma"]["alpha"] == 0.2
    assert manifest["pma"]["weights"] == pytest.approx(weights)
    assert run_cli("verify", out)[0] == 0


@pytest.mark.parametrize("method, weights", [
    ("sma", ["0.333333"] * 3), ("wma", ["0.166667", "0.333333", "0.500000"]),
    ("ema", ["0.640000", "0.160000", "0.200000"]),
])
def test_pma_dry_run_prints_weights_and_writes_nothing(tmp_path: Path, ckpt_factory, run_cli,
                                                       method: str, weights: list[str]) -> None:
    snaps = [_model(ckpt_factory, f"s{i}", 20 + i) for i in range(3)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "never"
    code, stdout, err = run_cli("pma", *snaps, "-o", out, "--method", method, "--dry-run")
    assert code == 0, err
    rows = [ln for ln in stdout.splitlines() if any(str(s) in ln for s in snaps)]
    for snap, w in zip(snaps, weights):
        assert any(str(snap) in ln and w in ln for ln in rows), stdout
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_pma_explicit_weights_are_normalized(tmp_path: Path, ckpt_factory, run_cli) -> None:
    snaps = [_model(ckpt_factory, f"s{i}", 30 + i) for i in range(3)]
    out = tmp_path / "w"
    code, stdout, err = run_cli("pma", *snaps, "-o", out, "--weights", "1,2,3", "--no-progress")
    assert code == 0, err
    for w in ("0.166667", "0.333333", "0.500000"):
        assert w in stdout
    ref = _ref([_tensors(30 + i) for i in range(3)], [1 / 6, 2 / 6, 3 / 6])
    merged = _load_dir(out)
    for name, r in ref.items():
        _assert_bf16_close(merged[name], r, name)


def test_pma_rejects_bad_options(tmp_path: Path, ckpt_factory, run_cli) -> None:
    snaps = [_model(ckpt_factory, f"s{i}", 40 + i) for i in range(2)]
    cases = (
        (("--weights", "1,2,3"), "3 weight(s) for 2"), (("--weights", "1,x"), "--weights"),
        (("--weights", "1,-1"), "sum to 0"), (("--method", "ema", "--alpha", "1.5"), "--alpha"),
        (("--method", "ema", "--alpha", "0"), "--alpha"), (("--out-dtype", "int4"), "int4"),
    )
    for args, needle in cases:
        code, _, err = run_cli("pma", *snaps, "-o", tmp_path / "o", *args)
        assert code != 0 and err.startswith("moemerge: error:") and needle in err, (args, err)
        assert "Traceback" not in err
        assert not (tmp_path / "o").exists()


# -- what a finished output directory carries ------------------------------------------------


# `tokenizer_source: MODEL` builds the output tokenizer from MODEL's (MergeKit's meaning): see
# tests/test_tokenizer_merge.py, with real tokenizer files
@pytest.mark.parametrize("kind", ["base", "first", "pma"])
def test_output_directory_carries_side_files_config_and_manifest(
    tmp_path: Path, ckpt_factory, run_cli, kind: str
) -> None:
    a, b, c = (_model(ckpt_factory, n, 50 + i, shards=1 + i % 2) for i, n in enumerate("abc"))
    out = tmp_path / "out"
    if kind == "base":  # task_arithmetic with a base listed last in the YAML: files from the base
        doc = {"merge_method": "task_arithmetic", "base_model": str(c),
               "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                          {"model": str(b), "parameters": {"weight": 0.3}}],
               "parameters": {"lambda": 0.8}, "out_dtype": "float16"}
        source, dtype_name, st_dtype = "c", "float16", "F16"
        code, _, err = run_cli("run", write_yaml(tmp_path / "merge.yml", doc), out, "--no-progress")
    elif kind == "first":
        doc = {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": str(b), "parameters": {"weight": 1.0}},
                          {"model": str(a), "parameters": {"weight": 2.0}}]}
        source, dtype_name, st_dtype = "b", "float32", "F32"
        code, _, err = run_cli("run", write_yaml(tmp_path / "merge.yml", doc), out, "--no-progress")
    else:
        doc = None
        source, dtype_name, st_dtype = "a", "bfloat16", "BF16"
        code, _, err = run_cli("pma", a, b, c, "-o", out, "--no-progress")
    assert code == 0, err

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == dtype_name
    assert cfg["tag"] == source and cfg["model_type"] == "test"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["tag"] == source
    for f in TOKENIZER_FILES:
        assert json.loads((out / f).read_text()) == {"file": f, "tag": source}

    copied = yaml.safe_load((out / "moemerge-config.yml").read_text())
    if doc is not None:
        assert copied == doc
    else:
        assert copied["merge_method"] == "sma"
        assert [m["model"] for m in copied["models"]] == [str(a), str(b), str(c)]

    index = json.loads((out / INDEX).read_text())
    manifest = json.loads((out / MANIFEST).read_text())
    names = set(_tensors(0))
    assert set(index["weight_map"]) == names == set(manifest["tensors"])
    total = 0
    for shard in sorted(out.glob("*.safetensors")):
        start, hdr = _header(shard)
        blob = shard.read_bytes()
        assert manifest["files"][shard.name] == len(blob)
        for name, e in hdr.items():
            if name == "__metadata__":
                continue
            b0, b1 = e["data_offsets"]
            entry = manifest["tensors"][name]
            assert entry["file"] == shard.name == index["weight_map"][name]
            assert entry["dtype"] == e["dtype"] == st_dtype
            assert entry["shape"] == e["shape"]
            assert entry["sha256"] == hashlib.sha256(blob[start + b0:start + b1]).hexdigest(), name
            total += b1 - b0
    assert index["metadata"]["total_size"] == total
    assert manifest["inputs"]
    assert not (out / ".moemerge-incomplete").exists()
    assert not list(out.glob("*.tmp-*"))
