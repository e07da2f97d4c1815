"""MergeKit's `slices:` grammar: frankenmerges, merges over slice lists, gradients across
slices, MoE layers, `modules: {default: ...}`, and the refusals of bad slice configs.

Inputs are tiny random transformers models (Llama, Mixtral) saved in float32. Every output is
compared with a plain float64 whole-tensor reference computed here from the input files, and
loaded with `transformers` for a forward pass against a model built from that reference.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import moemerge
from conftest import golden_paths, write_yaml
from moemerge.config import parse_config
from moemerge.errors import ConfigError, MoemergeError, PlanError
from moemerge.planner.slices import is_pre_weight, slice_config_updates
from tests.reference_methods import slerp as ref_slerp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig  # noqa: E402

TOKENS = torch.tensor([[1, 5, 17, 42, 9, 3, 60, 7], [2, 9, 8, 7, 6, 5, 4, 3]])
_COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)


def _save(path: Path, config: Any, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at exactly 1.0 in every model; make them differ
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p), alpha=0.1)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 4-layer tiny Llamas, different seeds."""
    root = tmp_path_factory.mktemp("llamas")
    return [_save(root / f"m{i}", LlamaConfig(**_COMMON, num_hidden_layers=4), 100 + i) for i in range(3)]


@pytest.fixture(scope="module")
def mixtrals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 3-layer tiny Mixtrals (4 experts, top-2)."""
    root = tmp_path_factory.mktemp("mixtrals")
    cfg = MixtralConfig(**_COMMON, num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2)
    return [_save(root / f"x{i}", cfg, 200 + i) for i in range(2)]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _layer(name: str, i: int) -> str:
    """`model.layers.N.rest` with N replaced by i."""
    head, _, rest = name.partition("model.layers.")
    return f"{head}model.layers.{i}.{rest.split('.', 1)[1]}"


def _stack(parts: list[tuple[dict[str, torch.Tensor], int]], pre: dict[str, torch.Tensor],
           post: dict[str, torch.Tensor], fn: Callable[..., torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Reference state dict: output layer k is `parts[k]`'s layer, renumbered; embeddings from `pre`,
    everything else outside the layers from `post`."""
    out = {k: v for k, v in pre.items() if "layers." not in k and is_pre_weight(k)}
    out.update({k: v for k, v in post.items() if "layers." not in k and not is_pre_weight(k)})
    for k, (sd, src) in enumerate(parts):
        for name, v in sd.items():
            if name.startswith(f"model.layers.{src}."):
                out[_layer(name, k)] = v
    return out


def _run(tmp_path: Path, doc: dict[str, Any], name: str = "out", **kw: Any) -> Path:
    cfg = write_yaml(tmp_path / f"{name}.yml", doc)
    out = tmp_path / name
    moemerge.run(str(cfg), str(out), **kw)
    return out


