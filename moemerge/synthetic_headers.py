"""Headers-only checkpoints in the real DeepSeek-V3 (671B, block FP8) layout, for planning benchmarks.

Each shard holds a real safetensors header; its data region is a hole (the file is extended
with `truncate`), so 163 shards of a 688 GB model take a few megabytes of disk. Only headers,
the index and config.json can be read back meaningfully: `plan` and `inspect` work, a merge
would read zeros. Torch-free (plain Python), so it runs anywhere the benchmark does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from moemerge.io.dtypes import itemsize
from moemerge.io.safetensors_format import build_header

__all__ = ["DEEPSEEK_V3", "deepseek_v3_tensors", "write_headers_only"]

#: DeepSeek-V3's published dimensions (config.json of deepseek-ai/DeepSeek-V3): 61 layers (the
#: first 3 dense) plus the multi-token-prediction layer 61, 256 routed experts + 1 shared.
DEEPSEEK_V3: dict[str, int] = {
    "hidden": 7168, "layers": 61, "dense_layers": 3, "experts": 256, "moe_inter": 2048, "inter": 18432,
    "q_rank": 1536, "kv_rank": 512, "heads": 128, "nope": 128, "rope": 64, "v_dim": 128, "vocab": 129280,
    "shards": 163,
}
_BLOCK = 128  # weight_block_size [128, 128]: one F32 scale per 128 x 128 block


def _scaled(name: str, rows: int, cols: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """A block-FP8 linear weight and its `weight_scale_inv` (one per 128 x 128 block)."""
    yield name, "F8_E4M3", (rows, cols)
    yield name + "_scale_inv", "F32", (math.ceil(rows / _BLOCK), math.ceil(cols / _BLOCK))


def deepseek_v3_tensors(layers: int | None = None, experts: int | None = None,
                        dims: dict[str, int] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in the checkpoint's order; with the defaults the
    91,991 tensors of DeepSeek-V3. `layers` / `experts` shrink it for tests (the MTP layer
    stays the last one)."""
    d = {**DEEPSEEK_V3, **(dims or {})}
    n_layers = d["layers"] if layers is None else layers
    n_exp = d["experts"] if experts is None else experts
    h, qk = d["hidden"], d["nope"] + d["rope"]
    out: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "BF16", (d["vocab"], h))]
    for li in range(n_layers + 1):  # + the MTP layer
        p = f"model.layers.{li}"
        out += [(f"{p}.input_layernorm.weight", "BF16", (h,)), (f"{p}.post_attention_layernorm.weight", "BF16", (h,))]
        a = f"{p}.self_attn"
        out += _scaled(f"{a}.q_a_proj.weight", d["q_rank"], h)
        out.append((f"{a}.q_a_layernorm.weight", "BF16", (d["q_rank"],)))
        out += _scaled(f"{a}.q_b_proj.weight", d["heads"] * qk, d["q_rank"])
        out += _scaled(f"{a}.kv_a_proj_with_mqa.weight", d["kv_rank"] + d["rope"], h)
        out.append((f"{a}.kv_a_layernorm.weight", "BF16", (d["kv_rank"],)))
        out += _scaled(f"{a}.kv_b_proj.weight", d["heads"] * (d["nope"] + d["v_dim"]), d["kv_rank"])
        out += _scaled(f"{a}.o_proj.weight", h, d["heads"] * d["v_dim"])
        if li < d["dense_layers"]:
            out += _mlp(f"{p}.mlp", h, d["inter"])
        else:
            out += [(f"{p}.mlp.gate.weight", "BF16", (n_exp, h)),
                    (f"{p}.mlp.gate.e_score_correction_bias", "F32", (n_exp,))]
            for e in range(n_exp):
                out += _mlp(f"{p}.mlp.experts.{e}", h, d["moe_inter"])
            out += _mlp(f"{p}.mlp.shared_experts", h, d["moe_inter"])
        if li == n_layers:  # multi-token prediction: its own embedding, norms, projection and head
            out += [(f"{p}.embed_tokens.weight", "BF16", (d["vocab"], h)), (f"{p}.enorm.weight", "BF16", (h,)),
                    (f"{p}.hnorm.weight", "BF16", (h,))]
            out += [(f"{p}.eh_proj.weight", "BF16", (h, 2 * h)), (f"{p}.shared_head.norm.weight", "BF16", (h,)),
                    (f"{p}.shared_head.head.weight", "BF16", (d["vocab"], h))]
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (d["vocab"], h))]
    return out


def _mlp(p: str, h: int, inter: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    yield from _scaled(f"{p}.gate_proj.weight", inter, h)
    yield from _scaled(f"{p}.up_proj.weight", inter, h)
    yield from _scaled(f"{p}.down_proj.weight", h, inter)


def _config(layers: int, experts: int, d: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": d["hidden"],
        "num_hidden_layers": layers, "first_k_dense_replace": d["dense_layers"], "n_routed_experts": experts,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": d["moe_inter"],
        "intermediate_size": d["inter"], "q_lora_rank": d["q_rank"], "kv_lora_rank": d["kv_rank"],
        "num_attention_heads": d["heads"], "qk_nope_head_dim": d["nope"], "qk_rope_head_dim": d["rope"],
        "v_head_dim": d["v_dim"], "vocab_size": d["vocab"], "num_nextn_predict_layers": 1,
        "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [_BLOCK, _BLOCK]},
    }


def write_headers_only(out: str | Path, *, layers: int | None = None, experts: int | None = None,
                       shards: int | None = None, metadata: dict[str, str] | None = None) -> int:
    """Write a DeepSeek-V3-layout checkpoint to `out` (created): shards of real headers with
    their data regions left as holes, the index and config.json. Returns the tensor count.

    Tensors are cut into `shards` files of about equal bytes, in checkpoint order, as the
    published checkpoint is. `metadata` goes into every header's `__metadata__` (beside
    format: pt): different metadata makes inputs whose headers differ byte for byte."""
    d = DEEPSEEK_V3
    n_layers = d["layers"] if layers is None else layers
    n_exp = d["experts"] if experts is None else experts
    tensors = deepseek_v3_tensors(n_layers, n_exp)
    n_shards = min(len(tensors), d["shards"] if shards is None else shards)
    total = sum(math.prod(s) * itemsize(t) for _, t, s in tensors)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[] for _ in range(n_shards)]
    pos = 0
    for t in tensors:  # the shard whose share of the bytes this tensor starts in
        groups[min(pos * n_shards // max(1, total), n_shards - 1)].append(t)
        pos += math.prod(t[2]) * itemsize(t[1])
    groups = [g for g in groups if g]  # a tiny test layout may leave some empty
    n_shards = len(groups)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{n_shards:06d}.safetensors"
        header, _ = build_header(group, {"format": "pt", **(metadata or {})})
        size = len(header) + sum(math.prod(s) * itemsize(t) for _, t, s in group)
        with open(root / fname, "wb") as f:
            f.write(header)
            f.truncate(size)  # the data region is a hole: no disk blocks
        weight_map.update((name, fname) for name, _, _ in group)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps(_config(n_layers, n_exp, d), indent=2))
    return len(tensors)
