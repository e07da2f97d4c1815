"""`--quantize`: merged weights written quantized (fresh scales), in the inputs' layout or another.

Fixtures are built from random *codes and scales* (each scale block attains the format's
maximum code, as a quantizer writes them), not through moemerge's quantizer, so the round trip
(`like-input`, one input, weight 1) checks the requantizer against data it did not make.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moemerge
from moemerge.errors import ConfigError
from tests.conftest import write_checkpoint, write_yaml
from tests.quant_fixtures import tiny_qwen3_moe

FP8_MAX = 448.0
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                   dtype=torch.float64)
_FP8_CFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
_MXFP4_CFG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                  "model.layers.*.mlp.router", "model.embed_tokens",
                                                                  "lm_head"]}
_CT_CFG = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                       "strategy": "channel"}}}, "ignore": ["lm_head"]}
_CT_TENSOR_CFG = json.loads(json.dumps(_CT_CFG).replace('"channel"', '"tensor"'))
_FBGEMM_CFG = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


# -- fixtures: each layout from random codes and scales ----------------------------------------


def _fp8_codes(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random finite e4m3 codes (no NaN bit patterns 0x7f / 0xff)."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x3C
    return raw.view(torch.float8_e4m3fn)


def _with_max(codes: torch.Tensor, row_group: int, col_group: int, gen: torch.Generator) -> torch.Tensor:
    """Put a ±448 code into every (row_group x col_group) block: its scale is then amax / 448."""
    raw = codes.view(torch.uint8).clone()
    r, c = raw.shape
    for i in range(0, r, row_group):
        for j in range(0, c, col_group):
            a = i + int(torch.randint(0, min(row_group, r - i), (1,), generator=gen))
            b = j + int(torch.randint(0, min(col_group, c - j), (1,), generator=gen))
            raw[a, b] = 0x7E if torch.rand(1, generator=gen) < 0.5 else 0xFE
    return raw.view(torch.float8_e4m3fn)


def _scales(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 2 + 0.1) * 1e-3


_LINEARS = {"model.layers.0.self_attn.q_proj.weight": (256, 160),           # two tile rows, ragged columns
            "model.layers.0.mlp.experts.0.up_proj.weight": (300, 128),      # ragged tile rows
            "model.layers.0.mlp.experts.1.down_proj.weight": (128, 300)}


def _plain(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """What a quantized release keeps unquantized: embeddings, norms, router, its bias."""
    return {"model.embed_tokens.weight": torch.randn(64, 128, generator=gen).to(torch.bfloat16),
            "model.layers.0.input_layernorm.weight": torch.randn(128, generator=gen).to(torch.bfloat16),
            "model.layers.0.mlp.gate.weight": torch.randn(4, 128, generator=gen).to(torch.bfloat16),
            "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(4, generator=gen),
            "lm_head.weight": torch.randn(64, 128, generator=gen).to(torch.bfloat16)}


def fp8_block_model(path: Path, gen: torch.Generator, block: tuple[int, int] = (128, 128)) -> Path:
    t = _plain(gen)
    br, bc = block
    for name, (r, c) in _LINEARS.items():
        t[name] = _with_max(_fp8_codes((r, c), gen), br, bc, gen)
        t[name + "_scale_inv"] = _scales((-(-r // br), -(-c // bc)), gen)
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 1, "torch_dtype": "bfloat16",
           "quantization_config": {**_FP8_CFG, "weight_block_size": list(block)}}
    return write_checkpoint(path, t, config=cfg, shards=2)


def channel_fp8_model(path: Path, gen: torch.Generator, quant_cfg: dict, input_scale: bool = False,
                      per_tensor: bool = False) -> Path:
    t = _plain(gen)
    for name, (r, c) in _LINEARS.items():
        t[name] = _with_max(_fp8_codes((r, c), gen), r if per_tensor else 1, c, gen)
        t[name + "_scale"] = _scales((1,) if per_tensor else (r, 1), gen)
        if input_scale:
            t[name[:-len("weight")] + "input_scale"] = _scales((1,), gen)
    cfg = {"model_type": "llama", "num_hidden_layers": 1, "torch_dtype": "bfloat16", "quantization_config": quant_cfg}
    return write_checkpoint(path, t, config=cfg)


def mxfp4_model(path: Path, gen: torch.Generator, e: int = 3, k: int = 64, n: int = 96) -> Path:
    """gpt-oss: fused experts `P` [E, K, N] stored as P_blocks [E, N, K/32, 16] + P_scales [E, N, K/32]."""
    t = {"model.layers.0.self_attn.q_proj.weight": torch.randn(n, n, generator=gen).to(torch.bfloat16),
         "model.layers.0.mlp.router.weight": torch.randn(e, n, generator=gen).to(torch.bfloat16),
         "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(e, n, generator=gen).to(torch.bfloat16)}
    for p, (kk, nn) in (("gate_up_proj", (k, n)), ("down_proj", (n, k))):
        blocks = torch.randint(0, 256, (e, nn, kk // 32, 16), generator=gen, dtype=torch.uint8)
        pos = torch.randint(0, 16, (e, nn, kk // 32), generator=gen)
        top = torch.where(torch.rand(e, nn, kk // 32, generator=gen) < 0.5, 0x07, 0x0F).to(torch.uint8)
        # every block of 32 holds a ±6 code (in its low nibble at a random byte): amax = 6 * 2^e
        blocks.scatter_(3, pos[..., None], ((blocks.gather(3, pos[..., None]) & 0xF0) | top[..., None]))
        t[f"model.layers.0.mlp.experts.{p}_blocks"] = blocks
        t[f"model.layers.0.mlp.experts.{p}_scales"] = torch.randint(110, 134, (e, nn, kk // 32), generator=gen,
                                                                   dtype=torch.uint8)
    cfg = {"model_type": "gpt_oss", "num_hidden_layers": 1, "torch_dtype": "bfloat16", "quantization_config": _MXFP4_CFG}
    return write_checkpoint(path, t, config=cfg)


LAYOUTS = {
    "fp8-block": fp8_block_model,
    "fp8-block-64x32": lambda p, g: fp8_block_model(p, g, (64, 32)),
    "compressed-tensors-channel": lambda p, g: channel_fp8_model(p, g, _CT_CFG, input_scale=True),
    "compressed-tensors-tensor": lambda p, g: channel_fp8_model(p, g, _CT_TENSOR_CFG, per_tensor=True),
    "fbgemm": lambda p, g: channel_fp8_model(p, g, _FBGEMM_CFG),
    "mxfp4": mxfp4_model,
}


# -- reading outputs back, the float64 reference ----------------------------------------------


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def dequant64(t: dict[str, torch.Tensor], name: str, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """The logical tensor `name` of a loaded checkpoint in float64, by formats.md's rules."""
    if name + "_blocks" in t:  # MXFP4 [E, N, K/32, 16] -> [E, K, N]
        blocks, scales = t[name + "_blocks"].long(), t[name + "_scales"].double()
        codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)
        vals = FP4[codes] * torch.pow(2.0, scales - 127)[..., None]
        return vals.reshape(*blocks.shape[:2], -1).transpose(1, 2)
    w = t[name]
    if name + "_scale_inv" in t:
        s = t[name + "_scale_inv"].double()
        full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:w.shape[0], :w.shape[1]]
        return w.double() * full
    if name + "_scale" in t:
        return w.double() * t[name + "_scale"].double()
    return w.double()


