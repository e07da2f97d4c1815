"""Tiny quantized MoE checkpoints, one per published layout, built from random weights.

Each builder writes a checkpoint with the config.json `quantization_config` transformers
expects and returns (path, reference): the reference maps every logical tensor name to its
float64 dequantized value, computed here independently of `moemerge.io.quant` (from the
formats' specs; MXFP4 through transformers' own `convert_moe_packed_tensors`).

    path, ref = LAYOUTS["mxfp4"](tmp_path / "m", gen)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from tests.conftest import write_checkpoint

__all__ = ["LAYOUTS", "block_fp8_model", "mxfp4_model", "channel_fp8_model", "fp8_block_quantize",
           "fp8_block_quantize_ue8m0", "mxfp4_quantize", "mxfp4_dequantize", "GPT_OSS_CONFIG", "UE8M0_CONFIG"]

FP8_MAX = 448.0
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


# -- independent quantizers / dequantizers (spec text, formats.md) ------------------------------

def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [R, C], float32 scale_inv [ceil(R/bR), ceil(C/bC)]): scale = amax / 448 per tile."""
    br, bc = block
    r, c = w.shape
    tr, tc = -(-r // br), -(-c // bc)
    scale = torch.empty(tr, tc, dtype=torch.float32)
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    for i in range(tr):
        for j in range(tc):
            tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            s = tile.abs().max() / FP8_MAX
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (tile / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_block_quantize_ue8m0(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3.1 `scale_fmt: ue8m0`: as `fp8_block_quantize`, the scale a power of two,
    2^ceil(log2(amax / 448)) (DeepSeek's `fast_round_scale`), so no code exceeds 448."""
    br, bc = block
    r, c = w.shape
    tr, tc = -(-r // br), -(-c // bc)
    scale = torch.empty(tr, tc, dtype=torch.float32)
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    for i in range(tr):
        for j in range(tc):
            tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].double()
            amax = float(tile.abs().max())
            s = 2.0 ** math.ceil(math.log2(amax / FP8_MAX)) if amax > 0 else 1.0
            scale[i, j] = s
            assert float((tile / s).abs().max()) <= FP8_MAX
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    full = scale.double().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:q.shape[0], :q.shape[1]]
    return q.double() * full


def fp8_channel_quantize(w: torch.Tensor, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [R, C], float32 weight_scale [R, 1] or [1])."""
    amax = w.float().abs().amax() if per_tensor else w.float().abs().amax(dim=1, keepdim=True)
    s = amax / FP8_MAX
    q = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, (s.reshape(1) if per_tensor else s)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical [E, K, N] -> (blocks U8 [E, N, K/32, 16], scales U8 [E, N, K/32]), gpt-oss layout."""
    e, k, n = w.shape
    v = w.double().transpose(1, 2).reshape(e, n, k // 32, 32)
    amax = v.abs().amax(-1)
    exps = torch.tensor([[[math.ceil(math.log2(a / 6.0)) if a > 0 else -127 for a in row] for row in ex]
                         for ex in amax.tolist()], dtype=torch.float64)
    x = v / torch.pow(2.0, exps).unsqueeze(-1)
    table = torch.tensor(FP4[:8], dtype=torch.float64)
    mag = (x.abs().unsqueeze(-1) - table).abs().argmin(-1)  # nearest value (random data: no ties)
    codes = (mag | ((x < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exps + 127).to(torch.uint8)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 [E, K, N] by transformers' own dequantizer (the reference the issue names)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).double()


# -- checkpoints -----------------------------------------------------------------------------

def _bf16(gen: torch.Generator, *shape: int, scale: float = 0.05) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


#: DeepSeek-V3.1's quantization_config: block FP8 whose F32 scales are powers of two.
UE8M0_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128]}


def block_fp8_model(path: Path, gen: torch.Generator, *, block: tuple[int, int] = (128, 128),
                    with_config: bool = True, ue8m0: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """DeepSeek-V3-style: FP8 attention + experts (one 200 x 300, ragged tiles), bf16 rest;
    `ue8m0`: DeepSeek-V3.1's power-of-two scales and `scale_fmt: ue8m0` in the config."""
    tensors: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    quantized = {"model.layers.0.self_attn.q_proj.weight": (256, 128),
                 "model.layers.0.mlp.experts.0.up_proj.weight": (200, 300),
                 "model.layers.0.mlp.experts.1.up_proj.weight": (200, 300),
                 "model.layers.0.mlp.experts.0.down_proj.weight": (300, 200)}
    for name, shape in quantized.items():
        quantize = fp8_block_quantize_ue8m0 if ue8m0 else fp8_block_quantize
        q, s = quantize(torch.randn(*shape, generator=gen) * 0.05, block)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        ref[name] = fp8_block_dequantize(q, s, block)
    plain = {"model.embed_tokens.weight": _bf16(gen, 64, 128), "model.norm.weight": _bf16(gen, 128, scale=1.0),
             "model.layers.0.mlp.gate.weight": _bf16(gen, 2, 300),
             "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(2, generator=gen)}
    tensors.update(plain)
    ref.update({k: v.double() for k, v in plain.items()})
    cfg: dict = {"model_type": "deepseek_v3", "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    if with_config:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}
        if ue8m0:
            cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    return write_checkpoint(path, tensors, config=cfg, shards=2), ref


#: A tiny gpt-oss (transformers' GptOssConfig fields): 4 experts, hidden 64, intermediate 64.
GPT_OSS_CONFIG = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 1,
    "hidden_size": 64, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
    "experts_per_token": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
    "vocab_size": 96, "max_position_embeddings": 128, "sliding_window": 32, "layer_types": ["full_attention"],
    "rope_theta": 150000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}


def _gpt_oss_shapes() -> dict[str, tuple[int, ...]]:
    c = GPT_OSS_CONFIG
    h, i, e, v = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    nh, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (nh * hd, h), p + "self_attn.q_proj.bias": (nh * hd,),
        p + "self_attn.k_proj.weight": (kv * hd, h), p + "self_attn.k_proj.bias": (kv * hd,),
        p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.v_proj.bias": (kv * hd,),
        p + "self_attn.o_proj.weight": (h, nh * hd), p + "self_attn.o_proj.bias": (h,),
        p + "self_attn.sinks": (nh,),
        p + "mlp.router.weight": (e, h), p + "mlp.router.bias": (e,),
        p + "mlp.experts.gate_up_proj": (e, h, 2 * i), p + "mlp.experts.gate_up_proj_bias": (e, 2 * i),
        p + "mlp.experts.down_proj": (e, i, h), p + "mlp.experts.down_proj_bias": (e, h),
    }


def mxfp4_model(path: Path, gen: torch.Generator) -> tuple[Path, dict[str, torch.Tensor]]:
    """gpt-oss MXFP4: fused experts as `_blocks` + `_scales`, everything else bf16."""
    tensors: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, shape in _gpt_oss_shapes().items():
        if name.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = mxfp4_quantize(torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.05)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            ref[name] = mxfp4_dequantize(blocks, scales)
        else:
            t = _bf16(gen, *shape, scale=1.0 if "norm" in name else 0.05)
            tensors[name] = t
            ref[name] = t.double()
    return write_checkpoint(path, tensors, config=dict(GPT_OSS_CONFIG), shards=2), ref


def channel_fp8_model(path: Path, gen: torch.Generator, *, method: str = "compressed-tensors",
                      per_tensor: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """Mixtral-style names; FP8 Linear weights with per-channel (or per-tensor) `weight_scale`,
    compressed-tensors with `input_scale` beside each; router, norms, embeddings bf16."""
    tensors: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    p = "model.layers.0."
    quantized = {p + "self_attn.q_proj.weight": (64, 96),
                 p + "block_sparse_moe.experts.0.w1.weight": (80, 96),
                 p + "block_sparse_moe.experts.1.w1.weight": (80, 96),
                 p + "block_sparse_moe.experts.0.w2.weight": (96, 80)}
    for name, shape in quantized.items():
        q, s = fp8_channel_quantize(torch.randn(*shape, generator=gen) * 0.05, per_tensor)
        tensors[name], tensors[name + "_scale"] = q, s
        if method == "compressed-tensors":
            tensors[name[: -len("weight")] + "input_scale"] = torch.rand(1, generator=gen) + 0.01
        ref[name] = q.double() * s.double()
    plain = {"model.embed_tokens.weight": _bf16(gen, 32, 96), "model.norm.weight": _bf16(gen, 96, scale=1.0),
             p + "block_sparse_moe.gate.weight": _bf16(gen, 2, 96), "lm_head.weight": _bf16(gen, 32, 96)}
    tensors.update(plain)
    ref.update({k: v.double() for k, v in plain.items()})
    if method == "compressed-tensors":
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                              "strategy": "tensor" if per_tensor else "channel"},
                  "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                        "strategy": "tensor"}}},
              "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"]}
    else:
        qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
              "modules_to_not_convert": ["lm_head", "block_sparse_moe.gate"]}
    cfg = {"model_type": "mixtral", "num_hidden_layers": 1, "torch_dtype": "bfloat16", "quantization_config": qc}
    return write_checkpoint(path, tensors, config=cfg), ref


Builder = Callable[[Path, torch.Generator], tuple[Path, dict[str, torch.Tensor]]]

#: Every layout the issue names: layout id -> builder(path, generator) -> (path, float64 reference).
LAYOUTS: dict[str, Builder] = {
    "fp8-block-128": lambda p, g: block_fp8_model(p, g, block=(128, 128)),
    "fp8-block-64": lambda p, g: block_fp8_model(p, g, block=(64, 64)),
    "fp8-no-config": lambda p, g: block_fp8_model(p, g, with_config=False),
    "fp8-ue8m0": lambda p, g: block_fp8_model(p, g, ue8m0=True),
    "mxfp4": mxfp4_model,
    "ct-channel": lambda p, g: channel_fp8_model(p, g, per_tensor=False),
    "ct-tensor": lambda p, g: channel_fp8_model(p, g, per_tensor=True),
    "fbgemm": lambda p, g: channel_fp8_model(p, g, method="fbgemm_fp8"),
}


def tiny_qwen3_moe(path: Path, seed: int, layers: int = 2) -> Path:
    """A tiny random Qwen3-MoE saved by transformers in bf16 (for load-and-run checks of outputs)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    # 128-multiples: transformers' CPU FP8 dequantizer derives the tile from rows // scale rows,
    # so a ragged tile grid (the fixtures above) would be misread by it, not by us
    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    model.to(torch.bfloat16).save_pretrained(path)
    return path
