"""Seeded synthetic checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V3, fused Llama 4, dense Llama).

Any size from kilobytes to tens of GB, streamed to disk chunk by chunk, so the demo, tests and
benchmarks never hold a tensor, shard or model in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from dataclasses import fields as fields_of
from pathlib import Path
from typing import Any, Literal

import torch

from moemerge.errors import ConfigError, OutputError
from moemerge.io.dtypes import itemsize, to_torch
from moemerge.io.safetensors_format import build_header

__all__ = ["FAMILIES", "CheckpointSpec", "SyntheticTensor", "make_checkpoint", "make_family",
           "make_single_tensor_checkpoint"]

Family = Literal["mixtral", "qwen3_moe", "deepseek", "fused", "dense"]
FAMILIES: tuple[str, ...] = ("mixtral", "qwen3_moe", "deepseek", "fused", "dense")

#: Values are drawn in fixed blocks of 2**20 elements, each from its own generator seeded by
#: (seed, tensor name, block index): the bytes never depend on the chunk size used to write.
BLOCK = 1 << 20
#: Bytes written per write call; bounds the memory of the generator (plus one block).
DEFAULT_CHUNK_BYTES = 16 << 20
#: kind -> (mean, std) of the base values: linear weights ~N(0, 0.02) like common inits; norm
#: weights around 1.0 with a spread wide enough that fine-tune deltas survive bf16 rounding.
_KINDS = {"linear": (0.0, 0.02), "norm": (1.0, 0.1)}
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True, kw_only=True, slots=True)
class SyntheticTensor:
    """One tensor to generate: its on-disk name, dtype, shape and value distribution."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: Literal["linear", "norm"] = "linear"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointSpec:
    """The architecture and layout of a synthetic checkpoint."""

    family: Family = "mixtral"
    layers: int = 2
    """Decoder layers (deepseek's first one is dense, so it needs at least 2)."""
    hidden: int = 64
    intermediate: int = 128
    """Per-expert FFN width (also the dense MLP and shared-expert width)."""
    experts: int = 4
    top_k: int = 2
    """Experts routed per token (written to config.json)."""
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2
    dtype: Literal["BF16", "F16", "F32"] = "BF16"
    shard_size: int = 5 * 10**9
    """Bytes per shard; a tensor larger than this gets a shard of its own."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family: unknown {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.dtype not in _TORCH_NAMES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(_TORCH_NAMES)}")
        for field in ("layers", "hidden", "intermediate", "experts", "top_k", "vocab", "heads",
                      "kv_heads", "shard_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field}: must be at least 1, got {getattr(self, field)}")
        if self.hidden % (2 * self.heads) or self.heads % self.kv_heads:
            raise ConfigError(
                f"hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads}: hidden must be a "
                "multiple of 2*heads (even rotary head_dim) and heads a multiple of kv_heads"
            )
        if self.top_k > self.experts:
            raise ConfigError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.family == "deepseek" and (self.layers < 2 or self.hidden % 4):
            raise ConfigError(
                "deepseek: needs layers >= 2 (layer 0 is dense) and hidden a multiple of 4"
            )

    @classmethod
    def sized(cls, target_bytes: int, **fields: Any) -> CheckpointSpec:
        """A spec whose hidden/intermediate (same ratio as given) land nearest `target_bytes`.

        Example: `CheckpointSpec.sized(2 * 10**9, family="mixtral", layers=8)` -> hidden 2152.
        Tiny targets bottom out at the smallest valid hidden (the embeddings dominate).
        """
        args = {**{f.name: f.default for f in fields_of(cls)}, **fields}
        ratio = args.pop("intermediate") / args.pop("hidden")
        step = math.lcm(2 * args["heads"], 4)  # head_dim even; deepseek's kv rank is hidden / 4

        def at(k: int) -> CheckpointSpec:
            h = k * step
            return cls(**args, hidden=h, intermediate=max(1, round(ratio * h)))

        lo, hi = 1, 2
        while at(hi).total_bytes < target_bytes:  # total_bytes grows with hidden
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid).total_bytes < target_bytes else (lo, mid)
        return min(at(lo), at(hi), key=lambda s: abs(s.total_bytes - target_bytes))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mla_dims(self) -> tuple[int, int, int]:
        """DeepSeek's (q_lora_rank, kv_lora_rank, qk_rope_head_dim): V3's ratios, scaled down."""
        return self.hidden // 2, self.hidden // 4, max(2, self.head_dim // 4 * 2)  # rotary: even

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[SyntheticTensor]:
        """Every tensor in file order, named as on disk (formats.md, "MoE tensor naming")."""
        H, I, E, d, hd = self.hidden, self.intermediate, self.experts, self.dtype, self.head_dim
        out: list[SyntheticTensor] = []

        def add(name: str, *shape: int, kind: Any = "linear", dtype: str = d) -> None:
            out.append(SyntheticTensor(name=name, dtype=dtype, shape=shape, kind=kind))

        def mlp(prefix: str, width: int) -> None:
            add(f"{prefix}.gate_proj.weight", width, H)
            add(f"{prefix}.up_proj.weight", width, H)
            add(f"{prefix}.down_proj.weight", H, width)

        add("model.embed_tokens.weight", self.vocab, H)
        for L in range(self.layers):
            p = f"model.layers.{L}"
            if self.family == "deepseek":
                q_rank, kv_rank, rope = self.mla_dims
                add(f"{p}.self_attn.q_a_proj.weight", q_rank, H)
                add(f"{p}.self_attn.q_a_layernorm.weight", q_rank, kind="norm")
                add(f"{p}.self_attn.q_b_proj.weight", self.heads * (hd + rope), q_rank)
                add(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv_rank + rope, H)
                add(f"{p}.self_attn.kv_a_layernorm.weight", kv_rank, kind="norm")
                add(f"{p}.self_attn.kv_b_proj.weight", self.heads * 2 * hd, kv_rank)
            else:
                add(f"{p}.self_attn.q_proj.weight", self.heads * hd, H)
                add(f"{p}.self_attn.k_proj.weight", self.kv_heads * hd, H)
                add(f"{p}.self_attn.v_proj.weight", self.kv_heads * hd, H)
            add(f"{p}.self_attn.o_proj.weight", H, self.heads * hd)
            if self.family == "qwen3_moe":
                add(f"{p}.self_attn.q_norm.weight", hd, kind="norm")
                add(f"{p}.self_attn.k_norm.weight", hd, kind="norm")
            add(f"{p}.input_layernorm.weight", H, kind="norm")
            add(f"{p}.post_attention_layernorm.weight", H, kind="norm")
            if self.family == "mixtral":
                add(f"{p}.block_sparse_moe.gate.weight", E, H)
                for e in range(E):  # w1 gate, w3 up, w2 down
                    q = f"{p}.block_sparse_moe.experts.{e}"
                    add(f"{q}.w1.weight", I, H)
                    add(f"{q}.w2.weight", H, I)
                    add(f"{q}.w3.weight", I, H)
            elif self.family == "fused":
                add(f"{p}.feed_forward.router.weight", E, H)
                add(f"{p}.feed_forward.experts.gate_up_proj", E, H, 2 * I)
                add(f"{p}.feed_forward.experts.down_proj", E, I, H)
                mlp(f"{p}.feed_forward.shared_expert", I)
            elif self.family == "dense" or (self.family == "deepseek" and L == 0):
                mlp(f"{p}.mlp", I)
            else:  # qwen3_moe, deepseek
                add(f"{p}.mlp.gate.weight", E, H)
                if self.family == "deepseek":
                    add(f"{p}.mlp.gate.e_score_correction_bias", E, dtype="F32")
                for e in range(E):
                    mlp(f"{p}.mlp.experts.{e}", I)
                if self.family == "deepseek":
                    mlp(f"{p}.mlp.shared_experts", I)
        add("model.norm.weight", H, kind="norm")
        add("lm_head.weight", self.vocab, H)
        return out

    def config(self) -> dict[str, Any]:
        """config.json as hub checkpoints write it; transformers 5 loads every family's."""
        E, I, dt = self.experts, self.intermediate, _TORCH_NAMES[self.dtype]
        cfg: dict[str, Any] = {
            "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": I,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "torch_dtype": dt, "dtype": dt,  # transformers 4 reads the first, 5 the second
        }
        if self.family != "dense":
            cfg["num_experts_per_tok"] = self.top_k
        q_rank, kv_rank, rope = self.mla_dims
        families: dict[str, tuple[str, dict[str, Any]]] = {
            "dense": ("LlamaForCausalLM", {"model_type": "llama"}),
            "mixtral": ("MixtralForCausalLM", {"model_type": "mixtral", "num_local_experts": E}),
            "qwen3_moe": ("Qwen3MoeForCausalLM", {
                "model_type": "qwen3_moe", "num_experts": E, "moe_intermediate_size": I,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}),
            "deepseek": ("DeepseekV3ForCausalLM", {
                "model_type": "deepseek_v3", "n_routed_experts": E, "n_shared_experts": 1,
                "moe_intermediate_size": I, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                "q_lora_rank": q_rank, "kv_lora_rank": kv_rank, "qk_rope_head_dim": rope,
                "qk_nope_head_dim": self.head_dim, "v_head_dim": self.head_dim,
                "num_key_value_heads": self.heads}),
            "fused": ("Llama4ForCausalLM", {
                "model_type": "llama4_text", "num_local_experts": E, "intermediate_size_mlp": I,
                "interleave_moe_layer_step": 1}),
        }
        arch, extra = families[self.family]
        cfg.update(extra, architectures=[arch])
        if self.family == "deepseek":
            # transformers sizes the rotary embedding by head_dim, which for MLA must be the rope
            # part; with the key absent DeepseekV3Config derives it (real V3 configs omit it too).
            del cfg["head_dim"]
        return cfg