def half_step(t: dict[str, torch.Tensor], name: str, want: torch.Tensor,
              block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Half the quantization step, per element, of the output's grid around `want`."""
    if name + "_blocks" in t:
        scale = torch.pow(2.0, t[name + "_scales"].double() - 127)  # [E, N, K/32]
        s = scale.repeat_interleave(32, dim=2).transpose(1, 2)       # [E, K, N]
        x = (want / s).abs()
        spacing = torch.where(x < 2, 0.5, torch.where(x < 4, 1.0, 2.0))
        return spacing * s / 2
    codes = t[name].double()
    if name + "_scale_inv" in t:
        sc = t[name + "_scale_inv"].double()
        s = sc.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:codes.shape[0], :codes.shape[1]]
    else:
        s = t[name + "_scale"].double().expand_as(codes)
    x = torch.maximum((want / s).abs(), codes.abs())
    # e4m3: 3 mantissa bits; below 2^-6 subnormal with spacing 2^-9
    spacing = torch.pow(2.0, torch.floor(torch.log2(x.clamp(min=2.0 ** -6))) - 3)
    return spacing * s / 2


def _run(cfg: dict, out: Path, **kw) -> moemerge.api.RunResult:
    return moemerge.run(cfg, str(out), **{"memory_budget": "1MB", **kw})


