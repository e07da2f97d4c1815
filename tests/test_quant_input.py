"""Quantized inputs (issue 10, input side): every layout is detected before work, dequantized
on read, and merged in real-valued space; the codecs' round trip and error bound."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moemerge
from moemerge.errors import CheckpointError, PlanError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import to_torch
from moemerge.io.quant import CODECS, QuantScheme, dequantizing, get_codec
from tests.quant_fixtures import GPT_OSS_CONFIG, LAYOUTS, mxfp4_dequantize
from tests.conftest import write_checkpoint


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("MOEMERGE_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


# -- codecs: round trip and error bound ------------------------------------------------------

#: (codec, logical shape, scheme) per layout; shapes with ragged edges where the layout has them.
CASES = {
    "fp8-block-128": ("fp8-block", (200, 300), QuantScheme(method="fp8", block=(128, 128))),
    "fp8-block-64": ("fp8-block", (200, 300), QuantScheme(method="fp8", block=(64, 64))),
    "fp8-block-3d-ragged": ("fp8-block", (3, 100, 70), QuantScheme(method="fp8", block=(64, 32))),
    "mxfp4": ("mxfp4", (3, 64, 40), QuantScheme(method="mxfp4")),
    "fp8-channel": ("fp8-channel", (50, 70), QuantScheme(method="compressed-tensors", strategy="channel")),
    "fbgemm-row": ("fp8-channel", (50, 70), QuantScheme(method="fbgemm_fp8", strategy="row")),
    "fp8-tensor": ("fp8-channel", (50, 70), QuantScheme(method="compressed-tensors", strategy="tensor")),
}


def _parts_of(codec, spec, stored: dict[str, torch.Tensor], r0: int, r1: int) -> dict[str, torch.Tensor]:
    out = {}
    for p in spec.parts:
        a, b = codec.part_rows(spec, p, r0, r1)
        out[p.role] = stored[p.role].reshape(p.rows, p.row_len)[a:b]
    return out


def _random_stored(codec_name: str, spec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random stored bytes in canonical form (each scale block attains the format maximum)."""
    if codec_name == "mxfp4":
        blocks = torch.randint(0, 256, spec.part("blocks").shape, generator=gen, dtype=torch.uint8)
        blocks[..., 0] = 0x7F  # codes 15 (-6) and 7 (+6): every block reaches |6|
        scales = torch.randint(100, 140, spec.part("scales").shape, generator=gen, dtype=torch.uint8)
        return {"blocks": blocks.reshape(-1, 16), "scales": scales.reshape(-1, spec.part("scales").row_len)}
    w = spec.part("weight")
    codes = torch.randint(0, 256, w.shape, generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x10  # no NaN codes
    s = spec.part("scale")
    scale = (torch.rand(s.shape, generator=gen) * 1e-3 + 1e-7).float()
    x = codes.view(torch.float8_e4m3fn).float()
    # one 448 in every scale group
    rows = w.rows
    v = x.reshape(rows, w.row_len).clone()
    if codec_name == "fp8-block":
        br, bc = spec.scheme.block
        rr = torch.arange(rows)  # the first row of every tile row (stacked matrices too)
        first = (rr % spec.shape[-2]) % br == 0
        v[first, ::bc] = 448.0
    else:
        v[:, 0] = -448.0
    codes = v.to(torch.float8_e4m3fn).reshape(w.shape)
    return {"weight": codes.reshape(rows, w.row_len), "scale": scale.reshape(s.rows, s.row_len)}


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_of_dequantized_gives_the_stored_bytes_back(case: str, gen: torch.Generator) -> None:
    name, shape, scheme = CASES[case]
    codec = get_codec(name)
    spec = codec.layout("w", shape, scheme)
    for _ in range(3):
        stored = _random_stored(name, spec, gen)
        values = codec.dequantize_rows(spec, _parts_of(codec, spec, stored, 0, spec.rows), 0, spec.rows)
        amax = float(values.abs().max()) if codec.needs_amax(spec) else None
        # whole tensor, and block-aligned chunks
        step = spec.row_align * (2 if spec.rows > 2 * spec.row_align else 1)
        if codec.needs_amax(spec):  # one scale for the whole tensor: one chunk (planner.quant.chunk_align)
            step = spec.rows
        for r0 in range(0, spec.rows, step):
            r1 = min(spec.rows, r0 + step)
            got = codec.quantize_rows(spec, values[r0:r1], r0, r1, amax=amax)
            want = _parts_of(codec, spec, stored, r0, r1)
            for role, t in want.items():
                g = got[role].reshape(t.shape)
                assert g.dtype == t.dtype, role
                assert torch.equal(g.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), (case, role, r0, r1)


@pytest.mark.parametrize("case", list(CASES))
def test_requantized_values_are_within_half_a_step(case: str, gen: torch.Generator) -> None:
    name, shape, scheme = CASES[case]
    codec = get_codec(name)
    spec = codec.layout("w", shape, scheme)
    x = torch.randn(spec.rows, spec.row_len, generator=gen) * torch.rand(spec.rows, 1, generator=gen)
    amax = float(x.abs().max())
    stored = codec.quantize_rows(spec, x, 0, spec.rows, amax=amax)
    back = codec.dequantize_rows(spec, stored, 0, spec.rows).double()
    # half a step of the grid at each element: e4m3 has 3 mantissa bits (2^-4 relative), e2m1
    # values step by 0.5 below 2, 1 below 4 and 2 to 6, times the block's power of two
    if name == "mxfp4":
        s = torch.pow(2.0, stored["scales"].double() - 127).reshape(-1, 1)
        full = back.view(shape[0], shape[1], shape[2]).transpose(1, 2).reshape(-1, 32)
        xs = x.double().view(shape[0], shape[1], shape[2]).transpose(1, 2).reshape(-1, 32)
        mag = xs.abs() / s
        step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)) * s
        assert bool(((full - xs).abs() <= step / 2 + 1e-30).all())
    else:
        err = (back - x.double()).abs()
        bound = x.double().abs() * 2 ** -4 + 2 ** -9 * back.abs().max() * 2 ** -6  # e4m3: 3 mantissa bits; subnormals
        assert bool((err <= bound).all()), float((err - bound).max())


