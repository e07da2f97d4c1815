"""Block-scaled FP8 (DeepSeek-V3/R1, Kimi K2, Qwen3-FP8; compressed-tensors `block`).

`X` (F8_E4M3, [..., R, C]) + `X_scale_inv` (F32, [..., ceil(R/bR), ceil(C/bC)]): value =
code * scale of its tile (`weight_block_size` [bR, bC]; edge tiles may be partial).
compressed-tensors names the scale `X_scale` instead. Served as float32 (see `_fp8.quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import TensorInfo, shared_table, sharing
from moemerge.io.dtypes import to_torch
from moemerge.io.quant import _fp8, _fp8_kernels
from moemerge.io.quant.base import Codec, Part, QuantScheme, QuantSpec

__all__ = ["BlockFP8"]

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
#: `quantize_band` of a quantizer with no band-sized temporaries: any range at once.
WHOLE = 1 << 62


def scale_suffix(scheme: QuantScheme) -> str:
    """`_scale_inv` (DeepSeek, transformers `fp8`) or `_scale` (compressed-tensors)."""
    return "_scale" if scheme.method == "compressed-tensors" else "_scale_inv"


class BlockFP8(Codec):
    name = "fp8-block"
    reference_url = "https://github.com/huggingface/transformers/blob/main/src/transformers/integrations/finegrained_fp8.py"
    methods = ("fp8", "compressed-tensors")

    # -- geometry --------------------------------------------------------------------------

    @staticmethod
    def _dims(spec: QuantSpec) -> tuple[int, int, int, int]:
        """(R, C, tile rows per matrix, tile columns)."""
        br, bc = spec.scheme.block
        r, c = spec.shape[-2], spec.shape[-1]
        return r, c, -(-r // br), -(-c // bc)

    def _tile_row(self, spec: QuantSpec, rows: torch.Tensor) -> torch.Tensor:
        """Scale row (flattened) of each logical row."""
        r, _, tr, _ = self._dims(spec)
        return (rows // r) * tr + (rows % r) // spec.scheme.block[0]

    def _tile_rows(self, spec: QuantSpec, r0: int, r1: int) -> tuple[int, int]:
        r, _, tr, _ = self._dims(spec)
        br = spec.scheme.block[0]
        first = (r0 // r) * tr + (r0 % r) // br
        last = ((r1 - 1) // r) * tr + ((r1 - 1) % r) // br
        return first, last + 1

    # -- the interface -----------------------------------------------------------------------

    def layout(self, name: str, shape: tuple[int, ...], scheme: QuantScheme, *,
               scale: TensorInfo | None = None) -> QuantSpec:
        if len(shape) < 2 or len(scheme.block) != 2:
            raise ValueError(f"`{name}` {list(shape)}: block FP8 stores matrices (2-D or more) with a 2-D "
                             f"weight_block_size, got {list(scheme.block)}")
        br, bc = scheme.block
        r = shape[-2]
        tiles = (*shape[:-2], -(-r // br), -(-shape[-1] // bc))
        # a ragged R inside a stack of matrices puts tile rows off a fixed stride: chunk whole matrices
        align = br if (len(shape) == 2 or r % br == 0) else r
        # `scale`: the stored scale found beside it; its name and (when it is right) shape are
        # reused rather than made again for each of 92k tensors
        scale_name = scale.name if scale is not None else name + scale_suffix(scheme)
        if scale is not None and scale.shape == tiles:
            tiles = scale.shape
        shape = tuple(shape)
        return QuantSpec(
            codec=self.name, name=name, shape=shape, dtype="F32", scheme=scheme, row_align=align,
            parts=(Part(role="weight", name=name, dtype=scheme.fp8, shape=shape),
                   Part(role="scale", name=scale_name, dtype="F32", shape=tiles)),
        )

    def find(self, tensors: Mapping[str, TensorInfo], scheme: QuantScheme, where: str) -> dict[str, QuantSpec]:
        suffix = scale_suffix(scheme)
        found: dict[str, QuantSpec] = {}
        by_fp8: dict[str, QuantScheme] = {}  # one scheme per FP8 dtype, shared by its tensors
        for n, t in tensors.items():
            if t.dtype not in FP8_DTYPES:
                continue
            s = tensors.get(n + suffix)  # the pair by name: one lookup per FP8 tensor
            if s is None:
                continue
            fp8 = by_fp8.get(t.dtype)
            if fp8 is None:
                fp8 = by_fp8[t.dtype] = QuantScheme(
                    method=scheme.method, block=scheme.block, strategy=scheme.strategy, fp8=t.dtype,
                    ue8m0=scheme.ue8m0, not_converted=scheme.not_converted, config=scheme.config)
            key = (n, t.dtype, t.shape, s.name, s.dtype, s.shape)
            seen = _FOUND.get(key) if sharing() else None
            if seen is not None and seen.scheme == fp8 and seen.scheme.config == fp8.config:
                found[n] = seen  # an input laid out alike opened before: the same spec
                continue
            try:
                spec = self.layout(n, t.shape, fp8, scale=s)
            except ValueError as e:
                raise CheckpointError(f"{where}/{t.file}: FP8 tensor {e}") from e
            want = spec.parts[1].shape
            # ue8m0 scales may be stored as their 8-bit exponents (U8, bias 127; MXFP8 releases)
            dtypes = ("F32", "BF16", "U8") if scheme.ue8m0 else ("F32", "BF16")
            if s.dtype not in dtypes or s.shape != want:
                raise CheckpointError(
                    f"{where}/{s.file}: `{s.name}` is {s.dtype} {list(s.shape)}; a "
                    f"{scheme.block[0]}x{scheme.block[1]} block scale of `{n}` {list(t.shape)} must be "
                    f"F32 {list(want)} (weight_block_size {list(scheme.block)} in config.json"
                    f"{'; or U8 exponents with scale_fmt ue8m0' if scheme.ue8m0 else ''})")
            if s.dtype != "F32":
                spec = QuantSpec(codec=spec.codec, name=n, shape=spec.shape, dtype=spec.dtype, scheme=spec.scheme,
                                 row_align=spec.row_align,
                                 parts=(spec.parts[0], Part(role="scale", name=s.name, dtype=s.dtype, shape=s.shape)))
            found[n] = spec
            if sharing():
                _FOUND[key] = spec
        return found

    def part_rows(self, spec: QuantSpec, part: Part, r0: int, r1: int) -> tuple[int, int]:
        if part.role == "weight":
            return r0, r1
        return self._tile_rows(spec, r0, r1)

    def row_groups(self, spec: QuantSpec, r0: int, r1: int) -> torch.Tensor:
        """The scale row of each logical row r0..r1, counted from the first one they need
        (int64 [r1 - r0]): row i's scales are `scale[row_groups[i], j // block[1]]` of the
        scale rows `part_rows(spec, scale part, r0, r1)`."""
        return self._tile_row(spec, torch.arange(r0, r1)) - self._tile_rows(spec, r0, r1)[0]

    def dequantize_rows(self, spec: QuantSpec, parts: Mapping[str, torch.Tensor], r0: int, r1: int, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        first = self._tile_rows(spec, r0, r1)[0]
        scales = scale_values(parts["scale"])
        if spec.scheme.ue8m0:
            check_pow2(spec, scales, first)
        group = self._tile_row(spec, torch.arange(r0, r1)) - first
        return _fp8.dequantize(parts["weight"], scales, group, spec.scheme.block[1], out=out)

    def quantize_rows(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int, *,
                      amax: float | None = None) -> dict[str, torch.Tensor]:
        return self._quantize(spec, values, r0, r1)

    def quantize_rows_into(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int,
                           dst: Mapping[str, torch.Tensor], *, amax: float | None = None) -> None:
        # the codes go straight into their place (no band-sized temporary, no copy); the
        # scales (a few hundred bytes) are copied
        codes = dst["weight"]
        if codes.numel() != (r1 - r0) * spec.row_len:
            raise AssertionError(f"`{spec.name}`: {codes.numel()} bytes for {(r1 - r0) * spec.row_len} codes")
        stored = self._quantize(spec, values, r0, r1, codes_out=codes.view(r1 - r0, spec.row_len))
        scale = stored["scale"].contiguous().reshape(-1).view(torch.uint8)
        if scale.numel() != dst["scale"].numel():
            raise AssertionError(f"`{spec.name}`: {scale.numel()} scale bytes for {dst['scale'].numel()}")
        dst["scale"].copy_(scale)

    def quantize_band(self, spec: QuantSpec) -> int:
        # the compiled E4M3 quantizer makes no temporary of the band's size (amax and scales
        # are per block, the codes go into place): a chunk at once, with no per-band overhead
        if spec.scheme.fp8 == "F8_E4M3" and _fp8_kernels.available():
            return WHOLE
        return super().quantize_band(spec)

    def _quantize(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int, *,
                  codes_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.check_aligned(spec, r0, r1)
        first, last = self._tile_rows(spec, r0, r1)
        group = self._tile_row(spec, torch.arange(r0, r1)) - first
        scale_part = spec.part("scale")
        exponents = scale_part.dtype == "U8"  # ue8m0 scales stored as their exponents
        codes, scale = _fp8.quantize(values.float(), group, last - first, spec.scheme.block[1],
                                     to_torch(spec.scheme.fp8),
                                     scale_dtype=torch.float32 if exponents else to_torch(scale_part.dtype),
                                     pow2=spec.scheme.ue8m0, codes_out=codes_out)
        if exponents:
            scale = (torch.frexp(scale)[1] - 1 + 127).to(torch.uint8)  # 2^k -> k + 127 (k in -127..127)
        return {"weight": codes, "scale": scale}

    def quantization_config(self, scheme: QuantScheme) -> dict[str, Any]:
        if scheme.config:
            cfg = dict(scheme.config)
        else:
            cfg = {"quant_method": "fp8", "fmt": "e4m3" if scheme.fp8 == "F8_E4M3" else "e5m2",
                   "activation_scheme": "dynamic", "weight_block_size": list(scheme.block)}
        if scheme.ue8m0:  # the scales written are powers of two: say so, as DeepSeek-V3.1 does
            cfg["scale_fmt"] = "ue8m0"
        return cfg


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """Stored scales as float (U8 UE8M0 exponents: 2^(e - 127), 255 NaN; others as they are)."""
    if scales.dtype != torch.uint8:
        return scales
    e = scales.to(torch.int32)
    v = torch.ldexp(torch.ones(e.shape, dtype=torch.float64), e - 127).float()
    return torch.where(e == 255, torch.full_like(v, float("nan")), v)


def check_pow2(spec: QuantSpec, scales: torch.Tensor, first_row: int) -> None:
    """CheckpointError naming the scale tensor unless every scale (rows from `first_row` of
    the flattened scale part) is a power of two: `scale_fmt: ue8m0` says they are, and an
    output written `like-input` would claim it again for whatever the input really holds."""
    bad = _fp8.not_pow2(scales)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        part = spec.part("scale")
        raise CheckpointError(
            f"`{part.name}` {list(part.shape)}: scale {float(scales[i, j])!r} (row {first_row + i}, column {j} "
            f"of the flattened scales) is not a power of two, but config.json says `scale_fmt: ue8m0`; "
            "the config does not match the weights: fix or drop `scale_fmt` in config.json")


#: Specs made by `find` inside io.checkpoint.shared_records, by what decides them (names,
#: dtypes and shapes of the weight and its scale; the scheme is compared on use): inputs laid
#: out alike share their specs.
_FOUND: dict[tuple[Any, ...], QuantSpec] = shared_table()