def _forward(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def _assert_loads_like(out: Path, ref: dict[str, torch.Tensor], n_layers: int) -> None:
    """The output loads in transformers and gives the logits of the reference state dict saved
    with the output's config (transformers 5 fuses Mixtral experts on load: both go through it)."""
    config = transformers.AutoConfig.from_pretrained(str(out))
    assert config.num_hidden_layers == n_layers
    got = _forward(out)
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        save_file({k: v.float().clone() for k, v in ref.items()}, str(Path(d) / "model.safetensors"),
                  metadata={"format": "pt"})
        want = _forward(Path(d))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _assert_equal_state(out: Path, ref: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    got = _tensors(out)
    assert set(got) == set(ref)
    for name, want in ref.items():
        g = got[name].double()
        err = (g - want.double()).abs().max().item()
        assert err <= atol * max(1.0, want.double().abs().max().item()), f"{name}: max error {err}"


# -- frankenmerges --------------------------------------------------------------------------------

def test_frankenmerge_with_a_repeated_layer_range(tmp_path: Path, llamas: list[Path]) -> None:
    a, b, _ = llamas
    doc = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(a), "layer_range": [1, 2]}]},  # layer 1 of a, a second time
    ]}
    out = _run(tmp_path, doc)
    sa, sb = _tensors(a), _tensors(b)
    ref = _stack([(sa, 0), (sa, 1), (sb, 1), (sb, 2), (sa, 1)], pre=sa, post=sa)
    _assert_equal_state(out, ref)  # passthrough of float32: the very bytes
    got = _tensors(out)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], got["model.layers.4.mlp.up_proj.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    _assert_loads_like(out, ref, 5)


def test_passthrough_scale_filter_per_slice(tmp_path: Path, llamas: list[Path]) -> None:
    """The usual "zero the o_proj / down_proj of a repeated block" frankenmerge: a filter list
    at the slice level, a source's own value above it, the top level below."""
    a, b, _ = llamas
    doc = {"merge_method": "passthrough", "dtype": "float32",
           "parameters": {"scale": 0.5},
           "slices": [
               {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
               {"sources": [{"model": str(b), "layer_range": [1, 3],
                             "parameters": {"scale": [{"filter": "down_proj", "value": 0.25}]}}],
                "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "mlp", "value": 2.0}]}},
           ]}
    out = _run(tmp_path, doc)
    sa, sb = _tensors(a), _tensors(b)
    ref = _stack([(sa, 0), (sa, 1), (sb, 1), (sb, 2)], pre=sa, post=sb)
    for name in list(ref):
        if name.startswith(("model.layers.2.", "model.layers.3.")):
            scale = 0.25 if "down_proj" in name else 0.0 if "o_proj" in name else 2.0 if "mlp" in name else 0.5
        elif name.startswith("model.layers."):
            scale = 0.5
        elif is_pre_weight(name):
            scale = 0.5  # first slice: no slice parameters, the top level's
        else:
            scale = 2.0 if "mlp" in name else 0.5  # last slice's rules (lm_head, norm: no filter matches)
        ref[name] = ref[name].double() * scale
    _assert_equal_state(out, ref, atol=1e-6)


# -- merges over slices ---------------------------------------------------------------------------

def test_slerp_over_two_slice_lists_with_a_gradient(tmp_path: Path, llamas: list[Path]) -> None:
    a, b, _ = llamas
    doc = {"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
           "parameters": {"t": 0.5},
           "slices": [
               {"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [0, 3]}],
                "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": [0.8, 0.2]}]}},
               {"sources": [{"model": str(a), "layer_range": [3, 4]}, {"model": str(b), "layer_range": [1, 2]}],
                "parameters": {"t": [0.3, 0.7]}},
           ]}
    out = _run(tmp_path, doc)
    sa, sb = _tensors(a), _tensors(b)

    def t_of(name: str, k: int) -> float:
        if k < 3:  # slice 0: t = k / 2 across its three layers
            pts = (0.1, 0.9) if "self_attn" in name else (0.8, 0.2)
            return pts[0] + (pts[1] - pts[0]) * k / 2
        return 0.7  # one-layer slice: MergeKit's t = 1, the gradient's last entry

    ref: dict[str, torch.Tensor] = {}
    for name in sa:
        if not name.startswith("model.layers."):
            # outside the layers: t = 0 of the first (embeddings) / last (norm, lm_head) slice
            t = 0.1 if "self_attn" in name else 0.8 if is_pre_weight(name) else 0.3
            ref[name] = ref_slerp(sa[name].double(), [sb[name].double()], [{}], {"t": t})
    for k, (la, lb) in enumerate([(0, 0), (1, 1), (2, 2), (3, 1)]):
        for name in sa:
            if name.startswith(f"model.layers.{la}."):
                o = _layer(name, k)
                ref[o] = ref_slerp(sa[name].double(), [sb[_layer(name, lb)].double()], [{}], {"t": t_of(o, k)})
    _assert_equal_state(out, ref, atol=1e-5)
    _assert_loads_like(out, ref, 4)