def test_registry_is_one_visible_list() -> None:
    assert [c.name for c in CODECS] == ["fp8-block", "mxfp4", "fp8-channel"]
    with pytest.raises(ValueError, match="known: fp8-block, mxfp4, fp8-channel"):
        get_codec("int4")


# -- merges in dequantized space -------------------------------------------------------------

def _load(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Within one rounding to the output dtype (bf16; F32 tensors stay F32) of the float64
    value, plus float32 compute noise."""
    assert got.dtype == (torch.float32 if name.endswith("correction_bias") else torch.bfloat16), name
    err = (got.double() - want).abs()
    bound = want.abs() * (2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -20) + 1e-6
    assert bool((err <= bound).all()), (name, float((err - bound).max()))


def _plain_copy(path: Path, ref: dict[str, torch.Tensor], gen: torch.Generator,
                like: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An unquantized bf16 checkpoint near `ref` (a fine-tune of the same model), with the
    config.json of `like` minus its quantization_config (the same architecture, dequantized)."""
    tensors = {n: (v + 0.01 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(torch.bfloat16)
               for n, v in ref.items()}
    config = json.loads((like / "config.json").read_text())
    config.pop("quantization_config", None)
    return write_checkpoint(path, tensors, config=config), {n: t.double() for n, t in tensors.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_merges_linear_like_the_float64_merge_of_the_dequantized_inputs(
        layout: str, tmp_path: Path, gen: torch.Generator) -> None:
    a, ref_a = LAYOUTS[layout](tmp_path / "a", gen)
    b, ref_b = LAYOUTS[layout](tmp_path / "b", gen)  # mixed: a quantized, b quantized, c bf16
    c, ref_c = _plain_copy(tmp_path / "c", ref_a, gen, like=a)
    before = {p: (p / f).read_bytes() for p in (a, b) for f in os.listdir(p)}
    cfg = {"merge_method": "linear", "quantize": "none",
           "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.3}},
                      {"model": str(c), "parameters": {"weight": 0.2}}]}
    p = moemerge.plan(cfg)
    sizes = sum(os.path.getsize(x / f) for x in (a, b, c) for f in os.listdir(x) if f.endswith(".safetensors"))
    headers = sum(8 + int.from_bytes((x / f).read_bytes()[:8], "little") for x in (a, b, c) for f in os.listdir(x)
                  if f.endswith(".safetensors"))
    assert p.bytes_read == sizes - headers  # as stored: parts once, no served-size double count
    outs = {}
    for rows in (1, None):  # chunk invariance across scale blocks
        out = tmp_path / f"out{rows}"
        outs[rows] = moemerge.run(cfg, str(out), memory_budget="1MB", chunk_rows=rows).checksums
        merged = _load(out)
        assert set(merged) == set(ref_a)  # the logical names; no scales, blocks or input scales
        for name in ref_a:
            _close(merged[name], 0.5 * ref_a[name] + 0.3 * ref_b[name] + 0.2 * ref_c[name], name)
        out_cfg = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in out_cfg
    assert outs[1] == outs[None]
    assert before == {p: (p / f).read_bytes() for p in (a, b) for f in os.listdir(p)}  # inputs untouched


@pytest.mark.parametrize("layout", ["fp8-block-128", "mxfp4", "ct-channel"])
def test_ties_over_quantized_inputs_sees_real_values(layout: str, tmp_path: Path, gen: torch.Generator) -> None:
    from tests.reference_methods import AMBIGUOUS, REFERENCES

    base, ref_base = LAYOUTS[layout](tmp_path / "base", gen)
    a, ref_a = LAYOUTS[layout](tmp_path / "a", gen)
    b, ref_b = _plain_copy(tmp_path / "b", ref_base, gen, like=base)
    cfg = {"merge_method": "ties", "base_model": str(base), "quantize": "none",
           "parameters": {"density": 1.0, "weight": 0.5},
           "models": [{"model": str(a)}, {"model": str(b)}]}
    moemerge.run(cfg, str(tmp_path / "out"), memory_budget="1MB")
    merged = _load(tmp_path / "out")
    per = [{"weight": 0.5, "density": 1.0}] * 2
    served = {n: v.float().double() for n, v in ref_base.items()}  # dequantized as the engine serves:
    served_a = {n: v.float().double() for n, v in ref_a.items()}  # code x scale rounded to float32 once
    for name in ref_base:
        # the sign vote is discontinuous at a zero task vector: where b (bf16) equals the
        # float32 base exactly, the float64 base would still differ from it by a hair
        want = REFERENCES["ties"](served[name], [served_a[name], ref_b[name]], per, {}, name)
        ok = ~AMBIGUOUS.get("last", torch.zeros_like(want, dtype=torch.bool))
        _close(merged[name][ok], want[ok], name)


def _snapshots(root: Path, layout: str, gen: torch.Generator, steps: tuple[int, ...]) -> dict[int, dict]:
    refs = {}
    for s in steps:
        _, refs[s] = LAYOUTS[layout](root / "ckpt" / f"step-{s}", gen)
    return refs


@pytest.mark.parametrize("layout", ["mxfp4", "fp8-block-128", "ct-channel"])
def test_pma_averages_quantized_experts_instead_of_copying_the_newest(
        layout: str, tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    refs = _snapshots(tmp_path, layout, gen, (1, 2, 3))
    out = tmp_path / "out"
    code, _, err = run_cli("pma", f"{tmp_path}/ckpt/step-*", "-o", out, "--method", "sma", "--last", "3", "--quantize", "none",
                           "--no-progress")
    assert code == 0, err
    merged = _load(out)
    assert set(merged) == set(refs[1])
    for name in refs[1]:
        _close(merged[name], sum(r[name] for r in refs.values()) / 3, name)


@pytest.mark.parametrize("layout", ["mxfp4", "fp8-block-64"])
def test_pma_update_averages_quantized_snapshots(layout: str, tmp_path: Path, gen: torch.Generator) -> None:
    from moemerge.pma.update import update

    refs = _snapshots(tmp_path, layout, gen, (10, 20))
    out, state = tmp_path / "out", tmp_path / "state"
    pattern = f"{tmp_path}/ckpt/step-*"
    # written unquantized, to compare values with the float64 average (the quantized output, the
    # default for quantized snapshots, is tests/test_pma_update_quant.py's)
    kw = {"method": "sma", "last": 2, "chunk_rows": 3, "quantize": "none"}
    assert update(str(state), pattern, str(out), **kw).action == "built"
    refs.update(_snapshots(tmp_path, layout, gen, (30,)))
    # SMA over the last 2: step 10 leaves, step 30 comes in (both read dequantized)
    assert update(str(state), pattern, str(out), **kw).action in ("updated", "recomputed")
    merged = _load(out)
    assert set(merged) == set(refs[10])
    for name in refs[10]:
        _close(merged[name], (refs[20][name] + refs[30][name]) / 2, name)


# -- refusals before work ----------------------------------------------------------------------

@pytest.mark.parametrize("qc, method", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "awq", "bits": 4}, "awq"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "hqq"}, "hqq"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, "pack-quantized"),
])
def test_unsupported_quantization_is_refused_by_name_before_any_output(
        qc: dict, method: str, tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    m = write_checkpoint(tmp_path / "m", {
        "model.layers.0.mlp.experts.0.up_proj.qweight": torch.randint(0, 2**31 - 1, (16, 8), generator=gen, dtype=torch.int32),
        "model.layers.0.mlp.experts.0.up_proj.scales": torch.randn(1, 8, generator=gen).half(),
        "model.norm.weight": torch.randn(8, generator=gen)},
        config={"model_type": "mixtral", "num_hidden_layers": 1, "quantization_config": qc})
    y = tmp_path / "m.yml"
    y.write_text(json.dumps({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1}},
                                                                  {"model": str(m), "parameters": {"weight": 1}}]}))
    out = tmp_path / "out"
    for args in (("plan", y), ("run", y, out)):
        code, _, err = run_cli(*args)
        assert code != 0 and method in err and "not supported" in err, err
    assert not out.exists()


