"""FP8 block-scaled inputs (DeepSeek-V3 layout) are dequantized on read (served as float32,
`io.quant`) and merged; bf16 out by default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moemerge
from moemerge.errors import CheckpointError, PlanError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.quant import dequantizing
from tests.conftest import write_checkpoint

FP8_MAX = 448.0  # largest float8_e4m3fn
BLOCK = 128  # DeepSeek-V3 tiles


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv per 128x128 tile) as DeepSeek-V3 stores them."""
    r, c = w.shape
    tr, tc = -(-r // BLOCK), -(-c // BLOCK)
    scale = torch.empty(tr, tc, dtype=torch.float32)
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    for i in range(tr):
        for j in range(tc):
            tile = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def dequant_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64, whole tensor: each element times its tile's scale."""
    full = scale.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:q.shape[0], :q.shape[1]]
    return q.double() * full


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _fp8_model(path: Path, gen: torch.Generator) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, shape in (("model.layers.0.mlp.experts.0.up_proj.weight", (300, 200)),  # ragged tiles
                        ("model.layers.0.self_attn.q_proj.weight", (256, 128))):
        q, s = quantize(torch.randn(*shape, generator=gen) * 0.05)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        ref[name] = dequant_reference(q, s)
    norm = torch.randn(200, generator=gen).to(torch.bfloat16)
    tensors["model.norm.weight"] = norm
    ref["model.norm.weight"] = norm.double()
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 1, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    return write_checkpoint(path, tensors, config=cfg), ref


def test_reads_are_dequantized_exactly_for_any_row_range(tmp_path: Path, gen: torch.Generator) -> None:
    path, ref = _fp8_model(tmp_path / "m", gen)
    ck = dequantizing(Checkpoint.open(str(path)))
    try:
        assert not any(n.endswith("_scale_inv") for n in ck.tensors)
        name = "model.layers.0.mlp.experts.0.up_proj.weight"
        t = ck.tensors[name]
        assert (t.dtype, t.shape) == ("F32", (300, 200))
        want = ref[name].float()  # one rounding of the exact product
        for r0, r1 in ((0, 300), (0, 1), (127, 129), (100, 300), (255, 256), (299, 300), (5, 133)):
            buf = bytearray((r1 - r0) * t.row_bytes + 7)
            ck.read_rows(name, r0, r1, memoryview(buf))
            got = torch.frombuffer(buf, dtype=torch.float32, count=(r1 - r0) * 200).reshape(r1 - r0, 200)
            assert torch.equal(got, want[r0:r1]), (r0, r1)
    finally:
        ck.close()


def test_merge_of_fp8_and_bf16_checkpoints_matches_float64(tmp_path: Path, gen: torch.Generator) -> None:
    a, ref_a = _fp8_model(tmp_path / "a", gen)
    b_tensors = {n: (v + 0.01 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(torch.bfloat16)
                 for n, v in ref_a.items()}
    b = write_checkpoint(tmp_path / "b", b_tensors, config=json.loads((a / "config.json").read_text()))
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                                {"model": str(b), "parameters": {"weight": 0.7}}]}
    outs = {}
    for rows in (7, None):  # chunk invariance across tile boundaries
        res = moemerge.run(cfg, str(tmp_path / f"out{rows}"), memory_budget="1MB", chunk_rows=rows)
        outs[rows] = res.checksums
        merged = {k: v for f in sorted((tmp_path / f"out{rows}").glob("*.safetensors"))
                  for k, v in load_file(str(f)).items()}
        assert set(merged) == set(ref_a)  # the scales are not in the output
        for name, ra in ref_a.items():
            want = 0.3 * ra + 0.7 * b_tensors[name].double()
            assert merged[name].dtype == torch.bfloat16
            torch.testing.assert_close(merged[name].double(), want, rtol=2 ** -8, atol=1e-6)
        out_cfg = json.loads((tmp_path / f"out{rows}" / "config.json").read_text())
        assert "quantization_config" not in out_cfg and out_cfg["torch_dtype"] == "bfloat16"
    assert outs[7] == outs[None]


def test_bad_block_scales_are_reported_before_work(tmp_path: Path, gen: torch.Generator) -> None:
    q, s = quantize(torch.randn(256, 128, generator=gen))
    bad = write_checkpoint(tmp_path / "bad", {"w": q, "w_scale_inv": s[:1]})
    with pytest.raises(CheckpointError, match=r"w_scale_inv.*must be F32 \[2, 1\]"):
        moemerge.plan({"merge_method": "linear", "models": [{"model": str(bad), "parameters": {"weight": 1}}]})
    orphan = write_checkpoint(tmp_path / "orphan", {"w": torch.randn(4, 4), "w_scale_inv": torch.ones(1, 1)})
    with pytest.raises(PlanError, match="block scale without its FP8 weight"):
        moemerge.plan({"merge_method": "linear", "models": [{"model": str(orphan), "parameters": {"weight": 1}}]})