def test_gradient_across_slices_and_parameter_precedence(tmp_path: Path, llamas: list[Path]) -> None:
    """t within a slice of L layers is i / (L - 1); source > slice > module > top level."""
    a, b, c = llamas
    doc = {"merge_method": "linear", "dtype": "float32",
           "parameters": {"weight": 9.0, "normalize": False},
           "modules": {"default": {"parameters": {"weight": 0.5}, "slices": [
               {"sources": [{"model": str(a), "layer_range": [0, 3], "parameters": {"weight": [0.0, 1.0]}},
                            {"model": str(b), "layer_range": [1, 4]}]},
               {"sources": [{"model": str(c), "layer_range": [2, 4]}, {"model": str(a), "layer_range": [0, 2]}],
                "parameters": {"weight": [1.0, 3.0]}},
           ]}}}
    out = _run(tmp_path, doc)
    sa, sb, sc = _tensors(a), _tensors(b), _tensors(c)
    ref: dict[str, torch.Tensor] = {}
    for name in sa:
        if name.startswith("model.layers."):
            continue
        if is_pre_weight(name):  # first slice at t = 0: a's gradient gives 0, b the module's 0.5
            ref[name] = 0.0 * sa[name].double() + 0.5 * sb[name].double()
        else:  # last slice at t = 0: its gradient's first entry, 1.0, for c and a
            ref[name] = 1.0 * sc[name].double() + 1.0 * sa[name].double()
    layers = [(sa, 0, sb, 1, i / 2, 0.5) for i in range(3)]  # (x, layer, y, layer, w_x, w_y)
    for k, (x, lx, y, ly, wx, wy) in enumerate(layers):
        for name in sa:
            if name.startswith(f"model.layers.{lx + k}."):
                ref[_layer(name, k)] = wx * x[name].double() + wy * sb[_layer(name, ly + k)].double()
    for i in range(2):
        w = 1.0 + 2.0 * i
        for name in sc:
            if name.startswith(f"model.layers.{2 + i}."):
                ref[_layer(name, 3 + i)] = w * sc[name].double() + w * sa[_layer(name, i)].double()
    _assert_equal_state(out, ref, atol=1e-5)
    _assert_loads_like(out, ref, 5)


def test_mixtral_layers_slice_with_their_experts_and_router(tmp_path: Path, mixtrals: list[Path]) -> None:
    x, y = mixtrals
    doc = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(x), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(y), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(x), "layer_range": [2, 3]}]},
    ]}
    out = _run(tmp_path, doc)
    sx, sy = _tensors(x), _tensors(y)
    ref = _stack([(sx, 0), (sx, 1), (sy, 1), (sy, 2), (sx, 2)], pre=sx, post=sx)
    experts = [n for n in ref if ".experts." in n or "gate" in n]
    assert any(n.startswith("model.layers.4.") for n in experts) and len(experts) >= 5 * 4
    _assert_equal_state(out, ref)
    _assert_loads_like(out, ref, 5)


# -- engine invariance and the CLI ----------------------------------------------------------------

def _slerp_doc(a: Path, b: Path) -> dict[str, Any]:
    return {"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
            "parameters": {"t": [0.2, 0.9]},
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [2, 4]}]},
                {"sources": [{"model": str(a), "layer_range": [1, 4]}, {"model": str(b), "layer_range": [0, 3]}]},
            ]}


def _bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


def test_chunk_size_and_dask_workers_give_identical_bytes(tmp_path: Path, llamas: list[Path]) -> None:
    a, b, _ = llamas
    whole = _run(tmp_path, _slerp_doc(a, b), "whole")
    one_row = _run(tmp_path, _slerp_doc(a, b), "rows", chunk_rows=1)
    assert _bytes(whole) == _bytes(one_row)
    pytest.importorskip("distributed")
    on_dask = _run(tmp_path, _slerp_doc(a, b), "dask", workers=2, chunk_rows=3, unit_size="4KB")
    assert _bytes(whole) == _bytes(on_dask)


