"""The codec interface: how one quantized layout stores a logical tensor, and the row math.

A *logical* tensor (what a merge sees: `model.layers.0.mlp.experts.gate_up_proj`, real valued)
is stored as one or more *parts* (`..._blocks` U8 + `..._scales` U8; `X.weight` F8_E4M3 +
`X.weight_scale_inv` F32). A `QuantSpec` records both; a `Codec` turns rows of the parts into
rows of the logical tensor and back. Rows follow `checkpoint.row_geometry`: a logical row is a
slice along the last dim, so rows r0..r1 of every tensor are one contiguous byte range.

Example (block FP8, 128 x 128 tiles; `codec` is `moemerge.io.quant.get_codec("fp8-block")`)::

    spec = codec.layout("layers.0.q_proj.weight", (200, 300), QuantScheme(method="fp8", block=(128, 128)))
    [(p.role, p.name, p.dtype, p.shape) for p in spec.parts]
    # [('weight', 'layers.0.q_proj.weight', 'F8_E4M3', (200, 300)),
    #  ('scale', 'layers.0.q_proj.weight_scale_inv', 'F32', (2, 3))]
    stored = codec.quantize_rows(spec, values, 0, 200)          # values: float32 [200, 300]
    # {'weight': F8_E4M3 [200, 300], 'scale': F32 [2, 3]}  (rows part_rows(spec, part, 0, 200))
    back = codec.dequantize_rows(spec, stored, 0, 200)          # float32 [200, 300]
    # |back - values| <= half a quantization step per element; and
    # quantize_rows(spec, dequantize_rows(spec, stored, ...), ...) == stored, byte for byte.

The contract every codec keeps (tests/test_quant_input.py checks it for each one):

- `part_rows(spec, part, r0, r1)` are the stored rows of `part` (in the part's own
  row_geometry) that logical rows r0..r1 need; `dequantize_rows` takes exactly those rows,
  keyed by role, each shaped `[p1 - p0, part.row_len]` in the part's stored dtype, and returns
  float32 `[r1 - r0, spec.row_len]`. Any r0 < r1 works for dequantizing.
- `quantize_rows(spec, values, r0, r1)` needs r0 on `spec.row_align` and r1 on it or at
  `spec.rows`; it returns the same keyed rows for those logical rows, with fresh scales
  computed from `values` alone (`needs_amax(spec)`: a per-tensor scale also needs the whole
  tensor's `amax=`, which the caller gets from a statistics pass).
- Round trip: for stored data a codec's own quantizer could have written (every scale block
  attains the format maximum), quantize(dequantize(stored)) == stored exactly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from moemerge.io.checkpoint import RowShaped, TensorInfo
from moemerge.io.dtypes import itemsize

if TYPE_CHECKING:
    import torch

__all__ = ["Part", "QuantSpec", "QuantScheme", "Codec"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Part(RowShaped):
    """One stored tensor of a quantized logical tensor."""

    role: str
    """The codec's name for it: `weight`/`scale` (FP8), `blocks`/`scales` (MXFP4), `input_scale`."""
    name: str
    """The tensor's name on disk."""
    dtype: str
    """Safetensors dtype name (`F8_E4M3`, `F32`, `U8`)."""
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantScheme:
    """A checkpoint's quantization, parsed from config.json's `quantization_config`."""

    method: str
    """`quant_method` as written (`fp8`, `mxfp4`, `compressed-tensors`, `fbgemm_fp8`), or
    `fp8` for a checkpoint with FP8 + `_scale_inv` pairs and no quantization_config."""
    block: tuple[int, ...] = ()
    """Tile shape of block scales, e.g. (128, 128) (`weight_block_size`)."""
    strategy: str = ""
    """compressed-tensors weight strategy: `tensor`, `channel` or `block`; `row` for fbgemm."""
    fp8: str = "F8_E4M3"
    """Stored FP8 dtype of the codes."""
    ue8m0: bool = False
    """`scale_fmt: ue8m0` (DeepSeek-V3.1): every block scale is a power of two (2^-127..2^127),
    checked on read; a quantizer writes 2^ceil(log2(amax / fmax)) (`_fp8.pow2_scale`)."""
    not_converted: tuple[str, ...] = ()
    """Modules the config says stay unquantized (`ignore`, `modules_to_not_convert`)."""
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The input's `quantization_config` as read (empty when the checkpoint had none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantSpec(RowShaped):
    """How one logical tensor is stored: its codec, what is served, and the parts on disk."""

    codec: str
    """Registry name of the codec (`moemerge.io.quant.CODECS`)."""
    name: str
    """The logical tensor's name (what a merge and an unquantized output use)."""
    shape: tuple[int, ...]
    """The logical shape (the unquantized parameter's shape in `transformers`)."""
    dtype: str
    """The dtype the dequantizing view serves (`F32` for FP8 layouts, `BF16` for MXFP4)."""
    parts: tuple[Part, ...]
    """The stored tensors whose values make the logical tensor."""
    extras: tuple[Part, ...] = ()
    """Stored beside it but not part of its value (compressed-tensors `input_scale`): hidden
    from merges; a writer re-emitting the layout decides what to do with them."""
    row_align: int = 1
    """Logical rows per scale-block row: chunk boundaries (r0, r1) fall on multiples of it."""
    scheme: QuantScheme

    def part(self, role: str) -> Part:
        for p in self.parts + self.extras:
            if p.role == role:
                return p
        raise KeyError(f"`{self.name}` ({self.codec}) has no part `{role}`")

    @property
    def stored_nbytes(self) -> int:
        """Bytes on disk of every part (extras included): what reading it costs."""
        return sum(p.nbytes for p in self.parts + self.extras)


