"""MXFP4 fused experts (gpt-oss), as `transformers/integrations/mxfp4.py` lays them out.

`P_blocks` U8 [E, N, K/32, 16] + `P_scales` U8 [E, N, K/32] store the logical parameter `P`
[E, K, N] (`mlp.experts.gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]: the names and shapes
transformers' GptOss model loads unquantized). Each block is 32 FP4 (e2m1) codes along K, two
per byte, low nibble first; the scale byte is E8M0: value = FP4 value * 2^(scale - 127). The
dequantized [E, N, K] is transposed to [E, K, N] (`_convert_moe_packed_tensors`).

A logical row (e, k) gathers column k of expert e's stored [N, K]: it needs the whole expert, so
chunks hold whole experts (`row_align` = K) and the transpose is done per chunk, in memory.
Values have at most 2 significant bits times a power of two: served as BF16, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import TensorInfo
from moemerge.io.quant.base import Codec, Part, QuantScheme, QuantSpec

__all__ = ["MXFP4", "FP4_VALUES"]

#: e2m1 code -> value (OCP MX spec; transformers' FP4_VALUES).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
#: Rounding |x| (already divided by the block's power of two) to a code: x above a boundary
#: goes up; at a boundary, round to the even code (0.25 -> 0, 0.75 -> 1.0, 5 -> 4, ...).
_UP_ABOVE = (0.25, 1.25, 2.5, 5.0)  # tie goes to the lower (even) code
_UP_FROM = (0.75, 1.75, 3.5)  # tie goes to the upper (even) code


class MXFP4(Codec):
    name = "mxfp4"
    reference_url = "https://github.com/huggingface/transformers/blob/main/src/transformers/integrations/mxfp4.py"
    methods = ("mxfp4",)

    def layout(self, name: str, shape: tuple[int, ...], scheme: QuantScheme) -> QuantSpec:
        if len(shape) != 3 or shape[1] % BLOCK:
            raise ValueError(f"`{name}` {list(shape)}: MXFP4 stores fused experts [E, K, N] with K a "
                             f"multiple of {BLOCK}")
        e, k, n = shape
        return QuantSpec(
            codec=self.name, name=name, shape=tuple(shape), dtype="BF16", scheme=scheme, row_align=k,
            parts=(Part(role="blocks", name=name + "_blocks", dtype="U8", shape=(e, n, k // BLOCK, 16)),
                   Part(role="scales", name=name + "_scales", dtype="U8", shape=(e, n, k // BLOCK))),
        )

    def find(self, tensors: Mapping[str, TensorInfo], scheme: QuantScheme, where: str) -> dict[str, QuantSpec]:
        found: dict[str, QuantSpec] = {}
        for n, t in tensors.items():
            if not n.endswith("_blocks"):
                continue
            base = n[: -len("_blocks")]
            s = tensors.get(base + "_scales")
            if s is None:
                raise CheckpointError(f"{where}/{t.file}: MXFP4 `{n}` has no `{base}_scales` beside it")
            sh = t.shape
            if t.dtype != "U8" or len(sh) != 4 or sh[3] != 16:
                raise CheckpointError(f"{where}/{t.file}: MXFP4 `{n}` is {t.dtype} {list(sh)}; gpt-oss stores "
                                      "U8 [experts, N, K/32, 16]")
            if s.dtype != "U8" or s.shape != sh[:3]:
                raise CheckpointError(f"{where}/{s.file}: `{s.name}` is {s.dtype} {list(s.shape)}; the E8M0 "
                                      f"scales of `{n}` {list(sh)} must be U8 {list(sh[:3])}")
            if base in tensors:
                raise CheckpointError(f"{where}/{t.file}: both `{base}` and its MXFP4 parts `{n}` are stored; "
                                      "which one is the weight?")
            spec = self.layout(base, (sh[0], sh[2] * BLOCK, sh[1]), scheme)
            found[base] = QuantSpec(codec=spec.codec, name=base, shape=spec.shape, dtype=spec.dtype, scheme=scheme,
                                    row_align=spec.row_align,
                                    parts=(Part(role="blocks", name=n, dtype="U8", shape=sh),
                                           Part(role="scales", name=s.name, dtype="U8", shape=s.shape)))
        for n, t in tensors.items():
            if n.endswith("_scales") and n[: -len("_scales")] + "_blocks" not in tensors and t.dtype == "U8":
                raise CheckpointError(f"{where}/{t.file}: MXFP4 scales `{n}` without their `_blocks`")
        return found

    def part_rows(self, spec: QuantSpec, part: Part, r0: int, r1: int) -> tuple[int, int]:
        k = spec.shape[1]
        e0, e1 = r0 // k, -(-r1 // k)
        per_expert = part.rows // spec.shape[0]
        return e0 * per_expert, e1 * per_expert

    def dequantize_rows(self, spec: QuantSpec, parts: Mapping[str, torch.Tensor], r0: int, r1: int, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        _, k, n = spec.shape
        e0, e1 = r0 // k, -(-r1 // k)
        blocks = parts["blocks"].reshape(-1, 16)
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        vals = torch.empty(blocks.shape[0], 32, dtype=torch.float32)
        vals[:, 0::2] = lut[(blocks & 0x0F).long()]
        vals[:, 1::2] = lut[(blocks >> 4).long()]
        exp = parts["scales"].reshape(-1, 1).to(torch.int32) - 127
        vals = torch.ldexp(vals, exp)  # exact: a power of two times a 2-bit value
        full = vals.view(e1 - e0, n, k).transpose(1, 2).reshape((e1 - e0) * k, n)
        rows = full[r0 - e0 * k: r1 - e0 * k]
        return rows if out is None else out.copy_(rows)

    def quantize_rows(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int, *,
                      amax: float | None = None) -> dict[str, torch.Tensor]:
        self.check_aligned(spec, r0, r1)
        _, k, n = spec.shape
        ne = (r1 - r0) // k
        v = values.float().view(ne, k, n).transpose(1, 2).reshape(ne * n * (k // BLOCK), BLOCK)
        block_max = v.abs().amax(-1)
        # the smallest power of two >= amax / 6, with amax / 6 rounded to float32 first, as the
        # reference quantizer (triton_kernels' downcast_to_mxfp, rounding mode ROUND_UP) does
        q = block_max / 6.0
        mant, ex = torch.frexp(q)
        e = torch.where(mant == 0.5, ex - 1, ex)
        biased = torch.where(q > 0, (e + 127).clamp(0, 254), torch.zeros_like(e))
        x = torch.ldexp(v, -(biased - 127).unsqueeze(-1).to(torch.int32)).abs()
        code = sum(((x > b) for b in _UP_ABOVE), torch.zeros_like(x, dtype=torch.uint8))
        code = code + sum(((x >= b) for b in _UP_FROM), torch.zeros_like(code))
        code = code.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)
        packed = code[:, 0::2] | (code[:, 1::2] << 4)
        return {"blocks": packed.reshape(ne * n * (k // BLOCK), 16),
                "scales": biased.to(torch.uint8).reshape(ne * n, k // BLOCK)}

    def quantization_config(self, scheme: QuantScheme) -> dict[str, Any]:
        if scheme.config:
            return dict(scheme.config)
        return {"quant_method": "mxfp4", "modules_to_not_convert": list(scheme.not_converted)}
