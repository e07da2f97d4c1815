"""`moemerge multi`: several named merges of one YAML file (MergeKit's mergekit-multi), run in
dependency order, with a finished merge kept only while its config and input files are unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moemerge.multi import load_documents

NAMES = ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight")


def _tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.randn(24, 16, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(20, 16, generator=g),
            "model.norm.weight": torch.randn(16, generator=g) + 1}


@pytest.fixture
def models(ckpt_factory) -> dict[str, Path]:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return {n: ckpt_factory(n, _tensors(g), config={"model_type": "test", "num_hidden_layers": 1}) for n in "abc"}


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _two_stage(tmp_path: Path, m: dict[str, Path], wa: float = 0.3) -> Path:
    """`ab` = linear(a, b); the final merge = linear(ab, c), reading `ab` by its name."""
    return _write(tmp_path / "multi.yml", [
        {"name": "ab", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": str(m["a"]), "parameters": {"weight": wa}},
                    {"model": str(m["b"]), "parameters": {"weight": 1 - wa}}]},
        {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": "ab", "parameters": {"weight": 0.6}}, {"model": str(m["c"]), "parameters": {"weight": 0.4}}]},
    ])


def _reference(m: dict[str, Path], wa: float = 0.3) -> dict[str, torch.Tensor]:
    a, b, c = (load_file(str(m[k] / "model.safetensors")) for k in "abc")
    ab = {n: (wa * a[n].double() + (1 - wa) * b[n].double()).float() for n in NAMES}  # written as float32
    return {n: 0.6 * ab[n].double() + 0.4 * c[n].double() for n in NAMES}


def _check(out: Path, ref: dict[str, torch.Tensor]) -> None:
    got = {n: t for f in sorted(out.glob("*.safetensors")) for n, t in load_file(str(f)).items()}
    assert sorted(got) == sorted(ref)
    for n in NAMES:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-6, atol=1e-6)


def _stamps(*dirs: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in sorted(d.iterdir())}


def test_two_merges_run_in_order_and_are_kept_while_current(tmp_path: Path, models, run_cli) -> None:
    cfg, inter, out = _two_stage(tmp_path, models), tmp_path / "inter", tmp_path / "final"
    code, stdout, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")
    assert code == 0, err
    assert stdout.index("running ab") < stdout.index("running the unnamed (final) merge")
    _check(out, _reference(models))
    assert run_cli("verify", inter / "ab")[0] == 0 and run_cli("verify", out)[0] == 0
    before = _stamps(inter / "ab", out)
    code, stdout, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")
    assert code == 0, err
    assert stdout.count("kept ") == 2 and "running" not in stdout
    assert _stamps(inter / "ab", out) == before  # nothing rewritten


def test_a_relative_intermediate_dir_is_not_read_as_a_hub_id(tmp_path: Path, models, run_cli, monkeypatch) -> None:
    """`-I inter` makes `inter/ab`, which looks like a Hub id (`org/name`) until it exists."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("multi", _two_stage(tmp_path, models), "-I", "inter", "--out-path", "final", "--quiet")
    assert code == 0, err
    _check(tmp_path / "final", _reference(models))


def test_a_changed_merge_reruns_what_reads_it_and_only_with_overwrite(tmp_path: Path, models, run_cli) -> None:
    inter, out = tmp_path / "inter", tmp_path / "final"
    assert run_cli("multi", _two_stage(tmp_path, models), "-I", inter, "--out-path", out, "--quiet")[0] == 0
    before = _stamps(inter / "ab", out)
    cfg = _two_stage(tmp_path, models, wa=0.8)  # `ab` changes: the final merge is stale too
    code, _, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")
    assert code == 1 and "nothing was run" in err, err
    assert "ab (" in err and "its config changed" in err and "it reads ab, which runs again" in err, err
    assert _stamps(inter / "ab", out) == before  # refused before any work
    code, stdout, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet", "--overwrite")
    assert code == 0, err
    _check(out, _reference(models, wa=0.8))


