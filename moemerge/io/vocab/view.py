"""A checkpoint view serving an input's vocabulary tensors (embedding, lm_head) re-indexed to the
output vocabulary: row t is the input's own row for token t, or the row MergeKit's rule gives a
model lacking t (read from the other inputs), or, past the tokens, the mean row (padding).

Why a view: the planner and the engine then see inputs whose vocabulary tensors already have the
output's shape, and stream them row-chunk by row-chunk as any tensor (budgets, Dask, resume
unchanged); only this file knows rows move. Each read gathers the chunk's source rows in runs
of at most BAND_BYTES (scattered rows are read one run each), so the extra memory per reading
thread is one run and one batch of float32 default rows, however big the embedding.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint, TensorInfo
from moemerge.io.dtypes import is_float, itemsize, to_torch
from moemerge.io.vocab.build import Vocabulary

__all__ = ["VocabView", "BAND_BYTES"]

#: Bytes of one run read (and of one batch of float32 default rows), at least one row.
BAND_BYTES = 4 << 20
#: Needed rows this close together are read as one run (the rows between are read and dropped).
_GAP = 8


def _read_at(ck: Checkpoint, name: str, rows: Sequence[int], row_bytes: int, put: Any) -> None:
    """Read rows `rows` of `ck`'s tensor `name`; `put(k, data)` receives, for the k-th requested
    row, its bytes (a uint8 tensor of `row_bytes`). Rows are read in runs (sorted, gaps up to
    _GAP, at most BAND_BYTES each)."""
    order = sorted(range(len(rows)), key=lambda k: rows[k])
    most = max(1, BAND_BYTES // max(1, row_bytes))
    i = 0
    while i < len(order):
        start = rows[order[i]]
        j = i + 1
        while j < len(order) and rows[order[j]] - rows[order[j - 1]] <= _GAP and rows[order[j]] - start < most:
            j += 1
        end = rows[order[j - 1]] + 1
        buf = bytearray((end - start) * row_bytes)
        ck.read_rows(name, start, end, memoryview(buf))
        run = (torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)).view(
            end - start, row_bytes)
        for k in order[i:j]:
            put(k, run[rows[k] - start])
        i = j


class VocabView(Checkpoint):
    """Input `index` of `vocab.sources`, its vocabulary tensors served with `vocab.size` rows.

    A wrapper (io.formats.WrapsReader): reads go through `inner` (owned: `close` closes it);
    rows a model lacks come from `peers` (the inputs in `vocab.sources` order, not owned)."""

    def __init__(self, inner: Checkpoint, index: int, vocab: Vocabulary, peers: Sequence[Checkpoint]) -> None:
        names = vocab.tensors[vocab.sources[index]]
        tensors = dict(inner.tensors)
        for n in names:
            t = inner.tensors[n]
            if t.codec is not None or not is_float(t.dtype):
                raise CheckpointError(f"{inner.url}: tensor `{n}` is {t.codec or t.dtype}; re-indexing the "
                                      "vocabulary needs a plain float embedding")
            shape = (vocab.size, *t.shape[1:])
            tensors[n] = replace(t, shape=shape, nbytes=math.prod(shape) * itemsize(t.dtype))
        super().__init__(inner.url, inner.fs, inner.root, tensors, inner.files)
        self.header_digests = inner.header_digests
        self.inner = inner  # io.formats.WrapsReader: identity and resume look through the view
        self.index = index
        self.vocab = vocab
        self.peers = tuple(peers)
        self._names = frozenset(names)
        self._means: dict[str, torch.Tensor] = {}
        self._mean_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VocabView({self.inner!r}, rows={self.vocab.size}, tensors={sorted(self._names)})"

    # a dequantizing view underneath stays visible to planner.quant
    @property
    def specs(self) -> Any:
        return getattr(self.inner, "specs", None)

    @property
    def scheme(self) -> Any:
        return getattr(self.inner, "scheme", None)

    def side_file(self, name: str) -> bytes | None:
        return self.inner.side_file(name)

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None:
        if name not in self._names:
            self.inner.read_rows(name, r0, r1, out)
            return
        t = self.tensors[name]
        rb = t.row_bytes
        need = (r1 - r0) * rb
        if len(out) < need:
            raise ValueError(f"buffer of {len(out)} bytes is too small for {need}")
        if r1 <= r0:
            return
        dst = torch.frombuffer(out, dtype=torch.uint8, count=need).view(r1 - r0, rb)
        n = self.vocab.n_tokens
        if r0 < n:
            self._tokens(name, t, r0, min(r1, n), dst[:min(r1, n) - r0])
        if r1 > n:  # padding rows: the mean of the token rows (MergeKit, after Hewitt's vocab expansion)
            mean = self._mean(name, t).to(to_torch(t.dtype)).view(torch.uint8)
            dst[max(r0, n) - r0:] = mean

    def _tokens(self, name: str, t: TensorInfo, r0: int, r1: int, dst: torch.Tensor) -> None:
        """Rows r0..r1 (< n_tokens) of the re-indexed tensor into `dst` (uint8 rows)."""
        own = self.vocab.own[self.index]
        mine = [(k, own[r]) for k, r in enumerate(range(r0, r1)) if own[r] >= 0]
        if mine:
            def put(k: int, data: torch.Tensor) -> None:
                dst[mine[k][0]] = data

            _read_at(self.inner, name, [r for _, r in mine], t.row_bytes, put)
        lacking = [k for k, r in enumerate(range(r0, r1)) if own[r] < 0]
        if not lacking:
            return
        dtype = to_torch(t.dtype)
        per_row = max(1, max(len(self.vocab.recipes[r0 + k].terms) for k in lacking)) * t.row_len * 4
        batch = max(1, BAND_BYTES // per_row)
        for b in range(0, len(lacking), batch):
            ks = lacking[b:b + batch]
            rows = self._defaults(name, t.row_len, [r0 + k for k in ks])
            dst[ks] = rows.to(dtype).view(torch.uint8).view(len(ks), t.row_bytes)

    def _defaults(self, name: str, row_len: int, tokens: Sequence[int]) -> torch.Tensor:
        """float32 rows of `tokens` as MergeKit makes them for a model lacking them: the sum of
        the recipe's rows, added in order from zero, divided by their count (one row: a copy;
        none: zero)."""
        terms = [self.vocab.recipes[tok].terms for tok in tokens]
        got: dict[tuple[int, int], torch.Tensor] = {}
        wanted: dict[int, dict[int, None]] = {}  # per peer, its rows in first-use order, once each
        for ts in terms:
            for i, row in ts:
                wanted.setdefault(i, {})[row] = None
        by_peer = {i: list(rows) for i, rows in wanted.items()}
        for i, rows in by_peer.items():
            peer = self.peers[i]
            info = peer.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{peer.url}: has no tensor `{name}`, whose row for a token another model "
                                      "lacks is needed")
            pdt = to_torch(info.dtype)

            def put(k: int, data: torch.Tensor, i: int = i, rows: list[int] = rows, pdt: torch.dtype = pdt) -> None:
                got[(i, rows[k])] = data.clone().view(pdt).to(torch.float32)

            _read_at(peer, name, rows, info.row_bytes, put)
        out = torch.zeros(len(tokens), row_len, dtype=torch.float32)
        for k, ts in enumerate(terms):
            if len(ts) == 1:
                out[k] = got[ts[0]]
            elif ts:
                acc = torch.zeros(row_len, dtype=torch.float32)
                for term in ts:
                    acc = acc + got[term]
                out[k] = acc / len(ts)
        return out

    def _mean(self, name: str, t: TensorInfo) -> torch.Tensor:
        """The mean of the re-indexed token rows (float32), computed once, streaming."""
        with self._mean_lock:
            if name in self._means:
                return self._means[name]
            n = self.vocab.n_tokens
            step = max(1, BAND_BYTES // max(1, t.row_bytes))
            total = torch.zeros(t.row_len, dtype=torch.float64)
            buf = bytearray(min(n, step) * t.row_bytes)
            dtype = to_torch(t.dtype)
            for a in range(0, n, step):
                b = min(n, a + step)
                view = torch.frombuffer(buf, dtype=torch.uint8, count=(b - a) * t.row_bytes).view(b - a, t.row_bytes)
                self._tokens(name, t, a, b, view)
                total += view.view(dtype).to(torch.float64).sum(dim=0)
            self._means[name] = (total / n).to(torch.float32)
            return self._means[name]

    def close(self) -> None:
        self.inner.close()
