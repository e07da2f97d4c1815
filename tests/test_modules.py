"""MergeKit's `modules:` for multi-part models (planner/modules.py): a tiny random Qwen2-VL
merged part by part against a float64 reference and loaded by transformers, MergeKit 0.1.5's
golden output of a Qwen2.5-VL module config, and the refusals (before any output) of module
configs that would give a wrong model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import moemerge
from conftest import golden_paths, write_yaml
from moemerge.config import parse_config
from moemerge.errors import ConfigError, PlanError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
TEXT, VIS = "model.language_model.", "model.visual."


def _vl_config() -> Any:
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=2, in_channels=3, temporal_patch_size=2))
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    return cfg


@pytest.fixture(scope="module")
def vls(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny Qwen2-VLs saved by transformers (current names: `model.language_model.`,
    `model.visual.`), every weight drawn at random (norms included)."""
    root = tmp_path_factory.mktemp("vl")
    out = []
    for i in range(3):
        torch.manual_seed(300 + i)
        model = Qwen2VLForConditionalGeneration(_vl_config())
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        # the module's own names (save_pretrained would write transformers < 4.52's `model.` /
        # `visual.`, which the golden inputs already cover)
        (root / f"v{i}").mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"v{i}" / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(str(root / f"v{i}"))
        out.append(root / f"v{i}")
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _src(model: Path | str, a: int, b: int, **params: Any) -> dict[str, Any]:
    return {"model": str(model), "layer_range": [a, b], **({"parameters": params} if params else {})}


def _at(name: str, prefix: str, part: str, i: int) -> str:
    """`name` (in layer/block N of `prefix`) moved to layer i."""
    rest = name[len(prefix) + len(part):].split(".", 1)[1]
    return f"{prefix}{part}{i}.{rest}"


def test_qwen2_vl_module_merge_equals_a_float64_reference_and_loads(tmp_path: Path, vls: list[Path]) -> None:
    a, b, c = vls
    doc = {
        "merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
        "modules": {
            "text_decoder": {"parameters": {"weight": 0.5}, "slices": [
                {"sources": [_src(a, 0, 3, weight=[0.0, 1.0]), _src(b, 1, 4)]},
                {"sources": [_src(b, 3, 4), _src(a, 1, 2)], "parameters": {"weight": 2.0}},
            ]},
            "vision_tower": {"models": [{"model": str(b), "parameters": {"weight": 0.3}},
                                        {"model": str(c), "parameters": {"weight": 0.7}}]},
            "multi_modal_projector": {"models": [{"model": str(c)}, {"model": str(a)}],
                                      "parameters": {"weight": 0.25}},
        },
    }
    out = tmp_path / "out"
    moemerge.run(doc, str(out))
    got = _tensors(out)
    sd = {p: {k: v.double() for k, v in _tensors(p).items()} for p in vls}

    def lin(pairs: list[tuple[Path, str, float]]) -> torch.Tensor:
        return sum(w * sd[p][n] for p, n, w in pairs) / sum(w for _, _, w in pairs)  # type: ignore[return-value]

    want: dict[str, torch.Tensor] = {}
    names = list(sd[a])
    layer0 = [n for n in names if n.startswith(f"{TEXT}layers.0.")]
    # text: slice 1 (3 layers, a's weight a gradient 0 -> 1, b at the module's 0.5), slice 2 (weight 2.0)
    for i in range(3):
        for n in layer0:
            want[_at(n, TEXT, "layers.", i)] = lin([(a, _at(n, TEXT, "layers.", i), i / 2),
                                                    (b, _at(n, TEXT, "layers.", 1 + i), 0.5)])
    for n in layer0:
        want[_at(n, TEXT, "layers.", 3)] = lin([(b, _at(n, TEXT, "layers.", 3), 2.0), (a, _at(n, TEXT, "layers.", 1), 2.0)])
    for n in names:
        if n.startswith(TEXT) and ".layers." not in n or n == "lm_head.weight":
            first = "embed" in n  # embeddings from the first slice (a's gradient at t = 0), the rest from the last
            want[n] = lin([(a, n, 0.0), (b, n, 0.5)]) if first else lin([(b, n, 2.0), (a, n, 2.0)])
        elif n.startswith(f"{VIS}merger."):
            want[n] = lin([(c, n, 0.25), (a, n, 0.25)])
        elif n.startswith(VIS):
            want[n] = lin([(b, n, 0.3), (c, n, 0.7)])
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert torch.allclose(got[n].double(), w, rtol=1e-6, atol=1e-6), n
    conf = json.loads((out / "config.json").read_text())
    assert conf["text_config"]["num_hidden_layers"] == 4 and conf["vision_config"]["depth"] == 3
    assert len(conf["text_config"]["layer_types"]) == 4
    # transformers loads it (no missing or unexpected weights) and a text-only forward pass matches
    # a model holding the reference weights
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = Qwen2VLForConditionalGeneration(transformers.AutoConfig.from_pretrained(str(out)))
    ref.load_state_dict({k: v.float() for k, v in want.items()})
    ids = torch.tensor([[3, 9, 27, 5, 11, 60]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, ref.eval()(input_ids=ids).logits)


def test_vision_layers_sliced_rewrite_vision_config(tmp_path: Path, vls: list[Path]) -> None:
    a, b, _ = vls
    doc = {"merge_method": "passthrough", "modules": {
        "text_decoder": {"models": [{"model": str(a)}]},
        "vision_tower": {"slices": [{"sources": [_src(b, 2, 3)]}, {"sources": [_src(a, 0, 3)]}]},
        "multi_modal_projector": {"models": [{"model": str(b)}]}}}
    plan = moemerge.plan(doc)
    vc = dict(plan.config_updates)["vision_config"]
    assert vc["depth"] == 4 and vc["embed_dim"] == 16
    out = tmp_path / "o"
    moemerge.run(doc, str(out))
    got, sa, sb = _tensors(out), _tensors(a), _tensors(b)
    for n, v in got.items():
        if n.startswith(f"{VIS}blocks."):
            k = int(n.split(".")[3])
            src, i = (sb, 2) if k == 0 else (sa, k - 1)
            assert torch.equal(v, src[_at(n, VIS, "blocks.", i)]), n
        elif n.startswith(VIS):
            assert torch.equal(v, sb[n]), n  # the projector, and patch_embed from the first slice
        else:
            assert torch.equal(v, sa[n]), n
    assert sum(n.startswith(f"{VIS}blocks.3.") for n in got) > 0
    assert json.loads((out / "config.json").read_text())["vision_config"]["depth"] == 4
    Qwen2VLForConditionalGeneration.from_pretrained(str(out))


def _bad(a: Path, b: Path) -> dict[str, tuple[dict[str, Any], tuple[str, ...]]]:
    full = {"text_decoder": {"models": [{"model": str(a)}]}, "vision_tower": {"models": [{"model": str(a)}]},
            "multi_modal_projector": {"models": [{"model": str(a)}]}}
    pt = {"merge_method": "passthrough"}
    return {
        "misspelt_module": ({**pt, "modules": {**full, "vision_towr": {"models": [{"model": str(a)}]}}},
                            ("vision_towr", "vision_tower", "multi_modal_projector")),
        "unlisted_module": ({**pt, "modules": {k: v for k, v in full.items() if k != "vision_tower"}},
                            ("vision_tower", "random weights")),
        "slices_of_the_projector": ({**pt, "modules": {**full, "multi_modal_projector": {"slices": [
            {"sources": [_src(a, 0, 1)]}]}}}, ("multi_modal_projector", "no layers", "models:")),
        "vision_range_outside": ({**pt, "modules": {**full, "vision_tower": {"slices": [
            {"sources": [_src(a, 2, 5)]}]}}}, ("modules.vision_tower.slices[0].sources[0]", "3 layers")),
        "top_level_slices": ({**pt, "slices": [{"sources": [_src(a, 0, 2)]}]},
                             ("Qwen2VLForConditionalGeneration", "modules:")),
        "default_module": ({**pt, "modules": {"default": {"models": [{"model": str(a)}]}}},
                           ("Qwen2VLForConditionalGeneration", "modules:")),
    }


@pytest.mark.parametrize("case", sorted(_bad(Path("a"), Path("b"))))
def test_bad_module_config_is_refused_before_work(tmp_path: Path, vls: list[Path], run_cli, case: str) -> None:
    doc, needles = _bad(vls[0], vls[1])[case]
    out = tmp_path / "out"
    code, _, err = run_cli("run", write_yaml(tmp_path / "bad.yml", doc), out)
    assert code != 0
    flat = " ".join(err.split())
    for n in needles:
        assert n in flat, f"{n!r} not in {flat!r}"
    assert not out.exists()


def test_default_with_named_modules_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="default"):
        parse_config({"merge_method": "passthrough", "modules": {
            "default": {"models": [{"model": "a"}]}, "text_decoder": {"models": [{"model": "a"}]}}})