def test_resume_and_plan_cli_on_a_slices_config(tmp_path: Path, llamas: list[Path], run_cli) -> None:
    a, b, _ = llamas
    cfg = write_yaml(tmp_path / "s.yml", _slerp_doc(a, b))
    code, out, err = run_cli("plan", cfg, "--json")
    assert code == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["tensors"] == 2 + 1 + 5 * 9  # embed, norm + lm_head, five layers of nine
    code, out, err = run_cli("plan", cfg)
    assert code == 0, err
    dest = tmp_path / "o"
    code, _, err = run_cli("run", cfg, dest, "--resume")
    assert code == 0, err
    assert json.loads((dest / "config.json").read_text())["num_hidden_layers"] == 5


def test_per_layer_config_lists_follow_the_layers(tmp_path: Path, llamas: list[Path]) -> None:
    a, b, _ = llamas
    doc = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    cfg = parse_config(doc)
    cats = {str(p): moemerge.inspect(str(p)) for p in (a, b)}
    catalogs = {k: {t.name: t for t in v} for k, v in cats.items()}
    side = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "mlp_only_layers": [1, 3],
            "architectures": ["LlamaForCausalLM"], "no_rope_layers": [1, 0, 1, 0]}
    got = dict(slice_config_updates(cfg, catalogs, side))
    assert got == {"num_hidden_layers": 4, "layer_types": ["a", "b", "b", "c"], "mlp_only_layers": [1, 2],
                   "no_rope_layers": [1, 0, 0, 1]}
    # end to end: config.json's lists are rewritten at commit
    conf = json.loads((a / "config.json").read_text())
    conf["layer_types"] = ["full_attention", "x", "y", "z"]
    (a / "config.json").write_text(json.dumps(conf))
    try:
        out = _run(tmp_path, {**doc, "slices": doc["slices"] + [{"sources": [{"model": str(a),
                                                                             "layer_range": [3, 4]}]}]})
    finally:
        conf.pop("layer_types")
        (a / "config.json").write_text(json.dumps(conf))
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == ["full_attention", "x", "x", "y", "z"]


# -- bad slice configs: refused before any output exists -----------------------------------------

def _bad(a: Path, b: Path, wide: Path) -> dict[str, tuple[dict[str, Any], tuple[str, ...]]]:
    def src(m: Path, r: list[int], **kw: Any) -> dict[str, Any]:
        return {"model": str(m), "layer_range": r, **kw}

    pt = {"merge_method": "passthrough"}
    return {
        "range_outside": ({**pt, "slices": [{"sources": [src(a, [2, 6])]}]},
                          ("slices[0].sources[0].layer_range", "[2, 6]", str(a), "4 layers")),
        "empty_range": ({**pt, "slices": [{"sources": [src(a, [2, 2])]}]}, ("slices[0].sources[0]", "[2, 2]")),
        "lengths_differ": ({"merge_method": "linear", "parameters": {"weight": 1.0},
                            "slices": [{"sources": [src(a, [0, 2]), src(b, [0, 3])]}]},
                           ("slices[0].sources", "same number of layers", str(a), str(b))),
        "unknown_slice_key": ({**pt, "slices": [{"sources": [src(a, [0, 2])], "layer_rnage": 1}]},
                              ("slices[0]", "layer_rnage")),
        "unknown_source_key": ({**pt, "slices": [{"sources": [src(a, [0, 2], weight=1)]}]},
                               ("slices[0].sources[0]", "weight")),
        "other_architecture": ({**pt, "slices": [{"sources": [src(a, [0, 2])]}, {"sources": [src(wide, [0, 1])]}]},
                               ("slices[1].sources[0]", str(wide), "architecture")),
        "base_not_a_source": ({"merge_method": "slerp", "base_model": str(b), "parameters": {"t": 0.5},
                               "slices": [{"sources": [src(a, [0, 2]), src(wide, [0, 2])]}]},
                              ("slices[0]", str(b), "not among its sources")),
        "two_inputs_for_passthrough": ({**pt, "slices": [{"sources": [src(a, [0, 2]), src(b, [0, 2])]}]},
                                       ("slices[0].sources", "at most 1")),
        "same_model_twice": ({"merge_method": "linear", "parameters": {"weight": 1.0},
                              "slices": [{"sources": [src(a, [0, 2]), src(a, [2, 4])]}]},
                             ("slices[0].sources", "twice")),
        "models_and_slices": ({**pt, "models": [{"model": str(a)}], "slices": [{"sources": [src(a, [0, 2])]}]},
                              ("exactly one of",)),
        "vision_module": ({**pt, "modules": {"text_decoder": {"slices": [{"sources": [src(a, [0, 2])]}]}}},
                          ("text_decoder", "multi-part")),
        "global_param_on_a_source": ({"merge_method": "slerp", "base_model": str(a),
                                      "slices": [{"sources": [src(a, [0, 2]), src(b, [0, 2],
                                                                                  parameters={"t": 0.3})]}]},
                                     ("slices[0].sources[1].parameters.t", "global")),
    }


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama of another width (hidden 24): its layers do not fit the others'."""
    cfg = LlamaConfig(**{**_COMMON, "hidden_size": 24, "num_attention_heads": 3}, num_hidden_layers=2)
    return _save(tmp_path_factory.mktemp("wide") / "w", cfg, 300)