def _block_seed(role: str, seed: int, name: str, block: int) -> int:
    # A stable hash (Python's hash() is salted per process) of everything that names a block.
    digest = hashlib.blake2b(f"{role}\0{seed}\0{name}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any manual_seed accepts it


class _Values:
    """The values of one tensor by element range, drawn block by block (one block cached)."""

    def __init__(self, t: SyntheticTensor, seed: int, base_seed: int | None, delta_scale: float) -> None:
        self.t, self.numel = t, math.prod(t.shape)
        self.seed, self.base_seed, self.delta_scale = seed, base_seed, delta_scale
        self._cached: tuple[int, torch.Tensor] | None = None

    def _randn(self, role: str, seed: int, b: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_block_seed(role, seed, self.t.name, b))
        return torch.randn(n, generator=g)

    def _block(self, b: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != b:
            n = min(BLOCK, self.numel - b * BLOCK)
            mean, std = _KINDS[self.t.kind]
            if self.base_seed is None:  # a model of its own: just the base draw
                x = self._randn("base", self.seed, b, n)
            else:  # a fine-tune: shared base + small per-model delta
                x = self._randn("base", self.base_seed, b, n)
                x.add_(self._randn("delta", self.seed, b, n), alpha=self.delta_scale)
            self._cached = (b, x.mul_(std).add_(mean))
        return self._cached[1]

    def range(self, e0: int, e1: int) -> torch.Tensor:
        """Elements [e0, e1) in the tensor's dtype (cast per block: no float32 copy of a chunk)."""
        out = torch.empty(e1 - e0, dtype=to_torch(self.t.dtype))
        for b in range(e0 // BLOCK, (e1 - 1) // BLOCK + 1):
            lo, hi = max(e0, b * BLOCK), min(e1, (b + 1) * BLOCK)
            out[lo - e0 : hi - e0] = self._block(b)[lo - b * BLOCK : hi - b * BLOCK]
        return out


def _write_shard(path: Path, tensors: list[SyntheticTensor], chunk_bytes: int, **values: Any) -> None:
    header, offsets = build_header([(t.name, t.dtype, t.shape) for t in tensors], {"format": "pt"})
    partial = path.with_name(path.name + ".partial")  # a killed run leaves no finished-looking shard
    with open(partial, "wb") as f:
        f.write(header)
        for t in tensors:
            assert f.tell() == offsets[t.name], f"{t.name}: layout drift"
            src, per = _Values(t, **values), max(1, chunk_bytes // itemsize(t.dtype))
            for e0 in range(0, src.numel, per):
                f.write(src.range(e0, min(e0 + per, src.numel)).view(torch.uint8).numpy().data)
    os.replace(partial, path)


def _prepare_dir(path: Path, overwrite: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    old = [p for p in path.iterdir() if p.name.endswith((".safetensors", ".index.json", ".partial"))]
    if old and not overwrite:
        raise OutputError(
            f"{path}: already holds {old[0].name}; pick an empty directory or pass overwrite=True"
        )
    for p in old:
        p.unlink()


def _write_weights(
    path: Path, tensors: list[SyntheticTensor], shard_size: int, chunk_bytes: int, **values: Any
) -> None:
    shards: list[list[SyntheticTensor]] = [[]]
    filled = 0
    for t in tensors:  # greedy in file order, like transformers' save_pretrained
        if shards[-1] and filled + t.nbytes > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(t)
        filled += t.nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if n == 1:
        names = ["model.safetensors"]
    for name, group in zip(names, shards):
        _write_shard(path / name, group, chunk_bytes, **values)
    if n > 1:  # the index goes last: a directory without it is visibly unfinished
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, group in zip(names, shards) for t in group},
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_checkpoint(
    path: str | os.PathLike[str],
    spec: CheckpointSpec | None = None,
    *,
    seed: int = 0,
    base_seed: int | None = None,
    delta_scale: float = 0.1,
    target_bytes: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    **fields: Any,
) -> Path:
    """Write a model directory: weights, config.json, generation_config.json, tokenizer_config.json.

    Values are `mean + std * (base(base_seed) + delta_scale * delta(seed))` with (mean, std) =
    (0, 0.02) for linear weights and (1, 0.1) for norms, or `mean + std * base(seed)` when
    `base_seed` is None; base and delta are N(0, 1) draws. `fields` are CheckpointSpec fields
    (`family="qwen3_moe", layers=4`); `target_bytes` picks hidden/intermediate to match a size.

    Example: `make_checkpoint(tmp / "m", family="dense", seed=1)` -> `tmp / "m"`.
    """
    if spec is None:
        spec = CheckpointSpec.sized(target_bytes, **fields) if target_bytes else CheckpointSpec(**fields)
    elif fields or target_bytes:
        raise ConfigError("make_checkpoint: give either spec or spec fields/target_bytes, not both")
    out = Path(path)
    _prepare_dir(out, overwrite)
    _write_weights(out, spec.tensors(), spec.shard_size, chunk_bytes,
                   seed=seed, base_seed=base_seed, delta_scale=delta_scale)
    (out / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # Different per model, so tests can tell which model's tokenizer files were copied.
    tok = {"name_or_path": f"synthetic-{spec.family}-seed{seed}", "bos_token": "<s>",
           "eos_token": "</s>", "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    return out


def make_family(
    root: str | os.PathLike[str],
    n: int,
    base_seed: int = 0,
    *,
    with_base: bool = False,
    **kwargs: Any,
) -> list[Path]:
    """Write n fine-tunes of one base as `root/model_0 .. model_{n-1}` and return their paths.

    Model i uses seed `base_seed + 1 + i` for its delta (deltas and bases draw from separate
    streams, so seeds never collide). `with_base` also writes the base itself to `root/base`
    (not in the returned list). `kwargs` go to `make_checkpoint`.
    """
    if n < 1:
        raise ConfigError(f"make_family: n must be at least 1, got {n}")
    root = Path(root)
    if with_base:
        make_checkpoint(root / "base", seed=base_seed, **kwargs)
    return [
        make_checkpoint(root / f"model_{i}", seed=base_seed + 1 + i, base_seed=base_seed, **kwargs)
        for i in range(n)
    ]


def make_single_tensor_checkpoint(
    path: str | os.PathLike[str],
    name: str = "weight",
    shape: tuple[int, ...] = (16384, 16384),
    dtype: str = "BF16",
    seed: int = 0,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `path/model.safetensors` holding one ~N(0, 0.02) tensor (default 512 MiB), streamed."""
    if dtype not in _TORCH_NAMES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(_TORCH_NAMES)}")
    out = Path(path)
    _prepare_dir(out, overwrite)
    t = SyntheticTensor(name=name, dtype=dtype, shape=tuple(shape))
    _write_weights(out, [t], t.nbytes + 1, chunk_bytes, seed=seed, base_seed=None, delta_scale=0.0)
    return out