def _one(path: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_like_input_round_trip_is_byte_exact(tmp_path: Path, gen: torch.Generator, layout: str, run_cli) -> None:
    src = LAYOUTS[layout](tmp_path / "in", gen)
    before = _load_dir(src)
    p = moemerge.plan(_one(src))
    assert p.quantize == "like-input"
    assert any("quantized like the inputs" in n for n in p.notes), p.notes
    for rows in (None, 7):  # small chunks (rounded up to whole scale blocks), and whole tensors
        out = tmp_path / f"out{rows}"
        _run(_one(src), out, chunk_rows=rows)
        got = _load_dir(out)
        assert sorted(got) == sorted(before)
        for name, v in before.items():
            assert (got[name].dtype, got[name].shape) == (v.dtype, v.shape), name
            assert torch.equal(got[name].view(torch.uint8), v.view(torch.uint8)), f"{layout}: {name} differs"
        in_cfg = json.loads((src / "config.json").read_text())
        out_cfg = json.loads((out / "config.json").read_text())
        assert out_cfg["quantization_config"] == in_cfg["quantization_config"]
        assert out_cfg["torch_dtype"] == "bfloat16"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(before)
        code, stdout, err = run_cli("verify", out)
        assert code == 0, err
    assert _load_dir(src).keys() == before.keys()  # the input is untouched
    assert all(torch.equal(_load_dir(src)[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_requantized_merge_is_within_half_a_step(tmp_path: Path, gen: torch.Generator, layout: str) -> None:
    a, b = LAYOUTS[layout](tmp_path / "a", gen), LAYOUTS[layout](tmp_path / "b", gen)
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                                {"model": str(b), "parameters": {"weight": 0.7}}]}
    _run(cfg, tmp_path / "out", chunk_rows=7)
    ta, tb, got = _load_dir(a), _load_dir(b), _load_dir(tmp_path / "out")
    assert sorted(got) == sorted(ta) and all(got[k].dtype == ta[k].dtype for k in ta)
    logical = {k[:-len("_blocks")] if k.endswith("_blocks") else k for k in ta
               if not k.endswith(("_scale", "_scale_inv", "_scales", "input_scale"))}
    checked = 0
    block = (64, 32) if layout.endswith("64x32") else (128, 128)
    for name in logical:
        want = 0.3 * dequant64(ta, name, block) + 0.7 * dequant64(tb, name, block)
        if got[name if name in got else name + "_blocks"].dtype in (torch.bfloat16, torch.float32):
            continue  # kept unquantized: tests of plain merges cover it
        err = (dequant64(got, name, block) - want).abs()
        # half a step of the output grid, plus the float32 rounding of the merge itself (2^-24 relative)
        bound = half_step(got, name, want, block) + 2.0 ** -22 * want.abs() + 1e-30
        assert bool((err <= bound).all()), f"{layout} `{name}`: error {float((err - bound).max()):.3g} above half a step"
        checked += 1
    assert checked >= 2


def test_fp8_block_from_bf16_inputs_keeps_norms_router_embeddings(tmp_path: Path, gen: torch.Generator,
                                                                   run_cli) -> None:
    t = {**_plain(gen), **{n: torch.randn(*s, generator=gen).to(torch.bfloat16) * 0.02 for n, s in _LINEARS.items()}}
    src = write_checkpoint(tmp_path / "in", t, config={"model_type": "deepseek_v3", "num_hidden_layers": 1,
                                                     "torch_dtype": "bfloat16"})
    cfg = write_yaml(tmp_path / "m.yml", _one(src))
    code, stdout, err = run_cli("plan", cfg, "--quantize", "fp8-block")
    assert code == 0 and "quantize" in stdout and "fp8-block" in stdout, stdout + err
    code, stdout, err = run_cli("run", cfg, tmp_path / "out", "--quantize", "fp8-block", "--memory-budget", "1MB",
                                "--no-progress")
    assert code == 0, err
    got = _load_dir(tmp_path / "out")
    for name, (r, c) in _LINEARS.items():
        assert got[name].dtype == torch.float8_e4m3fn
        assert got[name + "_scale_inv"].shape == (-(-r // 128), -(-c // 128))
        want = t[name].double()
        err_ = (dequant64(got, name) - want).abs()
        assert bool((err_ <= half_step(got, name, want) + 2.0 ** -22 * want.abs()).all()), name
    for name, v in _plain(gen).items():  # unquantized tensors keep their dtype and values
        assert got[name].dtype == v.dtype and torch.equal(got[name], t[name]), name
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["quantization_config"] == {**_FP8_CFG, "modules_to_not_convert": [
        "lm_head", "model.embed_tokens", "model.layers.0.mlp.gate"]}  # every matrix left in bf16
    assert out_cfg["torch_dtype"] == "bfloat16"


def test_quantize_none_writes_bf16_and_drops_quantization_config(tmp_path: Path, gen: torch.Generator) -> None:
    src = mxfp4_model(tmp_path / "in", gen)
    res = _run(_one(src), tmp_path / "out", quantize="none")
    got = _load_dir(tmp_path / "out")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name in got and name + "_blocks" not in got and got[name].dtype == torch.bfloat16
    assert torch.equal(got[name].double(), dequant64(_load_dir(src), name))  # MXFP4 values are exact in bf16
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert res.plan.quantize == "none"


def test_float8_out_dtype_without_scales_is_refused_before_work(tmp_path: Path, gen: torch.Generator,
                                                                run_cli) -> None:
    src = fp8_block_model(tmp_path / "in", gen)
    cfg = write_yaml(tmp_path / "m.yml", {**_one(src), "out_dtype": "float8_e4m3fn"})
    code, stdout, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 1
    assert "without scales" in err and "--quantize fp8-block" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="use --quantize fp8-block"):
        moemerge.plan({**_one(src), "out_dtype": "fp8"})


def test_quantized_zarr_output_is_refused_with_the_fix(tmp_path: Path, gen: torch.Generator) -> None:
    src = fp8_block_model(tmp_path / "in", gen)
    with pytest.raises(ConfigError, match="safetensors only.*--format safetensors"):
        _run(_one(src), tmp_path / "out", quantize="like-input", out_format="zarr")
    assert not (tmp_path / "out").exists()
    p = moemerge.plan(_one(src), out_format="zarr")  # the default falls back, and says so
    assert p.quantize == "none" and any("unquantized" in n for n in p.notes)


@pytest.mark.parametrize("fmt", ["zarr", "dcp"])
def test_quantized_zarr_or_dcp_refusal_names_the_reason_and_both_ways_out(tmp_path: Path, gen: torch.Generator,
                                                                          run_cli, fmt: str) -> None:
    src = fp8_block_model(tmp_path / "in", gen)
    cfg = write_yaml(tmp_path / "m.yml", _one(src))
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--format", fmt, "--quantize", "fp8-block", "--no-progress")
    assert code != 0 and "Traceback" not in err, err
    assert "codes and scales" in err and "--format safetensors" in err and "--quantize none" in err, err
    assert not (tmp_path / "out").exists()
    p = moemerge.plan(_one(src), out_format=fmt)
    assert any("--format safetensors" in n for n in p.notes), p.notes


def test_like_input_needs_a_quantized_first_input(tmp_path: Path, gen: torch.Generator) -> None:
    plain = write_checkpoint(tmp_path / "plain", _plain(gen))
    with pytest.raises(ConfigError, match="not quantized.*fp8-block or mxfp4, or none"):
        moemerge.plan(_one(plain), quantize="like-input")
    with pytest.raises(ConfigError, match="no tensor this layout stores"):
        moemerge.plan(_one(plain), quantize="mxfp4")


def test_mixed_inputs_default_to_unquantized_and_say_so(tmp_path: Path, gen: torch.Generator) -> None:
    a = fp8_block_model(tmp_path / "a", gen)
    config = json.loads((a / "config.json").read_text())  # the same model, stored dequantized
    config.pop("quantization_config")
    b = write_checkpoint(tmp_path / "b", {n: dequant64(_load_dir(a), n).to(torch.bfloat16) if n in _LINEARS else v
                                          for n, v in _load_dir(a).items() if not n.endswith("_scale_inv")},
                         config=config)
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                {"model": str(b), "parameters": {"weight": 0.5}}]}
    p = moemerge.plan(cfg)
    assert p.quantize == "none" and any("not all quantized the same way" in n for n in p.notes)
    p = moemerge.plan(cfg, quantize="like-input")
    assert p.quantize == "like-input"
    stored = {n: d for t in p.tensors for n, _, d, _ in t.stored()}
    assert stored["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert stored["model.layers.0.self_attn.q_proj.weight_scale_inv"] == "F32"
    assert p.bytes_written == sum(v.numel() * v.element_size() for v in _load_dir(a).values())


def test_dask_round_trip_with_split_tensors(tmp_path: Path, gen: torch.Generator) -> None:
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    src = fp8_block_model(tmp_path / "in", gen)
    before = _load_dir(src)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        # units of ~40 KB: the 300-row tensor is split into pieces (apply tasks, then a hash task)
        res = _run(_one(src), tmp_path / "out", client=client, unit_size="40KB", chunk_rows=128)
    got = _load_dir(tmp_path / "out")
    assert sorted(got) == sorted(before)
    assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items())
    local = _run(_one(src), tmp_path / "local", chunk_rows=128)
    assert res.checksums == local.checksums
    assert math.isfinite(res.seconds)




def test_fp8_block_output_loads_in_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = tiny_qwen3_moe(tmp_path / "a", 1), tiny_qwen3_moe(tmp_path / "b", 2)
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                {"model": str(b), "parameters": {"weight": 0.5}}]}
    _run(cfg, tmp_path / "out", quantize="fp8-block")
    stored = _load_dir(tmp_path / "out")
    assert stored["model.layers.0.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays bf16
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    # on a GPU transformers swaps every nn.Linear not listed for an FP8 one: the router and lm_head must be
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(qc["modules_to_not_convert"])
    # on CPU transformers' FineGrainedFP8 loader dequantizes to bf16: each weight must be ours
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto").eval()
    sd = model.state_dict()
    checked = 0
    for name in stored:
        if name.endswith("_scale_inv"):
            continue
        want = dequant64(stored, name).to(torch.bfloat16)
        if ".experts." in name:  # transformers 5 fuses the experts in memory: [gate; up] and down
            layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            fused = sd[f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][e]
            half = fused.shape[0] // 2
            got = fused if proj == "down_proj" else (fused[:half] if proj == "gate_proj" else fused[half:])
        else:
            got = sd[name]
        assert torch.equal(got, want), name
        checked += 1
    assert checked == len([n for n in stored if not n.endswith("_scale_inv")])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 17, 42, 99, 3]])).logits
    assert torch.isfinite(logits).all()