@pytest.mark.parametrize("case", sorted(_bad(Path("a"), Path("b"), Path("w"))))
def test_bad_slice_config_is_refused_before_work(tmp_path: Path, llamas: list[Path], wide: Path, run_cli,
                                                 case: str) -> None:
    doc, needles = _bad(llamas[0], llamas[1], wide)[case]
    cfg = write_yaml(tmp_path / "bad.yml", doc)
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out)
    assert code != 0
    flat = " ".join(err.split())
    for n in needles:
        assert n in flat, f"{n!r} not in {flat!r}"
    assert not out.exists()


def test_quantized_output_with_slices_is_refused(tmp_path: Path, llamas: list[Path]) -> None:
    doc = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(llamas[0]), "layer_range": [0, 2]}]}]}
    with pytest.raises(MoemergeError, match="quantize none"):
        moemerge.plan(doc, quantize="fp8-block")


def test_parse_errors_name_the_slice() -> None:
    with pytest.raises(ConfigError, match=r"slices\[1\]\.sources\[0\]\.layer_range"):
        parse_config({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]},
            {"sources": [{"model": "a", "layer_range": [0]}]}]})
    with pytest.raises((ConfigError, PlanError), match="modules.default"):
        parse_config({"merge_method": "passthrough", "modules": {"default": {"parameters": {}}}})


# -- agreement with MergeKit 0.1.5 (tests/golden/slices, scripts/mergekit_golden_slices.py) ------

GOLDEN = Path(__file__).parent / "golden"
SLICE_CASES = tuple(json.loads((GOLDEN / "slices" / "MANIFEST.json").read_text())["cases"])


def _absolute(doc: Any) -> Any:
    return golden_paths(doc, GOLDEN)


@pytest.mark.parametrize("case", SLICE_CASES)
def test_slices_agree_with_mergekit(tmp_path: Path, case: str) -> None:
    import yaml

    doc = _absolute(yaml.safe_load((GOLDEN / "slices" / f"{case}.yaml").read_text()))
    out = _run(tmp_path, doc)
    want = load_file(str(GOLDEN / "slices" / f"{case}.safetensors"))
    got = _tensors(out)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        err = (got[name].double() - w.double()).abs() / w.double().abs().clamp(min=1.0)
        assert err.max().item() <= 1e-5, f"{case}: `{name}` differs from MergeKit by {err.max().item():.3g}"
    # config.json: the same fields once both are read as transformers reads them
    ours = transformers.AutoConfig.from_pretrained(str(out)).to_dict()
    theirs_dir = tmp_path / "mk"
    theirs_dir.mkdir()
    (theirs_dir / "config.json").write_text((GOLDEN / "slices" / f"{case}.config.json").read_text())
    theirs = transformers.AutoConfig.from_pretrained(str(theirs_dir)).to_dict()
    for d in (ours, theirs):
        d.pop("transformers_version", None)
        d.pop("_name_or_path", None)  # where each was read from
    assert ours == theirs
    raw = json.loads((out / "config.json").read_text())
    assert raw["num_hidden_layers"] == json.loads((GOLDEN / "slices" / f"{case}.config.json").read_text())[
        "num_hidden_layers"]


