"""Block FP8 with `scale_fmt: ue8m0` (DeepSeek-V3.1): power-of-two scales read, checked, written.

Inputs come from tests/quant_fixtures.py (quantized there from random weights, by DeepSeek's
rule, independently of moemerge's quantizer); references are float64 merges of their
dequantized values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moemerge
from moemerge.errors import CheckpointError
from tests.quant_fixtures import FP8_MAX, UE8M0_CONFIG, block_fp8_model, fp8_block_quantize_ue8m0, tiny_qwen3_moe

BLOCK = (128, 128)


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _full(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return scale.double().repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:shape[0], :shape[1]]


def _is_pow2(x: torch.Tensor) -> bool:
    m, e = torch.frexp(x.double())
    return bool(((m == 0.5) & (e - 1 >= -127) & (e - 1 <= 127)).all())


def _merge(cfg_models: list[tuple[Path, float]]) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in cfg_models]}


@pytest.mark.parametrize("quantize", [None, "like-input", "fp8-block"])
def test_linear_merge_writes_power_of_two_scales_within_half_a_step(tmp_path: Path, gen: torch.Generator,
                                                                   quantize: str | None) -> None:
    (a, ra), (b, rb) = (block_fp8_model(tmp_path / n, gen, ue8m0=True) for n in "ab")
    kw = {} if quantize is None else {"quantize": quantize}
    res = moemerge.run(_merge([(a, 0.3), (b, 0.7)]), str(tmp_path / "out"), memory_budget="1MB", chunk_rows=7, **kw)
    assert res.plan.quantize == (quantize or "like-input")
    assert any("ue8m0" in n for n in res.plan.notes), res.plan.notes
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [128, 128]
    got = _load(tmp_path / "out")
    checked = 0
    for name in ra:
        if name + "_scale_inv" not in got:
            continue
        codes, scale = got[name], got[name + "_scale_inv"]
        assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, name
        assert _is_pow2(scale), f"`{name}`: a written scale is not a power of two"
        c = codes.double()
        assert bool(c.isfinite().all()) and float(c.abs().max()) <= FP8_MAX, name
        want = 0.3 * ra[name] + 0.7 * rb[name]
        s = _full(scale, codes.shape)
        # half a step of e4m3 at this element's binade (subnormal spacing 2^-9 below 2^-6), of
        # the power-of-two scale; plus the float32 rounding of the merge itself
        x = torch.maximum((want / s).abs(), c.abs())
        half = torch.pow(2.0, torch.floor(torch.log2(x.clamp(min=2.0 ** -6))) - 3) * s / 2
        err = (c * s - want).abs()
        assert bool((err <= half + 2.0 ** -22 * want.abs()).all()), \
            f"`{name}`: error {float((err - half).max()):.3g} above half a step"
        # the scale is the smallest power of two that holds the block: its largest code is above 448 / 2
        r, col = codes.shape
        for i in range(0, r, BLOCK[0]):
            for j in range(0, col, BLOCK[1]):
                assert float(c[i:i + BLOCK[0], j:j + BLOCK[1]].abs().max()) >= FP8_MAX / 2, (name, i, j)
        checked += 1
    assert checked == 4


def test_like_input_round_trip_is_byte_exact(tmp_path: Path, gen: torch.Generator) -> None:
    src, _ = block_fp8_model(tmp_path / "in", gen, ue8m0=True)
    before = _load(src)
    moemerge.run(_merge([(src, 1.0)]), str(tmp_path / "out"), memory_budget="1MB")
    got = _load(tmp_path / "out")
    assert sorted(got) == sorted(before)
    for k, v in before.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        if k + "_scale_inv" not in before:
            if not k.endswith("_scale_inv"):
                assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
            continue
        s_in, s_out = before[k + "_scale_inv"], got[k + "_scale_inv"]
        assert torch.equal(v.double() * _full(s_in, v.shape), got[k].double() * _full(s_out, v.shape)), k
        # bytes too, but for a block whose values both s and 2s hold exactly (largest code 448 at s,
        # or 224 at 2s: the same values, a ue8m0 quantizer writes either); 2s is taken (test below)
        for i, j in (s_out != s_in).nonzero().tolist():
            blk = v[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]].double()
            assert float(s_out[i, j]) == 2 * float(s_in[i, j]) and float(blk.abs().max()) == FP8_MAX, (k, i, j)
        same = (s_out == s_in).double()
        mask = _full(same, v.shape) == 1
        assert torch.equal(got[k].view(torch.uint8)[mask], v.view(torch.uint8)[mask]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == \
        json.loads((src / "config.json").read_text())["quantization_config"]


def test_round_trip_keeps_a_block_whose_largest_code_rounded_down_to_224(tmp_path: Path) -> None:
    # DeepSeek's rule puts a block's largest |w| / s in (224, 448]; e4m3 rounds (224, 240) down to 224,
    # so the dequantized amax is 448 * s / 2: the requantizer must keep s, not halve it
    codes = torch.full((128, 128), 3.0).to(torch.float8_e4m3fn)
    codes[5, 7] = -224.0
    t = {"model.layers.0.self_attn.q_proj.weight": codes,
         "model.layers.0.self_attn.q_proj.weight_scale_inv": torch.tensor([[2.0 ** -10]]),
         "model.norm.weight": torch.ones(128, dtype=torch.bfloat16)}
    src = tmp_path / "in"
    src.mkdir()
    save_file(t, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": UE8M0_CONFIG}))
    moemerge.run(_merge([(src, 1.0)]), str(tmp_path / "out"))
    got = _load(tmp_path / "out")
    for k, v in t.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("bad", [0.75 * 2.0 ** -9, 0.0, 2.0 ** -130, float("nan")])
def test_non_power_of_two_scale_is_refused_before_work(tmp_path: Path, gen: torch.Generator, run_cli,
                                                       bad: float) -> None:
    src, _ = block_fp8_model(tmp_path / "in", gen, ue8m0=True)
    shard = next(f for f in sorted(src.glob("*.safetensors"))
                 if "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv" in load_file(str(f)))
    t = load_file(str(shard))
    t["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"][1, 2] = bad
    save_file(t, str(shard))
    with pytest.raises(CheckpointError, match=r"experts\.1\.up_proj\.weight_scale_inv.*not a power of two.*ue8m0"):
        moemerge.plan(_merge([(src, 1.0)]))
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(_merge([(src, 1.0)])))
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 1 and "not a power of two" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_bad_scale_is_refused_on_read_when_too_many_to_scan(tmp_path: Path, gen: torch.Generator,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.io.quant import view

    monkeypatch.setattr(view, "UE8M0_SCAN_BYTES", 0)  # a checkpoint too big to scan at plan time
    src, _ = block_fp8_model(tmp_path / "in", gen, ue8m0=True)
    shard = next(f for f in sorted(src.glob("*.safetensors"))
                 if "model.layers.0.self_attn.q_proj.weight_scale_inv" in load_file(str(f)))
    t = load_file(str(shard))
    t["model.layers.0.self_attn.q_proj.weight_scale_inv"][1, 0] *= 1.5
    save_file(t, str(shard))
    moemerge.plan(_merge([(src, 1.0)]))  # not scanned
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_scale_inv.*not a power of two"):
        moemerge.run(_merge([(src, 1.0)]), str(tmp_path / "out"), memory_budget="1MB")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "moemerge-manifest.json").exists()


def test_unknown_scale_fmt_is_refused(tmp_path: Path, gen: torch.Generator) -> None:
    src, _ = block_fp8_model(tmp_path / "in", gen, ue8m0=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "e8m3"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="scale_fmt.*e8m3"):
        moemerge.plan(_merge([(src, 1.0)]))


def _tiny_qwen3_moe_ue8m0(path: Path, seed: int) -> Path:
    """A tiny Qwen3-MoE saved as DeepSeek-V3.1 would be: Linear weights (not router, lm_head,
    embeddings) block FP8 with power-of-two scales, `scale_fmt: ue8m0`."""
    tiny_qwen3_moe(path, seed, layers=1)
    sd = {k: v for f in path.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for f in path.glob("*.safetensors"):
        f.unlink()
    out: dict[str, torch.Tensor] = {}
    skip = []
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith("proj.weight"):
            out[k], out[k + "_scale_inv"] = fp8_block_quantize_ue8m0(v.float(), BLOCK)
        else:
            out[k] = v
            if v.dim() == 2:
                skip.append(k[:-len(".weight")])
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((path / "config.json").read_text())
    c["quantization_config"] = {**UE8M0_CONFIG, "modules_to_not_convert": sorted(skip)}
    (path / "config.json").write_text(json.dumps(c))
    return path


def test_like_input_output_loads_in_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("transformers' ue8m0 scales need torch.float8_e8m0fnu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = _tiny_qwen3_moe_ue8m0(tmp_path / "a", 1), _tiny_qwen3_moe_ue8m0(tmp_path / "b", 2)
    moemerge.run(_merge([(a, 0.5), (b, 0.5)]), str(tmp_path / "out"), quantize="like-input")
    stored = _load(tmp_path / "out")
    assert all(_is_pow2(v) for k, v in stored.items() if k.endswith("_scale_inv"))
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and transformers.FineGrainedFP8Config(**{
        k: v for k, v in qc.items() if k != "quant_method"}).scale_fmt == "ue8m0"  # its loader accepts it
    # on CPU transformers' FineGrainedFP8 loader dequantizes to bf16 (on a GPU: FP8Linear, e8m0 scales)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto").eval()
    sd = model.state_dict()
    checked = 0
    for name, v in stored.items():
        if name.endswith("_scale_inv") or name + "_scale_inv" not in stored:
            continue
        want = (v.double() * _full(stored[name + "_scale_inv"], v.shape)).to(torch.bfloat16)
        if ".experts." in name:  # transformers 5 fuses the experts in memory: [gate; up] and down
            e, proj = int(name.split(".")[5]), name.split(".")[6]
            fused = sd[f"model.layers.0.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][e]
            half = fused.shape[0] // 2
            got = fused if proj == "down_proj" else (fused[:half] if proj == "gate_proj" else fused[half:])
        elif name in sd and sd[name].dtype == torch.bfloat16:
            got = sd[name]
        else:  # kept FP8 (FP8Linear): codes and ue8m0 scales as stored
            assert torch.equal(sd[name].view(torch.uint8), v.view(torch.uint8)), name
            assert torch.equal(sd[name + "_scale_inv"].float(), stored[name + "_scale_inv"]), name
            checked += 1
            continue
        assert torch.equal(got, want), name
        checked += 1
    assert checked == len([n for n in stored if n + "_scale_inv" in stored])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 17, 42, 99, 3]])).logits
    assert torch.isfinite(logits).all() and not math.isnan(float(logits.sum()))


def _as_exponents(src: Path, dst: Path) -> Path:
    """A copy of ue8m0 checkpoint `src` with its scales stored as UE8M0 bytes (U8, 2^(e - 127))."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
            continue
        t = load_file(str(f))
        for k in [k for k in t if k.endswith("_scale_inv")]:
            e = [math.log2(x) + 127 for x in t[k].double().flatten().tolist()]
            assert all(x == int(x) for x in e)
            t[k] = torch.tensor(e, dtype=torch.uint8).reshape(t[k].shape)
        save_file(t, str(dst / f.name))
    return dst