def test_named_modules_of_an_unknown_architecture_name_it_and_the_known_ones(ckpt_factory: Any) -> None:
    m = ckpt_factory("m", {"model.layers.0.w": torch.randn(2, 2)},
                     config={"architectures": ["FooForCausalLM"], "model_type": "foo", "num_hidden_layers": 1})
    with pytest.raises(PlanError, match=r"FooForCausalLM.*Known:.*Qwen2VLForConditionalGeneration.*Llava"):
        moemerge.plan({"merge_method": "passthrough", "modules": {"text_decoder": {"models": [{"model": str(m)}]}}})


# -- agreement with MergeKit 0.1.5 (tests/golden/slices, scripts/mergekit_golden_slices.py) ------

MODULE_CASES = tuple(json.loads((GOLDEN / "slices" / "MANIFEST.json").read_text()).get("module_cases", ()))


def _absolute(doc: Any) -> Any:
    return golden_paths(doc, GOLDEN)


@pytest.mark.parametrize("case", MODULE_CASES)
def test_modules_agree_with_mergekit(tmp_path: Path, case: str) -> None:
    import yaml

    doc = _absolute(yaml.safe_load((GOLDEN / "slices" / f"{case}.yaml").read_text()))
    out = tmp_path / "out"
    moemerge.run(doc, str(out))
    want = load_file(str(GOLDEN / "slices" / f"{case}.safetensors"))
    got = _tensors(out)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        err = (got[name].double() - w.double()).abs() / w.double().abs().clamp(min=1.0)
        assert err.max().item() <= 1e-5, f"{case}: `{name}` differs from MergeKit by {err.max().item():.3g}"
    ours = json.loads((out / "config.json").read_text())
    theirs = json.loads((GOLDEN / "slices" / f"{case}.config.json").read_text())
    for part, key in (("text_config", "num_hidden_layers"), ("vision_config", "depth")):
        assert ours[part][key] == theirs[part][key]
    # MergeKit leaves text_config.layer_types at the inputs' length; ours follows the layers
    assert len(ours["text_config"]["layer_types"]) == ours["text_config"]["num_hidden_layers"]
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 9, 27, 5]])).logits).all()
