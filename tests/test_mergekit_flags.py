"""mergekit-yaml's command line on `moemerge run`: its flags with MergeKit's meaning, the model
card and config copy it writes by default, and YAML numbers spelled as strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_yaml

from moemerge.sizes import parse_kmb


def _model(ckpt_factory, name: str, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g),
               "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
               "model.norm.weight": torch.randn(16, generator=g) + 1}
    path = ckpt_factory(name, tensors, config={"model_type": "test", "num_hidden_layers": 1, "tag": name})
    (path / "tokenizer.json").write_text(json.dumps({"tag": name}))
    (path / "README.md").write_text("# the base model's own card\n")
    return path


@pytest.fixture
def inputs(ckpt_factory) -> tuple[Path, Path, Path]:
    return _model(ckpt_factory, "base", 0), _model(ckpt_factory, "a", 1), _model(ckpt_factory, "b", 2)


def _dare(tmp_path: Path, inputs, name: str = "dare.yml", **params) -> Path:
    base, a, b = inputs
    doc = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}}],
           "parameters": params, "dtype": "float32"}
    return write_yaml(tmp_path / name, doc)


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_parse_kmb_uses_mergekits_units() -> None:
    assert parse_kmb("1B") == 10**9 and parse_kmb("500M") == 5 * 10**8 and parse_kmb("5b") == 5 * 10**9
    assert parse_kmb("2K") == 2000 and parse_kmb("123") == 123
    for bad in ("1.5B", "GB", "", "5G"):
        with pytest.raises(ValueError):
            parse_kmb(bad)


@pytest.mark.parametrize("flags", [
    ["--out-shard-size", "1B"], ["--copy-tokenizer"], ["--no-copy-tokenizer"], ["--random-seed", "3"],
    ["--trust-remote-code"], ["--allow-crimes"], ["-v"], ["--verbose"], ["--quiet"], ["-j", "1"],
    ["--num-threads", "1"], ["--lazy-unpickle"], ["--low-cpu-memory"], ["--read-to-gpu"], ["--clone-tensors"],
    ["--async-write"], ["--lora-merge-cache", "/tmp/lora"], ["--transformers-cache", "/tmp/tc"],
    ["--safe-serialization"], ["--no-safe-serialization"], ["--write-model-card"], ["--no-write-model-card"],
])
def test_run_accepts_every_mergekit_yaml_flag(tmp_path: Path, inputs, run_cli, flags: list[str]) -> None:
    code, _, err = run_cli("run", _dare(tmp_path, inputs), tmp_path / "out", *flags)
    assert code == 0, err
    assert run_cli("verify", tmp_path / "out")[0] == 0


def test_loader_flags_are_noted_on_one_line(tmp_path: Path, inputs, run_cli) -> None:
    code, _, err = run_cli("run", _dare(tmp_path, inputs), tmp_path / "out", "--lazy-unpickle", "--low-cpu-memory",
                           "--transformers-cache", "/tmp/tc", "--quiet", "--trust-remote-code")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "not needed by moemerge" in ln]
    assert len(lines) == 1 and all(f in lines[0] for f in ("--lazy-unpickle", "--low-cpu-memory", "--transformers-cache"))
    assert "never runs model code" in err


def test_cuda_flag_means_device_cuda(tmp_path: Path, inputs, run_cli) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to see the --device cuda refusal")
    code, _, err = run_cli("run", _dare(tmp_path, inputs), tmp_path / "out", "--cuda")
    assert code == 1 and "--device cuda" in err


def test_out_shard_size_1b_is_a_billion_bytes(tmp_path: Path, inputs, run_cli, monkeypatch) -> None:
    import moemerge.api as api
    from moemerge import settings

    cfg = _dare(tmp_path, inputs)
    seen: list[object] = []
    real_plan = api.plan
    monkeypatch.setattr(api, "plan", lambda *a, **kw: (seen.append(kw["shard_size"]), real_plan(*a, **kw))[1])
    code, out, err = run_cli("plan", cfg, "--json", "--out-shard-size", "1B")
    assert code == 0, err
    assert seen == [10**9] and len(json.loads(out)["shards"]) == 1
    # --shard-size below 1MB is refused (1B here would be one byte: one file per tensor), and the
    # error says how to write MergeKit's billion
    for flag in ("1B", "1KB", "999999"):
        code, _, err = run_cli("plan", cfg, "--json", "--shard-size", flag)
        assert code == 2 and "--shard-size" in err and "below the minimum 1.00 MB" in err, err
        assert ("--out-shard-size 1B" in err) == flag.endswith("B"), err
    assert run_cli("plan", cfg, "--json", "--shard-size", "1MB")[0] == 0
    # --out-shard-size keeps MergeKit's meaning at any size: 1K is 1000 bytes, as --shard-size 1KB
    monkeypatch.setattr(settings, "MIN_SHARD_SIZE", 1)
    one_byte = json.loads(run_cli("plan", cfg, "--json", "--shard-size", "1B")[1])["shards"]
    assert len(one_byte) == 3
    k = json.loads(run_cli("plan", cfg, "--json", "--out-shard-size", "1K")[1])["shards"]
    assert k == json.loads(run_cli("plan", cfg, "--json", "--shard-size", "1KB")[1])["shards"] and len(k) > 1
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--out-shard-size", "1K", "--quiet")
    assert code == 0, err
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(k)


def test_random_seed_equals_seed(tmp_path: Path, inputs, run_cli) -> None:
    cfg = _dare(tmp_path, inputs)
    for name, flag in (("s", "--seed"), ("r", "--random-seed"), ("other", "--seed")):
        seed = "6" if name == "other" else "5"
        assert run_cli("run", cfg, tmp_path / name, flag, seed, "--quiet")[0] == 0
    assert _bytes(tmp_path / "s") == _bytes(tmp_path / "r")
    assert _bytes(tmp_path / "s") != _bytes(tmp_path / "other")  # the seed does matter for dare_ties


def test_no_copy_tokenizer_copies_no_tokenizer(tmp_path: Path, inputs, run_cli) -> None:
    assert run_cli("run", _dare(tmp_path, inputs), tmp_path / "out", "--no-copy-tokenizer")[0] == 0
    assert not (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "config.json").exists()
    assert run_cli("run", _dare(tmp_path, inputs), tmp_path / "out2")[0] == 0
    assert (tmp_path / "out2" / "tokenizer.json").exists()


def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_and_mergekit_config_by_default(tmp_path: Path, inputs, run_cli) -> None:
    cfg = _dare(tmp_path, inputs)
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "the base model's own card" not in card
    meta, body = _front_matter(card)
    assert meta["base_model"] == [str(p) for p in inputs]
    assert meta["tags"] == ["merge", "moemerge"] and meta["library_name"] == "transformers"
    assert "https://arxiv.org/abs/2311.03099" in body  # DARE's reference_url
    for p in inputs[1:]:
        assert str(p) in body
    block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    given = yaml.safe_load(cfg.read_text())
    assert yaml.safe_load(block) == given
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == given
    assert run_cli("verify", out)[0] == 0


def test_no_write_model_card_writes_neither_and_drops_an_old_one(tmp_path: Path, inputs, run_cli) -> None:
    cfg, out = _dare(tmp_path, inputs), tmp_path / "out"
    assert run_cli("run", cfg, out)[0] == 0
    assert (out / "README.md").exists() and (out / "mergekit_config.yml").exists()
    code, _, err = run_cli("run", cfg, out, "--overwrite", "--no-write-model-card")
    assert code == 0, err
    assert not (out / "README.md").exists() and not (out / "mergekit_config.yml").exists()
    assert (out / "moemerge-config.yml").exists()
    assert run_cli("verify", out)[0] == 0


def test_string_numbers_are_numbers(tmp_path: Path, inputs, run_cli) -> None:
    base, a, b = inputs

    def cfg(name: str, weight, epsilon) -> Path:
        doc = {"merge_method": "della", "base_model": str(base), "dtype": "float32",
               "models": [{"model": str(a), "parameters": {"weight": weight, "density": 0.5, "epsilon": epsilon}},
                          {"model": str(b), "parameters": {"weight": 0.7, "density": 0.5, "epsilon": 0.01}}]}
        path = tmp_path / name
        text = yaml.safe_dump(doc, sort_keys=False)
        if isinstance(epsilon, str):  # as a user writes it: `epsilon: 1e-2`, unquoted (YAML 1.1: a string)
            text = text.replace("epsilon: 1e-2", "epsilon: 1e-2").replace("epsilon: '1e-2'", "epsilon: 1e-2")
        path.write_text(text)
        return path

    strings, floats = cfg("s.yml", "0.3", "1e-2"), cfg("f.yml", 0.3, 0.01)
    assert "epsilon: 1e-2\n" in strings.read_text() and "weight: '0.3'" in strings.read_text()
    assert isinstance(yaml.safe_load(strings.read_text())["models"][0]["parameters"]["epsilon"], str)
    from moemerge.api import plan

    assert plan(str(strings)).summary()["tensors"] == plan(str(floats)).summary()["tensors"]
    for c, o in ((strings, "s"), (floats, "f")):
        code, _, err = run_cli("run", c, tmp_path / o, "--quiet")
        assert code == 0, err
    assert _bytes(tmp_path / "s") == _bytes(tmp_path / "f")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_string_numbers_are_refused(tmp_path: Path, inputs, run_cli, bad: str) -> None:
    base, a, b = inputs
    doc = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": bad}},
                                                {"model": str(b), "parameters": {"weight": 1.0}}]}
    code, _, err = run_cli("plan", write_yaml(tmp_path / "bad.yml", doc))
    assert code == 1, err
    assert "weight" in err


def test_mixing_architectures_is_refused_before_work_unless_allow_crimes(tmp_path: Path, inputs, run_cli) -> None:
    """MergeKit refuses inputs whose config.json names different architectures; so do we, before
    any output exists, listing each input's architecture; `--allow-crimes` merges them."""
    base, a, b = inputs
    for path, arch in ((base, "LlamaForCausalLM"), (a, "LlamaForCausalLM"), (b, "MistralForCausalLM")):
        cfg = json.loads((path / "config.json").read_text())
        cfg["architectures"] = [arch]
        (path / "config.json").write_text(json.dumps(cfg))
    cfg = _dare(tmp_path, inputs)
    out = tmp_path / "out"
    for cmd in (("run", cfg, out), ("plan", cfg)):
        code, _, err = run_cli(*cmd, "--quiet" if cmd[0] == "run" else "--json")
        assert code == 1, err
        assert "mix architectures" in err and "--allow-crimes" in err, err
        assert f"{b} is MistralForCausalLM (test)" in err and f"{a} is LlamaForCausalLM (test)" in err, err
    assert not out.exists()
    assert run_cli("plan", cfg, "--json", "--allow-crimes")[0] == 0
    code, _, err = run_cli("run", cfg, out, "--quiet", "--allow-crimes")
    assert code == 0, err
    assert run_cli("verify", out)[0] == 0
    # the same architecture spelled alike everywhere: no flag needed
    (b / "config.json").write_text((a / "config.json").read_text())
    assert run_cli("run", cfg, tmp_path / "out2", "--quiet")[0] == 0