def test_mxfp4_output_loads_in_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
                                    layer_types=["full_attention", "full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "in")
    _run(_one(tmp_path / "in"), tmp_path / "out", quantize="mxfp4")
    stored = _load_dir(tmp_path / "out")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name not in stored and stored[name + "_blocks"].shape == (4, 128, 2, 16)
    assert stored["model.layers.0.mlp.router.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    # on CPU without triton, transformers' MXFP4 loader dequantizes to bf16: the experts must be ours
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto").eval()
    sd = loaded.state_dict()
    for layer in range(2):
        for p in ("gate_up_proj", "down_proj"):
            n = f"model.layers.{layer}.mlp.experts.{p}"
            assert torch.equal(sd[n], dequant64(stored, n).to(sd[n].dtype)), n
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 5, 17, 42, 99, 3]])).logits).all()


def test_pma_over_fp8_snapshots_writes_fp8_like_the_snapshots(tmp_path: Path, gen: torch.Generator,
                                                                run_cli) -> None:
    snaps = [fp8_block_model(tmp_path / f"step{i}", gen) for i in (100, 200, 300)]
    code, stdout, err = run_cli("pma", *snaps, "--dry-run")
    assert code == 0 and "like-input" in stdout and "quantized like the inputs" in err, stdout + err
    code, stdout, err = run_cli("pma", *snaps, "-o", tmp_path / "avg", "--memory-budget", "1MB", "--no-progress")
    assert code == 0, err
    got, ins = _load_dir(tmp_path / "avg"), [_load_dir(s) for s in snaps]
    assert sorted(got) == sorted(ins[0]) and all(got[k].dtype == v.dtype for k, v in ins[0].items())
    for name in _LINEARS:
        want = sum(dequant64(t, name) for t in ins) / 3
        err_ = (dequant64(got, name) - want).abs()
        # the float32 sum's rounding is relative to sum |w x| (terms can cancel), not to |want|
        fp32 = 2.0 ** -21 * sum(dequant64(t, name).abs() for t in ins) / 3
        assert bool((err_ <= half_step(got, name, want) + fp32).all()), name
    code, stdout, err = run_cli("pma", *snaps, "-o", tmp_path / "bf16", "--quantize", "none", "--no-progress")
    assert code == 0, err
    assert _load_dir(tmp_path / "bf16")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def _big_fp8(path: Path, rows: int = 16384, cols: int = 32768) -> Path:
    """One block-FP8 tensor of rows x cols (512 MiB of codes), streamed to disk; every tile has
    a ±448 code (its first element), as a quantizer writes them."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    scale = torch.rand(rows // 128, cols // 128, generator=g) * 1e-3 + 1e-5
    header = {"w": {"dtype": "F8_E4M3", "shape": [rows, cols], "data_offsets": [0, rows * cols]},
              "w_scale_inv": {"dtype": "F32", "shape": list(scale.shape),
                              "data_offsets": [rows * cols, rows * cols + scale.numel() * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(0, rows, 1024):
            block = torch.randint(0, 256, (1024, cols), generator=g, dtype=torch.uint8)
            block[(block & 0x7F) == 0x7F] = 0x30
            block[::128, ::128] = 0x7E
            f.write(block.numpy().tobytes())
        f.write(scale.numpy().tobytes())
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": _FP8_CFG}))
    return path


@pytest.mark.slow
def test_requantizing_a_512mib_fp8_tensor_stays_under_1gib(tmp_path: Path) -> None:
    from tests.test_memory import RSS_LIMIT, _run_child

    src = _big_fp8(tmp_path / "in")
    y = write_yaml(tmp_path / "m.yml", {**_one(src), "quantize": "like-input"})
    peak = _run_child("run", y, tmp_path / "out", "--memory-budget", "128MB", "--no-progress")
    print(f"peak RSS {peak / 2**20:.0f} MiB")
    assert peak < RSS_LIMIT
    from safetensors import safe_open

    for name, rows in (("w", (8190, 8194)), ("w_scale_inv", (0, 128))):
        with safe_open(str(tmp_path / "out" / "model-00001-of-00001.safetensors"), framework="pt") as out, \
                safe_open(str(src / "model.safetensors"), framework="pt") as inp:
            a, b = out.get_slice(name)[rows[0]:rows[1]], inp.get_slice(name)[rows[0]:rows[1]]
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


def test_pma_update_output_of_quantized_snapshots_drops_quantization_config(
        tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    for step in (100, 200):
        mxfp4_model(tmp_path / "ckpt" / f"step-{step}", gen)
    # `pma update --quantize none` (its default is `pma`'s, like-input: tests/test_pma_update_quant.py)
    code, stdout, err = run_cli("pma", "update", tmp_path / "state", str(tmp_path / "ckpt" / "step-*"),
                                "-o", tmp_path / "out", "--last", "2", "--quantize", "none", "--no-progress")
    assert code == 0, err
    got = _load_dir(tmp_path / "out")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert got[name].dtype == torch.bfloat16 and name + "_blocks" not in got
    # written unquantized: a kept `quant_method: mxfp4` would make transformers misread the experts
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_resume_keeps_finished_quantized_tensors(tmp_path: Path, gen: torch.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.errors import OutputError
    from moemerge.io.checkpoint import Checkpoint
    from moemerge.io.journal import JOURNAL_NAME
    from moemerge.io.writer import LocalModelWriter

    src = fp8_block_model(tmp_path / "in", gen)
    clean = _run(_one(src), tmp_path / "clean", memory_budget="64MB")
    out = tmp_path / "out"
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1)  # journal after every tensor
    real_write, seen = LocalModelWriter.write_rows, [0]

    def failing(self, name, row_start, data):  # a full disk on the 10th write (of 11)
        seen[0] += 1
        if seen[0] == 10:
            raise OutputError(f"{self.url}: simulated crash while writing `{name}`")
        return real_write(self, name, row_start, data)

    with monkeypatch.context() as m:
        m.setattr(LocalModelWriter, "write_rows", failing)
        with pytest.raises(OutputError, match="simulated crash"):
            _run(_one(src), out, memory_budget="64MB")
    done = {json.loads(ln).get("t") for ln in (out / JOURNAL_NAME).read_text().splitlines()[1:] if ln.strip()}
    parts_done = done & {n + s for n in _LINEARS for s in ("", "_scale_inv")}
    assert parts_done, done  # at least one quantized tensor (both parts) was finished
    read: list[str] = []
    real_read = Checkpoint.read_rows

    def spy(self, name, r0, r1, buf):
        read.append(name)
        return real_read(self, name, r0, r1, buf)

    monkeypatch.setattr(Checkpoint, "read_rows", spy)
    res = _run(_one(src), out, memory_budget="64MB", resume=True)
    assert not parts_done & set(read)  # its codes and scales were not read (or requantized) again
    assert res.checksums == clean.checksums
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == \
        {p.name: p.read_bytes() for p in (tmp_path / "clean").glob("*.safetensors")}


def test_quantized_output_streams_to_object_storage(tmp_path: Path, gen: torch.Generator, s3_server,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    s3fs = pytest.importorskip("s3fs")
    from moemerge.io import s3_writer

    boto3.client("s3").create_bucket(Bucket="out")
    src = fp8_block_model(tmp_path / "in", gen)
    _run(_one(src), "s3://out/fp8", chunk_rows=128)  # codes and scales of each chunk, streamed
    fs = s3fs.S3FileSystem()
    fs.get("out/fp8/", str(tmp_path / "back") + "/", recursive=True)
    before, got = _load_dir(src), _load_dir(tmp_path / "back")
    assert sorted(got) == sorted(before)
    assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items())
    # on Dask, one task streams each output shard (codes and scales of its tensors, in file order)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        _run(_one(src), "s3://out/fp8-dask", chunk_rows=128, client=client, shard_size="40KB")
    fs.invalidate_cache()
    fs.get("out/fp8-dask/", str(tmp_path / "back-dask") + "/", recursive=True)
    got = _load_dir(tmp_path / "back-dask")
    assert len(list((tmp_path / "back-dask").glob("*.safetensors"))) > 1
    wmap = json.loads((tmp_path / "back-dask" / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(wmap[n] == wmap[n + "_scale_inv"] for n in _LINEARS)  # a tensor's parts share a shard
    assert sorted(got) == sorted(before)
    assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items())
    # scales that would wait in memory beyond the stream's reorder window: refused before any object
    monkeypatch.setattr(s3_writer, "MAX_PENDING", 100)
    mx = mxfp4_model(tmp_path / "mx", gen)
    with pytest.raises(ConfigError, match=r"experts\.(gate_up|down)_proj`: its mxfp4 scales .* local directory"):
        _run(_one(mx), "s3://out/mx")
    assert not fs.exists("out/mx") or not fs.ls("out/mx")
