"""FP8 block-scaled weights (DeepSeek-V3 style), dequantized on read.

A weight `X` stored as `F8_E4M3` with a sibling `X_scale_inv` (`F32`, one value per 128 x 128
tile, `formats.md`) is served as a `BF16` tensor of the same shape: rows are read as fp8 bytes,
multiplied tile by tile by their scale in float32 and rounded once to bf16; the `_scale_inv`
tensors are not served at all. The merge then sees plain bf16 weights. Work is done one band of
tile rows at a time, so the extra memory is a few bands (128 rows) per reading thread, however
big the tensor or the chunk.

Example::

    ck = dequantizing(Checkpoint.open("deepseek-v3"))   # the same checkpoint if it has no FP8
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint, TensorInfo

__all__ = ["dequantizing", "BLOCK", "SCALE_SUFFIX"]

#: Tile edge of DeepSeek-V3's block quantization (`weight_block_size: [128, 128]`).
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
_FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def dequantizing(ck: Checkpoint) -> Checkpoint:
    """`ck` with every block-scaled FP8 weight served as bf16 (`ck` itself when it has none)."""
    pairs = {n: n + SCALE_SUFFIX for n, t in ck.tensors.items()
             if t.dtype in _FP8 and n + SCALE_SUFFIX in ck.tensors}
    if not pairs:
        return ck
    for name, scale in pairs.items():
        _check(ck, ck.tensors[name], ck.tensors[scale])
    return _Dequantized(ck, pairs)


def _check(ck: Checkpoint, w: TensorInfo, s: TensorInfo) -> None:
    where = f"{ck.url}/{w.file}"
    if len(w.shape) != 2:
        raise CheckpointError(f"{where}: FP8 tensor `{w.name}` has shape {list(w.shape)}; block scales "
                              "are supported for 2-D weights only")
    want = tuple(-(-d // BLOCK) for d in w.shape)
    if s.dtype != "F32" or s.shape != want:
        raise CheckpointError(
            f"{where}: `{s.name}` is {s.dtype} {list(s.shape)}; a {BLOCK}x{BLOCK} block scale of "
            f"`{w.name}` {list(w.shape)} must be F32 {list(want)}")


class _Dequantized(Checkpoint):
    """A checkpoint view: FP8 weights as bf16, their scales hidden; everything else as is."""

    def __init__(self, inner: Checkpoint, pairs: dict[str, str]) -> None:
        hidden = set(pairs.values())
        tensors = {n: t for n, t in inner.tensors.items() if n not in hidden}
        for n in pairs:
            t = inner.tensors[n]
            tensors[n] = replace(t, dtype="BF16", nbytes=t.nbytes * 2)
        super().__init__(inner.url, inner.fs, inner.root, tensors, inner.files)
        self.inner = inner
        self.pairs = pairs
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Dequantized({self.inner!r}, fp8={len(self.pairs)})"

    def side_file(self, name: str) -> bytes | None:
        return self.inner.side_file(name)

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def _scratch(self, nbytes: int) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = bytearray(nbytes)
        return buf

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        scale_name = self.pairs.get(name)
        if scale_name is None:
            self.inner.read_rows(name, r0, r1, out)
            return
        w = self.inner.tensors[name]
        cols = w.shape[1]
        if len(out) < (r1 - r0) * cols * 2:
            raise ValueError(f"buffer of {len(out)} bytes is too small for {(r1 - r0) * cols * 2}")
        s = self.inner.tensors[scale_name]
        fp8 = _FP8[w.dtype]
        dst = torch.frombuffer(out, dtype=torch.bfloat16, count=(r1 - r0) * cols) if r1 > r0 else None
        for a, b in _bands(r0, r1):
            tile = a // BLOCK
            raw = self._scratch(((b - a) * cols + 4 * s.shape[1]))
            q = memoryview(raw)[:(b - a) * cols]
            sc = memoryview(raw)[(b - a) * cols:(b - a) * cols + 4 * s.shape[1]]
            self.inner.read_rows(name, a, b, q)
            self.inner.read_rows(scale_name, tile, tile + 1, sc)
            values = torch.frombuffer(q, dtype=torch.uint8).view(fp8).reshape(b - a, cols).to(torch.float32)
            scale = torch.frombuffer(sc, dtype=torch.float32).repeat_interleave(BLOCK)[:cols]
            assert dst is not None
            dst[(a - r0) * cols:(b - r0) * cols].view(b - a, cols).copy_(values.mul_(scale))

    def close(self) -> None:
        self.inner.close()


def _bands(r0: int, r1: int) -> Iterator[tuple[int, int]]:
    """Rows [r0, r1) cut at tile-row boundaries: _bands(100, 300) -> (100, 128), (128, 256), (256, 300)."""
    a = r0
    while a < r1:
        b = min(r1, (a // BLOCK + 1) * BLOCK)
        yield a, b
        a = b