#: Values per quantizer call of a codec whose quantizer makes band-sized temporaries (a few
#: float32 copies): a few MB each, whatever the chunk.
QUANTIZE_BAND = 1 << 20


class Codec(ABC):
    """One quantized layout. Stateless: everything per tensor is in its `QuantSpec`."""

    name: ClassVar[str]
    """Registry name (`fp8-block`, `mxfp4`, `fp8-channel`)."""
    reference_url: ClassVar[str]
    """Where the layout is specified (the reference dequantizer)."""
    methods: ClassVar[tuple[str, ...]]
    """The `quant_method` values this codec serves."""

    @abstractmethod
    def find(self, tensors: Mapping[str, TensorInfo], scheme: QuantScheme, where: str) -> dict[str, QuantSpec]:
        """The quantized logical tensors among `tensors` (headers only), by logical name.

        Raises CheckpointError (naming `where`, the tensor and the expected shape) for a
        malformed one: a scale of the wrong shape or dtype, a part without its sibling.
        """

    @abstractmethod
    def layout(self, name: str, shape: tuple[int, ...], scheme: QuantScheme) -> QuantSpec:
        """The spec of logical tensor `name` [shape] stored in this layout (for writers).

        Raises ValueError naming the tensor when the shape cannot be stored so.
        """

    @abstractmethod
    def part_rows(self, spec: QuantSpec, part: Part, r0: int, r1: int) -> tuple[int, int]:
        """Stored rows [p0, p1) of `part` that logical rows [r0, r1) need."""

    @abstractmethod
    def dequantize_rows(self, spec: QuantSpec, parts: Mapping[str, torch.Tensor], r0: int, r1: int, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Logical rows [r0, r1) as float32 `[r1 - r0, spec.row_len]` from their stored rows;
        written into `out` (contiguous float32 of that shape, returned) when given."""

    @abstractmethod
    def quantize_rows(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int, *,
                      amax: float | None = None) -> dict[str, torch.Tensor]:
        """Stored rows of every part (by role) for logical rows [r0, r1) = `values`, with
        fresh scales. `values` is float32 `[r1 - r0, spec.row_len]`."""

    def quantize_rows_into(self, spec: QuantSpec, values: torch.Tensor, r0: int, r1: int,
                           dst: Mapping[str, torch.Tensor], *, amax: float | None = None) -> None:
        """`quantize_rows`, each part's rows written into `dst[role]` (a uint8 tensor of exactly
        their bytes) rather than returned: a codec that can encodes straight into it."""
        stored = self.quantize_rows(spec, values, r0, r1, amax=amax)
        for part in spec.parts:
            raw = stored[part.role].contiguous().reshape(-1).view(dst[part.role].dtype)
            if raw.numel() != dst[part.role].numel():
                raise AssertionError(f"`{part.name}`: quantized {raw.numel()} bytes for {dst[part.role].numel()}")
            dst[part.role].copy_(raw)

    def quantize_band(self, spec: QuantSpec) -> int:
        """How many logical values to quantize per `quantize_rows_into` call at most (whole
        scale blocks are kept together), so that the quantizer's temporaries stay small."""
        return QUANTIZE_BAND

    def needs_amax(self, spec: QuantSpec) -> bool:
        """True when a scale spans the whole tensor: quantize_rows then needs `amax=`."""
        return False

    def quantization_config(self, scheme: QuantScheme) -> dict[str, Any]:
        """A `quantization_config` for an output written in this layout (the input's by default)."""
        return dict(scheme.config)

    def check_aligned(self, spec: QuantSpec, r0: int, r1: int) -> None:
        """ValueError unless [r0, r1) starts and ends on scale-block rows (or at the end)."""
        a = spec.row_align
        if r0 % a or (r1 % a and r1 != spec.rows) or not 0 <= r0 < r1 <= spec.rows:
            raise ValueError(f"`{spec.name}`: rows [{r0}, {r1}) do not fall on {spec.codec} blocks of {a} "
                             f"rows (of {spec.rows}); quantize whole blocks")
