"""A chunk of a quantized tensor read as stored (its parts' rows, not dequantized), for a
consumer that dequantizes as it computes (engine/fused_fp8.py: FP8 codes straight into a
weighted sum, with no float32 copy of each input).

The parts' rows for logical rows r0..r1 lie one after another in the buffer, in `spec.parts`
order, each from a multiple of `PART_ALIGN`. Every such layout fits in the bytes the
dequantized rows would take when `fits` says so, so a read buffer sized for served values
holds either; `dequantize_in_place` turns one into the other there (the fallback of such a
consumer: the same values the view serves, bit for bit).

Example::

    if fits(spec, r0, r1):
        view.read_stored(name, r0, r1, buf_mv)                # codes, then scales
        parts = stored_parts(spec, buf, r0, r1)               # {'weight': u8 [n, C] as F8, 'scale': F32 [m, tc]}
        dequantize_in_place(spec, buf, r0, r1)                # buf now holds float32 [n, C]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moemerge.io.dtypes import itemsize, to_torch
from moemerge.io.quant.base import Part, QuantSpec

if TYPE_CHECKING:
    import torch

__all__ = ["PART_ALIGN", "stored_layout", "stored_nbytes", "fits", "stored_parts", "dequantize_in_place"]

#: Each part's rows start at a multiple of this in the buffer (typed views stay aligned).
PART_ALIGN = 64
#: Rows dequantized per step of `dequantize_in_place` (about this many values).
_BAND_VALUES = 1 << 20


def _up(n: int) -> int:
    return -(-n // PART_ALIGN) * PART_ALIGN


def stored_layout(spec: QuantSpec, r0: int, r1: int) -> list[tuple[Part, int, int, int]]:
    """(part, byte offset, first part row, end part row) of each part for logical rows [r0, r1)."""
    from moemerge.io.quant.registry import get_codec

    codec = get_codec(spec.codec)
    out = []
    pos = 0
    for part in spec.parts:
        p0, p1 = codec.part_rows(spec, part, r0, r1)
        out.append((part, pos, p0, p1))
        pos = _up(pos + (p1 - p0) * part.row_len * itemsize(part.dtype))
    return out


def stored_nbytes(spec: QuantSpec, r0: int, r1: int) -> int:
    """Bytes of the stored layout of logical rows [r0, r1) (the last part's padding included)."""
    lay = stored_layout(spec, r0, r1)
    if not lay:
        return 0
    part, off, p0, p1 = lay[-1]
    return _up(off + (p1 - p0) * part.row_len * itemsize(part.dtype))


def fits(spec: QuantSpec, r0: int, r1: int) -> bool:
    """Whether the stored layout of rows [r0, r1) fits in the bytes of their served values."""
    return r1 > r0 and stored_nbytes(spec, r0, r1) <= (r1 - r0) * spec.row_len * itemsize(spec.dtype)


def stored_parts(spec: QuantSpec, buf: torch.Tensor, r0: int, r1: int) -> dict[str, torch.Tensor]:
    """Typed views `[p1 - p0, part.row_len]` of each part's rows in the byte tensor `buf`, by role."""
    out = {}
    for part, off, p0, p1 in stored_layout(spec, r0, r1):
        n = (p1 - p0) * part.row_len * itemsize(part.dtype)
        out[part.role] = buf[off:off + n].view(to_torch(part.dtype)).view(p1 - p0, part.row_len)
    return out


def dequantize_in_place(spec: QuantSpec, buf: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Turn the stored layout of rows [r0, r1) at the start of byte tensor `buf` into their
    served float32 values `[r1 - r0, row_len]` (returned) in the same bytes, as the view
    would serve them. Needs a float32-served codec (block FP8) whose first part's rows are
    the logical rows (FP8 codes) and `fits`.

    The other parts (scales) are copied out first; then bands of rows go from the last to the
    first, each band's codes copied out before its values overwrite them: the values of rows
    a.. start at byte 4 * a * C, past the codes of every row before a (at a * C), so no code
    is overwritten before it is read.
    """
    import torch

    from moemerge.io.quant.registry import get_codec

    if spec.dtype != "F32" or not fits(spec, r0, r1):
        raise ValueError(f"`{spec.name}`: rows [{r0}, {r1}) cannot be dequantized in place")
    codec = get_codec(spec.codec)
    lay = stored_layout(spec, r0, r1)
    first, _, f0, f1 = lay[0]
    if (f0, f1) != (r0, r1) or first.row_len != spec.row_len:
        raise ValueError(f"`{spec.name}`: its first part's rows are not its logical rows")
    parts = stored_parts(spec, buf, r0, r1)
    rest = {p.role: parts[p.role].clone() for p, _, _, _ in lay[1:]}
    starts = {p.role: p0 for p, _, p0, _ in lay}
    codes = parts[first.role]
    n = r1 - r0
    values = buf[:n * spec.row_len * 4].view(torch.float32).view(n, spec.row_len)
    band = max(1, _BAND_VALUES // max(1, spec.row_len))
    for b in range(r1, r0, -band):
        a = max(r0, b - band)
        band_parts = {first.role: codes[a - r0:b - r0].clone()}
        for p, _, _, _ in lay[1:]:
            q0, q1 = codec.part_rows(spec, p, a, b)
            band_parts[p.role] = rest[p.role][q0 - starts[p.role]:q1 - starts[p.role]]
        codec.dequantize_rows(spec, band_parts, a, b, out=values[a - r0:b - r0])
    return values
