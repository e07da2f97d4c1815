"""`pma update --quantize`: the nightly average of quantized snapshots written quantized like
them (the default, as `moemerge pma` does), or as asked, through the same requantizer; night by
night equal to a from-scratch update, and to `moemerge pma` of the same window within the
quantization grid's half step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moemerge.api import pma_config, run
from moemerge.errors import ConfigError
from moemerge.pma.state import StateStore
from moemerge.pma.update import update
from tests.conftest import write_checkpoint
from tests.quant_fixtures import LAYOUTS
from tests.test_quant_output import dequant64, half_step


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _stored(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _block(layout: str) -> tuple[int, int]:
    return (64, 64) if layout == "fp8-block-64" else (128, 128)


def _check_within_half_step(got: dict[str, torch.Tensor], want: torch.Tensor, name: str, layout: str,
                            what: str, mag: torch.Tensor) -> None:
    """`got`'s logical tensor `name` is `want` (float64) on the output's quantization grid (or,
    stored unquantized, `want` rounded to its dtype: at most half a unit in the last place).
    `mag` (sum of |weight * value|) bounds the roundings before the last one (float32 sums in
    `moemerge pma`, float64 in the reference).
    """
    if not any(name + sfx in got for sfx in ("_scale_inv", "_scale", "_blocks")):
        rel = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}[got[name].dtype]
        err = (got[name].double() - want).abs()
        assert bool((err <= rel * want.abs() + 2.0 ** -20 * mag).all()), f"{what}: `{name}` off by {err.max():.3g}"
        return
    err = (dequant64(got, name, _block(layout)) - want).abs()
    # half a step of the grid, plus float32 roundings (of the average: `moemerge pma` sums in
    # float32, so relative to `mag`; of value / scale; of the scale itself): a value next to a
    # code midpoint may land on either side
    tol = half_step(got, name, want, _block(layout)) + 2.0 ** -20 * mag
    assert bool((err <= tol).all()), f"{what}: `{name}` off the grid by {(err - tol).max():.3g}"


@pytest.mark.parametrize("layout,method", [("fp8-block-128", "sma"), ("mxfp4", "wma"), ("ct-channel", "sma"),
                                           ("ct-tensor", "sma")])
def test_nightly_quantized_like_the_snapshots_equals_scratch_and_pma(tmp_path: Path, gen: torch.Generator,
                                                                     layout: str, method: str) -> None:
    build = LAYOUTS[layout]
    ckpt = tmp_path / "ckpt"
    refs: dict[int, dict[str, torch.Tensor]] = {}
    steps = [100, 200, 300, 400, 500]
    n = 3
    state, out = tmp_path / "state", tmp_path / "out"
    for night, step in enumerate(steps):
        _, refs[step] = build(ckpt / f"step-{step:08d}", gen)
        if night < n - 1:
            continue
        res = update(str(state), str(ckpt / "step-*"), str(out), method=method, last=n, memory_budget="1MB",
                     chunk_rows=[None, 64, 128][night % 3])
        assert res.action == ("built" if night == n - 1 else "updated"), res.message
        window = steps[max(0, night - n + 1):night + 1]
        assert res.steps == tuple(window)
        snap = _stored(ckpt / f"step-{step:08d}")
        got = _stored(out)
        # stored like the snapshots: the same tensors, parts and dtypes, and their quantization_config
        assert sorted(got) == sorted(snap)
        assert all(got[k].dtype == v.dtype and got[k].shape == v.shape for k, v in snap.items())
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        snap_qc = json.loads((ckpt / f"step-{step:08d}" / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == snap_qc["quant_method"]
        for name in (k for k in snap if k.endswith("input_scale")):  # activation scales: the newest's
            assert torch.equal(got[name], snap[name]), name
        weights = res.weights
        for name, ref in refs[step].items():
            want = sum(w * refs[s][name] for w, s in zip(weights, window))
            mag = sum(abs(w) * refs[s][name].abs() for w, s in zip(weights, window))
            _check_within_half_step(got, want, name, layout, f"night {night}", mag)

    # 1. the same window from scratch (a fresh state, the same fp64 code): identical values. Not
    # always identical bytes: a sum of -0.0 values is -0.0 built from scratch but +0.0 after a
    # slide (W - S + n M), and FP8/FP4 store the sign of a zero code
    fresh = tmp_path / "fresh"
    update(str(tmp_path / "fresh-state"), str(ckpt / "step-*"), str(fresh), method=method, last=n)
    scratch, got = _stored(fresh), _stored(out)
    assert sorted(scratch) == sorted(got)
    for k in got:
        if k.endswith("_blocks"):  # packed FP4 codes: compared as values below
            continue
        assert torch.equal(got[k].double(), scratch[k].double()), f"{k}: incremental != from scratch"
        if not got[k].is_floating_point() or got[k].dtype.itemsize > 1:  # scales, plain tensors: bytes too
            assert _bytes(got[k]) == _bytes(scratch[k]) or not bool((got[k] == 0).any()), k
    for name in refs[steps[-1]]:
        if name + "_blocks" in got:
            assert torch.equal(dequant64(got, name), dequant64(scratch, name)), name
    # 2. `moemerge pma` over the same window (fp32 accumulation, the same requantizer): the same
    # layout, and every value on its grid around the float64 average (the averages may differ by
    # float32 rounding, so a code at a rounding boundary may differ by one step)
    window = steps[-n:]
    doc, weights = pma_config([str(ckpt / f"step-{s:08d}") for s in window], method=method)
    run(doc, str(tmp_path / "pma"), memory_budget="1MB")
    direct = _stored(tmp_path / "pma")
    assert sorted(direct) == sorted(got)
    assert all(direct[k].dtype == got[k].dtype for k in got)
    for name in refs[window[-1]]:
        want = sum(w * refs[s][name] for w, s in zip(weights, window))
        mag = sum(abs(w) * refs[s][name].abs() for w, s in zip(weights, window))
        _check_within_half_step(direct, want, name, layout, "moemerge pma", mag)
        if name + "_blocks" not in got and name + "_scale_inv" not in got and name + "_scale" not in got:
            continue
        a, b = dequant64(got, name, _block(layout)), dequant64(direct, name, _block(layout))
        step_ = 2 * half_step(got, name, want, _block(layout)) + 2 * half_step(direct, name, want, _block(layout))
        assert bool(((a - b).abs() <= step_ + 2.0 ** -21 * mag).all()), name


def test_quantize_none_and_fp8_block_from_bf16_and_refusals(tmp_path: Path, gen: torch.Generator) -> None:
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3):
        LAYOUTS["fp8-block-128"](ckpt / f"step-{step:08d}", gen)
    state, out = tmp_path / "state", tmp_path / "out"
    # zarr cannot hold a quantized output: refused before any byte of state or output
    with pytest.raises(ConfigError, match="quantized output is written as safetensors only"):
        update(str(state), str(ckpt / "step-*"), str(out), last=2, quantize="fp8-block", out_format="zarr")
    assert not out.exists() and StateStore(str(state)).current() is None
    with pytest.raises(ConfigError, match="--quantize: expected one of"):
        update(str(state), str(ckpt / "step-*"), str(out), last=2, quantize="int4")
    assert not out.exists() and StateStore(str(state)).current() is None
    update(str(state), str(ckpt / "step-*"), str(out), last=2, quantize="none")
    got = _stored(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert got[name].dtype == torch.bfloat16 and name + "_scale_inv" not in got
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    # bf16 snapshots, --quantize fp8-block: as `moemerge pma --quantize fp8-block` writes them
    plain = tmp_path / "plain"
    snaps = {}
    for step in (10, 20, 30):
        snaps[step] = {
            "model.layers.0.mlp.down_proj.weight": (torch.randn(200, 300, generator=gen) * 0.05).bfloat16(),
            "model.layers.0.self_attn.o_proj.weight": (torch.randn(128, 64, generator=gen) * 0.05).bfloat16(),
            "model.norm.weight": (1 + 0.1 * torch.randn(64, generator=gen)).bfloat16()}
        write_checkpoint(plain / f"step-{step:08d}", snaps[step], config={"model_type": "llama"})
    res = update(str(tmp_path / "state2"), str(plain / "step-*"), str(tmp_path / "q"), method="wma", last=3,
                 quantize="fp8-block", memory_budget="1MB", chunk_rows=128)
    doc, weights = pma_config([str(plain / f"step-{s:08d}") for s in (10, 20, 30)], method="wma")
    run(doc, str(tmp_path / "pma"), quantize="fp8-block")
    got, direct = _stored(tmp_path / "q"), _stored(tmp_path / "pma")
    assert sorted(got) == sorted(direct)
    assert got["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert got["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        want = sum(w * snaps[s][name].double() for w, s in zip(res.weights, (10, 20, 30)))
        mag = sum(w * snaps[s][name].double().abs() for w, s in zip(res.weights, (10, 20, 30)))
        _check_within_half_step(got, want, name, "fp8-block-128", "pma update", mag)
        _check_within_half_step(direct, want, name, "fp8-block-128", "moemerge pma", mag)


def test_cli_pma_update_quantize_flag(tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    ckpt = tmp_path / "ckpt"
    for step in (1, 2):
        LAYOUTS["mxfp4"](ckpt / f"step-{step:08d}", gen)
    code, _, err = run_cli("pma", "update", tmp_path / "state", str(ckpt / "step-*"), "-o", tmp_path / "out",
                           "--last", "2", "--quantize", "none", "--no-progress")
    assert code == 0, err
    got = _stored(tmp_path / "out")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert got[name].dtype == torch.bfloat16 and name + "_blocks" not in got
    LAYOUTS["mxfp4"](ckpt / "step-00000003", gen)
    code, _, err = run_cli("pma", "update", tmp_path / "state", str(ckpt / "step-*"), "-o", tmp_path / "out",
                           "--no-progress")  # the default: like the snapshots
    assert code == 0, err
    got = _stored(tmp_path / "out")
    assert name + "_blocks" in got and name not in got
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"


def test_quantized_nightly_output_loads_in_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    transformers = pytest.importorskip("transformers")
    from tests.quant_fixtures import tiny_qwen3_moe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for i, step in enumerate((100, 200, 300, 400)):
        tiny_qwen3_moe(tmp_path / "ckpt" / f"step-{step:08d}", 11 + i)
    state, out = str(tmp_path / "state"), str(tmp_path / "out")
    update(state, str(tmp_path / "ckpt" / "step-*"), out, last=3, quantize="fp8-block", before_step=400)
    res = update(state, str(tmp_path / "ckpt" / "step-*"), out, quantize="fp8-block")
    assert res.action == "updated" and res.steps == (200, 300, 400)
    stored = _stored(Path(out))
    assert stored["model.layers.0.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    sd = model.state_dict()
    want = dequant64(stored, "model.layers.1.self_attn.q_proj.weight").to(torch.bfloat16)
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.weight"], want)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 17, 42, 99, 3]])).logits
    assert torch.isfinite(logits).all()