def test_an_input_changed_in_place_makes_its_merges_stale(tmp_path: Path, models, run_cli) -> None:
    cfg, inter, out = _two_stage(tmp_path, models), tmp_path / "inter", tmp_path / "final"
    assert run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")[0] == 0
    # c rewritten with new values, same header: only the final merge reads it
    c = models["c"] / "model.safetensors"
    raw = bytearray(c.read_bytes())
    raw[-4:] = os.urandom(4)
    c.write_bytes(bytes(raw))
    code, _, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")
    assert code == 1 and "input files changed" in err and "ab (" not in err, err
    code, stdout, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet", "--overwrite")
    assert code == 0, err
    assert "kept ab" in stdout and "running the unnamed" in stdout
    _check(out, _reference(models))


def test_an_unfinished_merge_needs_resume(tmp_path: Path, models, run_cli) -> None:
    cfg, inter, out = _two_stage(tmp_path, models), tmp_path / "inter", tmp_path / "final"
    assert run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")[0] == 0
    (out / "moemerge-manifest.json").unlink()  # as a run killed before its commit leaves it
    (out / ".moemerge-incomplete").write_text("")
    code, _, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet")
    assert code == 1 and "is unfinished" in err and "--resume" in err, err
    code, stdout, err = run_cli("multi", cfg, "-I", inter, "--out-path", out, "--quiet", "--overwrite")
    assert code == 0, err
    assert "kept ab" in stdout
    _check(out, _reference(models))


@pytest.mark.parametrize(("docs", "said"), [
    ([{"name": "x", "models": ["y"]}, {"name": "y", "models": ["x"]}], "cycle: x -> y -> x"),
    ([{"name": "x", "models": ["A"]}, {"name": "x", "models": ["B"]}], "a second merge named `x`"),
    ([{"models": ["A"]}, {"models": ["B"]}], "a second unnamed merge"),
    ([{"name": "../up", "models": ["A"]}], "must be a plain directory name"),
    ([{"name": "x", "models": ["x"]}], "merge `x` reads its own output"),
    ([{"name": "x", "models": ["A"]}, {"models": ["x"]}], "give --out-path"),
    (["just text"], "expected a YAML mapping"),
])
def test_bad_files_are_refused_before_work(tmp_path: Path, docs: list, said: str) -> None:
    from moemerge.errors import ConfigError

    docs = [{"merge_method": "linear", "parameters": {"weight": 1.0}, **d} if isinstance(d, dict) else d
            for d in docs]
    path = _write(tmp_path / "bad.yml", docs)
    with pytest.raises(ConfigError, match=None) as e:
        load_documents(str(path), intermediate_dir=str(tmp_path / "i"), out_path=None)
    assert said in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "i").exists()


def test_references_resolve_in_every_model_field(tmp_path: Path) -> None:
    from moemerge.multi import _resolve_refs

    path = _write(tmp_path / "refs.yml", [
        {"name": "base", "merge_method": "linear", "parameters": {"weight": 1.0}, "models": ["/m/a", "/m/b"]},
        {"merge_method": "ties", "base_model": "base", "tokenizer_source": "base",
         "models": [{"model": "/m/x", "parameters": {"weight": 1, "density": 0.5}},
                    {"model": "/m/base", "parameters": {"weight": 1, "density": 0.5}}]},
    ])
    docs = load_documents(str(path), intermediate_dir=str(tmp_path / "i"), out_path=str(tmp_path / "o"))
    final = docs[-1]
    inter = str(tmp_path / "i" / "base")
    assert [d.name for d in docs] == ["base", None] and final.needs == ("base",)
    assert final.config.base_model == inter and final.config.tokenizer_source == inter
    assert final.config.models[1].model == "/m/base"  # a path that merely ends in the name is not it
    # `name+adapter` (a LoRA on a merge's output) and plain-string `models:` entries resolve too;
    # a parameter value that happens to equal a name does not
    used: set[str] = set()
    got = _resolve_refs({"models": ["base", {"model": "base+/l/x", "parameters": {"filter": "base"}}]},
                        {"base": "/i/base"}, used)
    assert got == {"models": ["/i/base", {"model": "/i/base+/l/x", "parameters": {"filter": "base"}}]}
    assert used == {"base"}


def test_run_on_a_multi_document_file_points_to_multi(tmp_path: Path, models, run_cli) -> None:
    code, _, err = run_cli("run", _two_stage(tmp_path, models), tmp_path / "o")
    assert code == 1 and "2 YAML documents" in err and "moemerge multi" in err, err
    assert not (tmp_path / "o").exists()