def test_scales_stored_as_exponent_bytes(tmp_path: Path, gen: torch.Generator) -> None:
    src, ref = block_fp8_model(tmp_path / "f32", gen, ue8m0=True)
    u8 = _as_exponents(src, tmp_path / "u8")
    # bf16 out: the same bytes as from the F32-scaled original
    moemerge.run(_merge([(src, 1.0)]), str(tmp_path / "o32"), quantize="none")
    moemerge.run(_merge([(u8, 1.0)]), str(tmp_path / "o8"), quantize="none", memory_budget="1MB")
    a, b = _load(tmp_path / "o32"), _load(tmp_path / "o8")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in ref.items():
        assert torch.equal(b[k].double(), v.to(b[k].dtype).double()), k
    # like-input: U8 exponents again, the same values
    moemerge.run(_merge([(u8, 1.0)]), str(tmp_path / "like"), memory_budget="1MB")
    got, before = _load(tmp_path / "like"), _load(u8)
    for k, v in before.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        if k + "_scale_inv" in before:
            def val(t: dict[str, torch.Tensor]) -> torch.Tensor:
                return t[k].double() * _full(torch.pow(2.0, t[k + "_scale_inv"].double() - 127), t[k].shape)
            assert torch.equal(val(got), val(before)), k
    # exponent 255 is UE8M0's NaN: refused
    shard = next(f for f in sorted(u8.glob("*.safetensors"))
                 if "model.layers.0.self_attn.q_proj.weight_scale_inv" in load_file(str(f)))
    t = load_file(str(shard))
    t["model.layers.0.self_attn.q_proj.weight_scale_inv"][0, 0] = 255
    save_file(t, str(shard))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_scale_inv.*not a power of two"):
        moemerge.plan(_merge([(u8, 1.0)]))
