"""Quantized output tensors: where each stored part of a logical tensor goes, and merged
float32 rows turned into each part's rows with fresh scales (the codecs of `moemerge.io.quant`).

An `OutQuant` (on a `TensorPlan`) is a codec's `QuantSpec` plus the place of every part in
the output. `quantize_into` writes a chunk's parts after its values in the output buffer and
returns each part's segment (its first row, where its bytes are, how many) for the writer.

Example::

    q = OutQuant(spec=spec, places=(PartPlace(name="x.weight", ...), PartPlace(name="x.weight_scale_inv", ...)))
    segs = quantize_into(q, values, r0, r1, out)   # [("x.weight", r0, off, n), ("x.weight_scale_inv", r0 // 128, off2, n2)]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moemerge.io.dtypes import itemsize
from moemerge.io.quant.base import QUANTIZE_BAND, QuantSpec

if TYPE_CHECKING:
    import torch

    from moemerge.io.quant.base import Codec

__all__ = ["PartPlace", "OutQuant", "Segment", "parts_bytes", "quantize_into", "quantize_bands", "BAND_ELEMS"]

#: Rows are quantized a band of about this many elements at a time (whole scale blocks) by a
#: quantizer whose temporaries are a few float32 copies of the band (`Codec.quantize_band`).
BAND_ELEMS = QUANTIZE_BAND


@dataclass(frozen=True, slots=True, kw_only=True)
class PartPlace:
    """One stored part of a quantized output tensor and its place in a safetensors shard."""

    role: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str = ""
    offset: int = 0
    """Absolute byte offset of the part's data in `file` (0 until laid out)."""

    @property
    def row_bytes(self) -> int:
        return (self.shape[-1] if len(self.shape) >= 2 else 1) * itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutQuant:
    """How one logical output tensor is written: the codec's spec and every part's place."""

    spec: QuantSpec
    places: tuple[PartPlace, ...]
    """One per `spec.parts`, same order."""

    @classmethod
    def unplaced(cls, spec: QuantSpec) -> OutQuant:
        return cls(spec=spec, places=tuple(PartPlace(role=p.role, name=p.name, dtype=p.dtype, shape=p.shape)
                                           for p in spec.parts))

    @property
    def codec(self) -> Codec:
        from moemerge.io.quant import get_codec

        return get_codec(self.spec.codec)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.places)


#: (part name, first row of the part, byte offset in the output buffer, bytes)
Segment = tuple[str, int, int, int]


def parts_bytes(q: OutQuant, r0: int, r1: int) -> int:
    """Bytes of every part's rows for logical rows [r0, r1)."""
    codec = q.codec
    total = 0
    for part, place in zip(q.spec.parts, q.places):
        p0, p1 = codec.part_rows(q.spec, part, r0, r1)
        total += (p1 - p0) * place.row_bytes
    return total


def quantize_into(q: OutQuant, values: torch.Tensor, r0: int, r1: int, out: torch.Tensor, at: int,
                  amax: float | None = None) -> list[Segment]:
    """Quantize logical rows [r0, r1) (`values`, float32 [r1 - r0, row_len]) into the byte
    buffer `out` from offset `at`, part after part; return each part's segment.

    Works a band of whole scale blocks at a time (`Codec.quantize_band`: BAND_ELEMS for a
    quantizer with band-sized temporaries, the whole range for one without), each band's
    part rows encoded straight into their place; the bands' rows of a part are consecutive
    rows of that part.
    """
    band = q.codec.quantize_band(q.spec) // max(1, q.spec.row_len)
    return quantize_bands(q, lambda a, b: values[a - r0:b - r0], r0, r1, out, at, band_rows=band, amax=amax)


def quantize_bands(q: OutQuant, values_of: Callable[[int, int], torch.Tensor], r0: int, r1: int,
                   out: torch.Tensor, at: int, *, band_rows: int, amax: float | None = None) -> list[Segment]:
    """`quantize_into` for values made band by band: `values_of(a, b)` gives rows [a, b)
    (float32 [b - a, row_len]) when that band is quantized, so a caller can make each band
    just before (into a cache-sized scratch, quantized while it is still in cache). Bands are
    `band_rows` rows (at least one scale block row; whole ones, and at most the codec's
    `quantize_band`)."""
    spec, codec = q.spec, q.codec
    segs: list[Segment] = []
    bases: list[int] = []
    pos = at
    for part, place in zip(spec.parts, q.places):
        p0, p1 = codec.part_rows(spec, part, r0, r1)
        segs.append((place.name, p0, pos, (p1 - p0) * place.row_bytes))
        bases.append(pos)
        pos += (p1 - p0) * place.row_bytes
    align = max(1, spec.row_align)
    most = codec.quantize_band(spec) // max(1, spec.row_len)
    band = max(align, min(r1 - r0, band_rows, most) // align * align)
    filled = [0] * len(bases)
    for a in range(r0, r1, band):
        b = min(r1, a + band)
        dst = {}
        for i, (part, place) in enumerate(zip(spec.parts, q.places)):
            q0, q1 = codec.part_rows(spec, part, a, b)
            n = (q1 - q0) * place.row_bytes
            if filled[i] + n > segs[i][3]:
                raise AssertionError(f"`{part.name}`: quantized rows overflow their segment")
            dst[part.role] = out[bases[i] + filled[i]:bases[i] + filled[i] + n]
            filled[i] += n
        codec.quantize_rows_into(spec, values_of(a, b), a, b, dst, amax=amax)
    for i, seg in enumerate(segs):
        if filled[i] != seg[3]:
            raise AssertionError(f"`{seg[0]}`: quantized {filled[i]} bytes for a {seg[3]}-byte segment")
    return segs