def test_quantized_looking_integer_tensors_are_refused_unless_non_float_says_copy(
        tmp_path: Path, gen: torch.Generator) -> None:
    path, _ = LAYOUTS["mxfp4"](tmp_path / "m", gen)
    cfg_path = path / "config.json"
    doc = json.loads(cfg_path.read_text())
    del doc["quantization_config"]  # MXFP4 parts with no config: nothing says what they are
    cfg_path.write_text(json.dumps(doc))
    models = [{"model": str(path), "parameters": {"weight": 0.5}}] * 2
    with pytest.raises(CheckpointError, match=r"look quantized.*gate_up_proj_blocks.*non_float"):
        moemerge.plan({"merge_method": "linear", "models": models})
    with pytest.raises(CheckpointError, match="look quantized"):
        moemerge.run({"merge_method": "linear", "models": models}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    p = moemerge.plan({"merge_method": "linear", "models": models, "non_float": "equal"})
    assert any(t.name.endswith("_blocks") and t.method == "copy" for t in p.tensors)


def test_non_float_last_never_copies_mxfp4_parts(tmp_path: Path, gen: torch.Generator) -> None:
    a, ref_a = LAYOUTS["mxfp4"](tmp_path / "a", gen)
    b, ref_b = LAYOUTS["mxfp4"](tmp_path / "b", gen)
    cfg = {"merge_method": "linear", "non_float": "last", "quantize": "none",
           "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    p = moemerge.plan(cfg)
    assert not [t.name for t in p.tensors if t.method == "copy"]
    moemerge.run(cfg, str(tmp_path / "out"))
    merged = _load(tmp_path / "out")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    _close(merged[name], 0.5 * ref_a[name] + 0.5 * ref_b[name], name)


def test_compressed_tensors_codes_and_scales_are_never_averaged_apart(tmp_path: Path, gen: torch.Generator) -> None:
    a, _ = LAYOUTS["ct-channel"](tmp_path / "a", gen)
    p = moemerge.plan({"merge_method": "linear", "quantize": "none",
                       "models": [{"model": str(a), "parameters": {"weight": 1}}] * 2})
    names = {t.name for t in p.tensors}
    assert not {n for n in names if n.endswith(("_scale", "input_scale"))}
    w = next(t for t in p.tensors if t.name.endswith("experts.0.w1.weight"))
    assert w.in_dtypes == ("F32", "F32")  # the dequantized value, not the FP8 codes


def test_plan_says_which_inputs_are_quantized(tmp_path: Path, gen: torch.Generator, run_cli) -> None:
    a, _ = LAYOUTS["fp8-block-64"](tmp_path / "a", gen)
    b, _ = LAYOUTS["fp8-block-64"](tmp_path / "b", gen)
    y = tmp_path / "m.yml"
    y.write_text(json.dumps({"merge_method": "linear", "quantize": "none", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}]}))
    code, out, err = run_cli("plan", y)
    assert code == 0, err
    assert "stored quantized (fp8 64x64 blocks" in err, err
    assert err.count("stored quantized") == 2


