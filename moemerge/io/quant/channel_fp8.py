"""Per-channel and per-tensor scaled FP8: compressed-tensors `float-quantized`, fbgemm FP8.

`X.weight` (F8_E4M3, [..., R, C]) + `X.weight_scale` (F32 or BF16): per channel / per row
`[..., R, 1]`, or per tensor `[1]`; value = code * scale. compressed-tensors may add
`X.input_scale` (a static activation scale, not part of the weight's value): it is an extra
part, hidden from merges. Served as float32 (see `_fp8.quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import TensorInfo
from moemerge.io.dtypes import to_torch
from moemerge.io.quant import _fp8
from moemerge.io.quant.base import Codec, Part, QuantScheme, QuantSpec
from moemerge.io.quant.block_fp8 import FP8_DTYPES

__all__ = ["ChannelFP8"]


def _input_scale_name(name: str) -> str:
    return (name[: -len("weight")] if name.endswith("weight") else name + "_") + "input_scale"


class ChannelFP8(Codec):
    name = "fp8-channel"
    reference_url = "https://github.com/neuralmagic/compressed-tensors/blob/main/src/compressed_tensors/compressors/quantized_compressors/fp8_quantized.py"
    methods = ("compressed-tensors", "fbgemm_fp8")

    def layout(self, name: str, shape: tuple[int, ...], scheme: QuantScheme) -> QuantSpec:
        if len(shape) < 2:
            raise ValueError(f"`{name}` {list(shape)}: FP8 weights with channel scales are matrices (2-D or more)")
        per_tensor = scheme.strategy == "tensor"
        scale_shape = (1,) if per_tensor else (*shape[:-1], 1)
        return QuantSpec(
            codec=self.name, name=name, shape=tuple(shape), dtype="F32", scheme=scheme, row_align=1,
            parts=(Part(role="weight", name=name, dtype=scheme.fp8, shape=tuple(shape)),
                   Part(role="scale", name=name + "_scale", dtype="F32", shape=scale_shape)),
        )

    def find(self, tensors: Mapping[str, TensorInfo], scheme: QuantScheme, where: str) -> dict[str, QuantSpec]:
        found: dict[str, QuantSpec] = {}
        for n, t in tensors.items():
            s = tensors.get(n + "_scale")
            if t.dtype not in FP8_DTYPES or s is None:
                continue
            per_tensor = s.shape in ((), (1,))
            channel = (*t.shape[:-1], 1)
            if len(t.shape) < 2 or s.dtype not in ("F32", "BF16") or not (per_tensor or s.shape in (channel, t.shape[:-1])):
                raise CheckpointError(
                    f"{where}/{s.file}: `{s.name}` is {s.dtype} {list(s.shape)}; the FP8 scale of `{n}` "
                    f"{list(t.shape)} must be F32 or BF16, per channel {list(channel)} or per tensor [1] "
                    f"({scheme.method})")
            sub = QuantScheme(method=scheme.method, block=(), strategy="tensor" if per_tensor else (scheme.strategy or "channel"),
                              fp8=t.dtype, not_converted=scheme.not_converted, config=scheme.config)
            if sub.strategy == "tensor" and not per_tensor:
                sub = QuantScheme(method=sub.method, strategy="channel", fp8=sub.fp8,
                                  not_converted=sub.not_converted, config=sub.config)
            extras: tuple[Part, ...] = ()
            inp = tensors.get(_input_scale_name(n))
            if inp is not None:
                extras = (Part(role="input_scale", name=inp.name, dtype=inp.dtype, shape=inp.shape),)
            found[n] = QuantSpec(
                codec=self.name, name=n, shape=t.shape, dtype="F32", scheme=sub, row_align=1, extras=extras,
                parts=(Part(role="weight", name=n, dtype=t.dtype, shape=t.shape),
                       Part(role="scale", name=s.name, dtype=s.dtype, shape=s.shape)),
            )
        return found

    @staticmethod
    def _per_tensor(spec: QuantSpec) -> bool:
        return spec.part("scale").rows == 1 and spec.rows != 1 or spec.scheme.strategy == "tensor"

    def needs_amax(self, spec: QuantSpec) -> bool:
        return self._per_tensor(spec)

    def part_rows(self, spec: QuantSpec, part: Part, r0: int, r1: int) -> tuple[int, int]:
        if part.role == "scale" and self._per_tensor(spec):
            return 0, 1
        if part.role == "input_scale":
            return 0, part.rows
        return r0, r1

    def dequantize_rows(self, spec: QuantSpec, parts: Mapping[str, torch.Tensor], r0: int, r1: int, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        n = r1 - r0
        group = torch.zeros(n, dtype=torch.long) if self._per_tensor(spec) else torch.arange(n)
        return _fp8.dequantize(parts["weight"], parts["scale"].reshape(-1, 1), group, spec.row_len, out=out)

    def quantize_rows(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int, *,
                      amax: float | None = None) -> dict[str, torch.Tensor]:
        self.check_aligned(spec, r0, r1)
        n = r1 - r0
        sdt = to_torch(spec.part("scale").dtype)
        fp8 = to_torch(spec.scheme.fp8)
        if self._per_tensor(spec):
            if amax is None:
                raise ValueError(f"`{spec.name}` has one scale for the whole tensor: quantize_rows needs "
                                 "amax= (max |value| over every row)")
            # the exact-scale search (see _fp8.quantize) must see every value: only a whole tensor
            # in one chunk gets it, or two chunks could pick neighbouring scales
            codes, scale = _fp8.quantize(values.float(), torch.zeros(n, dtype=torch.long), 1, spec.row_len, fp8,
                                         amax=torch.tensor([[float(amax)]]), scale_dtype=sdt,
                                         search=r0 == 0 and r1 == spec.rows)
        else:
            codes, scale = _fp8.quantize(values.float(), torch.arange(n), n, spec.row_len, fp8, scale_dtype=sdt)
        return {"weight": codes, "scale": scale.reshape(-1, 1)}

    def quantization_config(self, scheme: QuantScheme) -> dict[str, Any]:
        if scheme.config:
            return dict(scheme.config)
        if scheme.method == "fbgemm_fp8":
            return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": []}
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                    "strategy": scheme.strategy or "channel"}}},
                "ignore": list(scheme.not_converted)}
