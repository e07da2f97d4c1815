"""A checkpoint view serving quantized tensors dequantized, band by band, parts hidden.

Each read of rows r0..r1 of a quantized tensor is cut into bands on the codec's block rows
(`QuantSpec.row_align`, a few MB of float32 each): per band, the parts' stored rows are read
into per-thread scratch, dequantized and written into the caller's buffer in the served dtype.
The extra memory is a band's parts and its float32 values per reading thread, however big the
tensor or the chunk (an MXFP4 band is one expert: gpt-oss-120b's 2880 x 5760 is 66 MB).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint, TensorInfo, shared_table, sharing
from moemerge.io.dtypes import itemsize, to_torch
from moemerge.io.quant.base import QuantScheme, QuantSpec

__all__ = ["QuantizedView", "BAND_BYTES"]

#: float32 bytes of one band's values (rounded to whole block rows, at least one).
BAND_BYTES = 4 << 20
#: `scale_fmt: ue8m0` scales are all read and checked when the view is opened (at plan time)
#: up to this many bytes in all (F32 scales of a model up to ~68B parameters at 128 x 128); above it, each
#: block is checked as it is read (a run then stops at the first bad scale, uncommitted).
UE8M0_SCAN_BYTES = 16 << 20

#: The served record of each spec, by the spec's identity (kept beside the id, which is reused
#: only once the spec is gone): the same for inputs sharing shard headers (quant/block_fp8.py).
_SERVED: dict[int, tuple[QuantSpec, TensorInfo, TensorInfo]] = shared_table()


class QuantizedView(Checkpoint):
    """A checkpoint whose quantized tensors are served as `spec.dtype`; everything else as is.

    A wrapper (io.formats.CheckpointReader over `inner`, and WrapsReader): it reads nothing
    itself but through `inner`, and owns it (`close` closes it)."""

    def __init__(self, inner: Checkpoint, scheme: QuantScheme, specs: dict[str, QuantSpec]) -> None:
        from moemerge.io.quant.registry import get_codec

        hidden = {p.name for s in specs.values() for p in s.parts + s.extras}
        tensors = {n: t for n, t in inner.tensors.items() if n not in hidden}
        for n, spec in specs.items():
            first = inner.tensors[spec.parts[0].name]
            seen = _SERVED.get(id(spec)) if sharing() else None
            if seen is not None and seen[0] is spec and seen[1] is first and seen[2].name == n:
                tensors[n] = seen[2]  # inputs sharing shard headers share their specs, and these
                continue
            tensors[n] = info = TensorInfo(
                name=n, dtype=spec.dtype, shape=spec.shape, file=first.file, start=first.start,
                nbytes=math.prod(spec.shape) * itemsize(spec.dtype), codec=spec.codec,
                stored_nbytes=spec.stored_nbytes, row_align=spec.row_align)
            if sharing():
                _SERVED[id(spec)] = (spec, first, info)
        super().__init__(inner.url, inner.fs, inner.root, tensors, inner.files)
        self.header_digests = inner.header_digests
        self.inner = inner  # io.formats.WrapsReader: identity and resume look through the view
        self.scheme = scheme
        self.specs = specs
        self._codecs = {s.codec: get_codec(s.codec) for s in specs.values()}
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"QuantizedView({self.inner!r}, {self.scheme.method}, quantized={len(self.specs)})"

    @property
    def quantized(self) -> dict[str, QuantSpec]:
        """Logical name -> how it is stored (the same dict as `specs`)."""
        return self.specs

    @property
    def quantization_config(self) -> dict[str, Any]:
        """The input's `quantization_config` as read (empty for FP8 pairs without a config)."""
        return dict(self.scheme.config)

    def side_file(self, name: str) -> bytes | None:
        return self.inner.side_file(name)

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def _scratch(self, role: str, nbytes: int) -> memoryview:
        bufs: dict[str, bytearray] | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        buf = bufs.get(role)
        if buf is None or len(buf) < nbytes:
            buf = bufs[role] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        spec = self.specs.get(name)
        if spec is None:
            self.inner.read_rows(name, r0, r1, out)
            return
        codec = self._codecs[spec.codec]
        row_len = spec.row_len
        served = to_torch(spec.dtype)
        need = (r1 - r0) * row_len * served.itemsize
        if len(out) < need:
            raise ValueError(f"buffer of {len(out)} bytes is too small for {need}")
        if r1 <= r0:
            return
        dst = torch.frombuffer(out, dtype=served, count=(r1 - r0) * row_len).view(r1 - r0, row_len)
        align = max(1, spec.row_align)
        band = max(1, BAND_BYTES // max(1, row_len * 4) // align) * align
        a = r0
        while a < r1:
            b = min(r1, (a // align) * align + band)
            parts = {}
            for part in spec.parts:
                p0, p1 = codec.part_rows(spec, part, a, b)
                raw = self._scratch(part.role, (p1 - p0) * part.row_len * itemsize(part.dtype))
                self.inner.read_rows(part.name, p0, p1, raw)
                dt = to_torch(part.dtype)
                parts[part.role] = torch.frombuffer(raw, dtype=torch.uint8).view(dt).view(p1 - p0, part.row_len) \
                    if len(raw) else torch.empty(0, part.row_len, dtype=dt)
            try:
                if served == torch.float32:  # straight into the caller's buffer: no band temporary
                    codec.dequantize_rows(spec, parts, a, b, out=dst[a - r0:b - r0])
                else:
                    dst[a - r0:b - r0].copy_(codec.dequantize_rows(spec, parts, a, b))
            except CheckpointError as e:  # a codec's check of the stored data: say which checkpoint
                raise CheckpointError(f"{self.url}: {e}") from e
            a = b

    def read_stored(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        """Rows [r0, r1) of quantized tensor `name` as stored: each part's rows into `out` at
        its place in `io.quant.stored.stored_layout` (one exact range read per part), for a
        consumer that dequantizes as it computes. Nothing is checked or dequantized here."""
        from moemerge.io.quant.stored import stored_layout, stored_nbytes

        spec = self.specs[name]
        if len(out) < stored_nbytes(spec, r0, r1):
            raise ValueError(f"buffer of {len(out)} bytes is too small for {stored_nbytes(spec, r0, r1)}")
        for part, off, p0, p1 in stored_layout(spec, r0, r1):
            self.inner.read_rows(part.name, p0, p1, out[off:off + (p1 - p0) * part.row_len * itemsize(part.dtype)])

    def check_ue8m0(self) -> None:
        """Read every block scale of a `scale_fmt: ue8m0` checkpoint and refuse the first one
        that is not a power of two (CheckpointError naming it), when they total at most
        UE8M0_SCAN_BYTES; larger ones are checked block by block on read (`dequantize_rows`)."""
        from moemerge.io.quant.block_fp8 import check_pow2, scale_values

        if not self.scheme.ue8m0:
            return
        scales = [(s, s.part("scale")) for s in self.specs.values() if s.codec == "fp8-block"]
        if sum(p.nbytes for _, p in scales) > UE8M0_SCAN_BYTES:
            return
        for spec, part in scales:
            raw = self._scratch("scan", part.nbytes)
            self.inner.read_rows(part.name, 0, part.rows, raw)
            vals = torch.frombuffer(raw, dtype=torch.uint8).view(to_torch(part.dtype)).view(part.rows, part.row_len) \
                if len(raw) else torch.empty(0, part.row_len)
            try:
                check_pow2(spec, scale_values(vals), 0)
            except CheckpointError as e:
                raise CheckpointError(f"{self.url}: {e}") from e

    def close(self) -> None:
        self.inner.close()