# -- the example in examples/ ---------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "slices.yml"


def test_the_slices_example_plans_and_runs(tmp_path: Path, ckpt_factory) -> None:
    """examples/slices.yml, its two Hub names mapped to tiny 32-layer checkpoints: 48 layers out,
    the second slice's o_proj / down_proj scaled by 0.5, everything else copied."""
    def tiny(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        t = {"model.embed_tokens.weight": torch.randn(8, 4, generator=g)}
        for i in range(32):
            for part in ("self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"):
                t[f"model.layers.{i}.{part}.weight"] = torch.randn(4, 4, generator=g)
        t["model.norm.weight"] = torch.randn(4, generator=g)
        return {k: v.to(torch.bfloat16) for k, v in t.items()}

    conf = {"model_type": "llama", "num_hidden_layers": 32}
    names = {"meta-llama/Llama-3.1-8B-Instruct": 1, "NousResearch/Hermes-3-Llama-3.1-8B": 2}
    text = EXAMPLE.read_text()
    sds = {}
    for name, seed in names.items():
        sds[name] = tiny(seed)
        text = text.replace(name, str(ckpt_factory(f"m{seed}", sds[name], config=conf)))
    cfg = tmp_path / "slices.yml"
    cfg.write_text(text)
    plan = moemerge.plan(str(cfg))
    assert dict(plan.config_updates)["num_hidden_layers"] == 48
    assert len(plan.tensors) == 2 + 48 * 3
    out = tmp_path / "out"
    moemerge.run(str(cfg), str(out))
    got = _tensors(out)
    first, second = sds.values()
    for k in range(48):
        src, layer = (first, k) if k < 24 else (second, k - 16)
        for part in ("self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"):
            w = src[f"model.layers.{layer}.{part}.weight"].double()
            scale = 0.5 if k >= 24 and part != "mlp.up_proj" else 1.0
            assert torch.equal(got[f"model.layers.{k}.{part}.weight"].double(), (w * scale).bfloat16().double())
    assert torch.equal(got["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], second["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 48


def test_layer_orders_that_config_patterns_cannot_describe_are_refused(llamas: list[Path]) -> None:
    a, b, _ = llamas
    doc = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}  # output 0, 1, 2, 3 <- 0, 1, 1, 2
    catalogs = {str(p): {t.name: t for t in moemerge.inspect(str(p))} for p in (a, b)}
    cfg = parse_config(doc)
    with pytest.raises(PlanError, match=r"first_k_dense_replace: 2.*output layer 2 would be source layer 1"):
        slice_config_updates(cfg, catalogs, {"num_hidden_layers": 4, "first_k_dense_replace": 2})
    with pytest.raises(PlanError, match=r"decoder_sparse_step: 2.*output layer 2 would be source layer 1"):
        slice_config_updates(cfg, catalogs, {"num_hidden_layers": 4, "decoder_sparse_step": 2})
    # a per-layer list supersedes the sliding-window pattern: it is remapped instead
    got = dict(slice_config_updates(cfg, catalogs, {"num_hidden_layers": 4, "sliding_window_pattern": 2,
                                                    "layer_types": ["s", "f", "s", "f"]}))
    assert got["layer_types"] == ["s", "f", "f", "s"]
    # one dense layer first, taken first: the pattern still holds
    assert dict(slice_config_updates(cfg, catalogs, {"num_hidden_layers": 4, "first_k_dense_replace": 1}))
