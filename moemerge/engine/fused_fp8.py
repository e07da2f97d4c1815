"""Weighted-sum merges (linear, the PMA averages) of block-FP8 inputs in one pass from their
codes: the read-ahead reads each input's chunk as stored (io.quant.stored: codes and scales,
~1 byte a value), and the compute loop decodes, scales and sums in one loop into the output
buffer (`_fused_fp8_numba`), instead of each input being dequantized into float32 on read and
read again by the sum. The bits are those of the two steps; a chunk with a NaN result, or
whose stored rows do not fit in its read buffer segment, takes the two steps.

Used only where every source is a `QuantizedView` of E4M3 block FP8 with float32 scales (no
`scale_fmt: ue8m0`: its scales are checked as they are dequantized), laid out alike, the
method a weighted sum computed in float32 on the CPU, and numba present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.engine.compute import segments
from moemerge.io.quant.base import QuantSpec
from moemerge.methods.base import Method
from moemerge.planner.plan import TensorPlan

__all__ = ["FUSED_BAND", "FusedFP8", "FusedChunk", "fused_for", "chunk_fits", "fused_into", "dequantize_sources"]


#: Values per band of a fused chunk written quantized: each band is summed into a scratch of
#: this many float32 values (4 MiB: in cache) and requantized while it is still there, in
#: whole scale-block rows. Measured (3 x 512 MB): 2^20 cost 0.25 s of CPU less than the whole
#: chunk summed then requantized; 2^18 and 2^19 more (each quantizer call costs ~0.15 ms).
FUSED_BAND = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class FusedFP8:
    """How one tensor's chunks are read and summed from their codes."""

    specs: tuple[QuantSpec, ...]
    """Each source's stored layout, in `sources_used` order (base first when present)."""
    weights: Any
    """float32 numpy [n_inputs]: the method's weights (base excluded), as `weighted_into` takes them."""


def _kernel() -> Any:
    try:
        from moemerge.engine import _fused_fp8_numba
    except (ImportError, RuntimeError, OSError):  # no numba, or no writable cache directory
        return None
    return _fused_fp8_numba.fp8_wsum_k


def fused_for(method: Method, t: TensorPlan, checkpoints: Sequence[object], cast: torch.dtype | None) -> FusedFP8 | None:
    """The fused plan of tensor `t` when it can take that path (see the module docstring), else None."""
    from moemerge.io.quant import _fp8_kernels
    from moemerge.io.quant.view import QuantizedView
    from moemerge.methods._fused import WEIGHTED_SUMS

    weights_of = WEIGHTED_SUMS.get(method.name)
    if (weights_of is None or not method.elementwise or t.method == "copy" or t.compute_dtype != "F32"
            or t.out_dtype not in ("BF16", "F32") or t.numel == 0
            or (cast is not None and cast not in (torch.float32, torch.float64))):
        return None
    specs = []
    for i, src in enumerate(t.sources_used):
        ck = checkpoints[src]
        spec = ck.specs.get(t.read_name(i)) if type(ck) is QuantizedView else None
        if (spec is None or spec.codec != "fp8-block" or spec.scheme.fp8 != "F8_E4M3" or spec.scheme.ue8m0
                or spec.part("scale").dtype != "F32" or spec.dtype != "F32"):
            return None
        specs.append(spec)
    first = specs[0]
    if any((s.shape, s.scheme.block, s.part("scale").shape) != (first.shape, first.scheme.block,
                                                                first.part("scale").shape) for s in specs):
        return None
    if not _fp8_kernels.available() or _kernel() is None:
        return None
    import numpy as np

    w = np.array([float(x) for x in weights_of(t.params, len(t.inputs))], np.float32)  # torch: a float32 operand
    if len(w) != len(t.inputs):
        return None
    return FusedFP8(specs=tuple(specs), weights=w)


def chunk_fits(f: FusedFP8, r0: int, r1: int) -> bool:
    """Whether rows [r0, r1) of every source fit, as stored, in their read buffer segments."""
    from moemerge.io.quant.stored import fits

    return all(fits(s, r0, r1) for s in f.specs)


class FusedChunk:
    """One chunk [r0, r1) of a fused tensor in its read buffer, ready to be summed band by band."""

    def __init__(self, f: FusedFP8, t: TensorPlan, buf: torch.Tensor, r0: int, r1: int) -> None:
        import numpy as np

        from moemerge.io.quant import get_codec
        from moemerge.io.quant.stored import stored_parts

        segs = segments(t, r0, r1)
        skip = 1 if t.base is not None else 0  # the base is read but not summed
        spec = f.specs[skip]
        self.r0, self.r1, self.cols, self.weights = r0, r1, t.row_len, f.weights
        self.col_block = spec.scheme.block[1]
        self.row_block = spec.scheme.block[0]
        self.scales = np.stack([stored_parts(s, buf[off:off + n], r0, r1)["scale"].numpy()
                                for s, (off, n) in zip(f.specs[skip:], segs[skip:])])
        self.groups = get_codec("fp8-block").row_groups(spec, r0, r1).numpy()  # type: ignore[attr-defined]
        self.offs = np.array([off for off, _ in segs[skip:]], np.int64)  # codes come first in a segment
        self.flat = buf.numpy()
        self.kernel = _kernel()

    def sum_into(self, a: int, b: int, out: torch.Tensor) -> bool:
        """The weighted sum of rows [a, b) (inside the chunk) into `out`'s first (b - a) *
        row_len elements (bf16 or float32, contiguous); False when a result is NaN (then
        `out` is not promised anything: `dequantize_sources`, then the method's own path)."""
        from moemerge.methods._host import kernel_view

        flat = out.reshape(-1)[:(b - a) * self.cols].view(b - a, self.cols)
        dst = kernel_view(flat)
        nans = self.kernel(self.flat, self.offs, self.cols, self.scales, self.groups, self.col_block,
                           self.weights, a - self.r0, dst)
        return not nans


def fused_into(f: FusedFP8, t: TensorPlan, buf: torch.Tensor, r0: int, r1: int, out: torch.Tensor) -> bool:
    """The weighted sum of rows [r0, r1) from the stored rows in read buffer `buf` into the
    typed output elements `out` (bf16 or float32); False when a result is NaN."""
    return FusedChunk(f, t, buf, r0, r1).sum_into(r0, r1, out)


def dequantize_sources(f: FusedFP8, t: TensorPlan, buf: torch.Tensor, r0: int, r1: int) -> None:
    """Turn every source's stored rows in `buf` into the float32 values the view serves, in place."""
    from moemerge.io.quant.stored import dequantize_in_place

    for s, (off, n) in zip(f.specs, segments(t, r0, r1)):
        dequantize_in_place(s, buf[off:off + n], r0, r1)