# -- transformers loads the merge ----------------------------------------------------------------

def test_merged_mxfp4_gpt_oss_loads_in_transformers_with_finite_logits(tmp_path: Path, gen: torch.Generator) -> None:
    transformers = pytest.importorskip("transformers")
    a, _ = LAYOUTS["mxfp4"](tmp_path / "a", gen)
    b, _ = LAYOUTS["mxfp4"](tmp_path / "b", gen)
    out = tmp_path / "out"
    moemerge.run({"merge_method": "linear", "quantize": "none", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}, str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    merged = _load(out)
    got = dict(model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(got.detach(), merged["model.layers.0.mlp.experts.gate_up_proj"].float())
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, GPT_OSS_CONFIG["vocab_size"]) and bool(torch.isfinite(logits).all())


# -- memory ------------------------------------------------------------------------------------

def _big_fp8(path: Path, seed: int, rows: int = 16384, cols: int = 32768) -> Path:
    """One F8_E4M3 [rows, cols] tensor (512 MiB) + its 128 x 128 scales, streamed to disk."""
    path.mkdir(parents=True)
    scale = torch.rand(rows // 128, cols // 128, generator=torch.Generator().manual_seed(seed)) * 1e-3 + 1e-5
    header = {"w": {"dtype": "F8_E4M3", "shape": [rows, cols], "data_offsets": [0, rows * cols]},
              "w_scale_inv": {"dtype": "F32", "shape": list(scale.shape),
                              "data_offsets": [rows * cols, rows * cols + scale.numel() * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(0, rows, 1024):
            block = torch.randint(0, 256, (1024 * cols,), generator=g, dtype=torch.uint8)
            block[(block & 0x7F) == 0x7F] = 0x30  # no NaN codes
            f.write(block.numpy().tobytes())
        f.write(scale.numpy().tobytes())
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))
    return path


@pytest.mark.slow
def test_block_fp8_merge_of_a_512mib_tensor_stays_under_1gib(tmp_path: Path) -> None:
    from tests.test_memory import RSS_LIMIT, _run_child

    a, b = _big_fp8(tmp_path / "a", 1), _big_fp8(tmp_path / "b", 2)
    y = tmp_path / "m.yml"
    y.write_text(json.dumps({"merge_method": "linear", "quantize": "none", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    peak = _run_child("run", y, tmp_path / "out", "--memory-budget", "128MB", "--no-progress")
    print(f"peak RSS {peak / 2**20:.0f} MiB")
    assert peak < RSS_LIMIT
    # a few rows against the reference
    from safetensors import safe_open

    (shard,) = sorted((tmp_path / "out").glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as st:
        got = st.get_slice("w")[8190:8194].double()
    want = 0
    for p in (a, b):
        with safe_open(str(p / "model.safetensors"), framework="pt") as st:
            q = st.get_slice("w")[8190:8194].double()
            s = st.get_slice("w_scale_inv")[63:65].double()
        full = torch.cat([s[0:1].repeat_interleave(2, 0), s[1:2].repeat_interleave(2, 0)]).repeat_interleave(128, 1)
        want = want + 0.5 * q * full
    assert bool(((got - want).abs() <= want.abs() * 2 ** -8 + 1e-12).all())
