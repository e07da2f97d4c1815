"""A selection over a tensor streamed in several chunks reads it twice (statistics, then
apply) when its chunks look alike (else pass 1's windows miss and the fallback passes run),
with the bytes of the torch path (which reads it up to four times), of one unchunked
read, and of any thread count; values tied at the threshold are broken by flat index.

Reads are counted where they happen (`Checkpoint.read_rows`), per input and tensor.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import moemerge
from moemerge.io.checkpoint import Checkpoint
from moemerge.methods import _fused
from conftest import write_checkpoint

pytestmark = pytest.mark.skipif(not _fused.available(), reason="numba is not available")

BIG = "model.layers.0.mlp.down_proj.weight"
SMALL = "model.layers.0.self_attn.o_proj.weight"  # 16 rows: one chunk
SHAPE = (192, 384)
ROWS_PER_CHUNK = 24  # 8 chunks


def _inputs(root: Path, kind: str, seed: int) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g) * 0.05
    small = torch.randn(16, SHAPE[1], generator=g)
    out = []
    for i in range(3):
        if i == 0:
            d = torch.zeros(SHAPE)
        elif kind == "tied":  # a coarse grid: many |d| equal the threshold
            d = torch.randint(-4, 5, SHAPE, generator=g).float() * 2.0**-7
        elif kind == "random":
            d = torch.randn(SHAPE, generator=g) * 0.01
        else:  # rows of growing scale: a chunk's own guess of the threshold misses the tensor's
            d = torch.randn(SHAPE, generator=g) * 0.01 * (1 + 3 * torch.arange(SHAPE[0]).float()[:, None] / SHAPE[0])
        out.append(write_checkpoint(root / f"m{i}", {BIG: (base + d).bfloat16(), SMALL: (small + d[:16]).bfloat16()}))
    return out


def _config(method: str, paths: list[Path]) -> dict[str, Any]:
    params = {"ties": {"density": 0.4}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05},
              "sce": {"select_topk": 0.4}}[method]
    return {"merge_method": method, "base_model": str(paths[0]),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths[1:], (0.6, 0.45))],
            "parameters": params, "dtype": "bfloat16"}


def _merge(config: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch, *, chunk_rows: int | None,
           threads: int | None = None) -> tuple[dict[str, bytes], Counter[tuple[str, str]]]:
    reads: Counter[tuple[str, str]] = Counter()
    orig = Checkpoint.read_rows

    def counting(self: Checkpoint, name: str, r0: int, r1: int, buf: memoryview) -> None:
        reads[(self.url, name)] += (r1 - r0) * self.tensors[name].row_bytes
        orig(self, name, r0, r1, buf)

    monkeypatch.setattr(Checkpoint, "read_rows", counting)
    before = torch.get_num_threads()
    try:
        moemerge.run(config, str(out), memory_budget="64MB", chunk_rows=chunk_rows, num_threads=threads,
                     copy_tokenizer=False)
    finally:
        torch.set_num_threads(before)
        monkeypatch.setattr(Checkpoint, "read_rows", orig)
    got = load_file(str(out / "model-00001-of-00001.safetensors"))
    return {k: v.view(torch.int16).numpy().tobytes() for k, v in got.items()}, reads


@pytest.mark.parametrize("kind", ["tied", "random", "rows"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "sce"])
def test_streamed_selection_reads_each_input_twice_with_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, kind: str) -> None:
    paths = _inputs(tmp_path, kind, seed=zlib.crc32(f"{method}-{kind}".encode()))
    config = _config(method, paths)
    if kind == "tied" and method == "ties":  # the case this is about: the threshold value is tied
        b = torch.from_numpy(load_file(str(paths[0] / "model.safetensors"))[BIG].float().numpy())
        x = load_file(str(paths[1] / "model.safetensors"))[BIG].float()
        v = np.sort((x - b).abs().reshape(-1).numpy())[::-1]
        k = math.floor(0.4 * v.size)
        assert (v > v[k - 1]).sum() < k < (v >= v[k - 1]).sum()
    plan = moemerge.plan(config, memory_budget="64MB", chunk_rows=ROWS_PER_CHUNK)
    big = next(t for t in plan.tensors if t.name == BIG)
    assert len(big.chunks) == SHAPE[0] // ROWS_PER_CHUNK
    got, reads = _merge(config, tmp_path / "fused", monkeypatch, chunk_rows=ROWS_PER_CHUNK)
    nbytes = math.prod(SHAPE) * 2
    for p in paths:
        (url,) = {u for u, n in reads if Path(u).resolve() == (p / "model.safetensors").resolve()
                  or Path(u).resolve() == p.resolve()}
        # sce's energies need the selection's mask: one pass more than the selection's one
        want = 3 if method == "sce" else 2
        if kind == "rows":  # the fallback passes (low bits, tie counts) run: more reads, same bytes
            assert want * nbytes <= reads[(url, BIG)] <= (want + 2) * nbytes
        else:
            assert reads[(url, BIG)] == want * nbytes, f"{method}: {reads[(url, BIG)] / nbytes} reads of {BIG}"
        assert reads[(url, SMALL)] == 16 * SHAPE[1] * 2, "a tensor that fits is read once"
    # the same bytes: one read of the whole tensor, one thread, the torch path (every pass)
    whole, _ = _merge(config, tmp_path / "whole", monkeypatch, chunk_rows=None)
    one, _ = _merge(config, tmp_path / "one", monkeypatch, chunk_rows=ROWS_PER_CHUNK, threads=1)
    odd, _ = _merge(config, tmp_path / "odd", monkeypatch, chunk_rows=7)
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    ref, ref_reads = _merge(config, tmp_path / "torch", monkeypatch, chunk_rows=ROWS_PER_CHUNK)
    assert max(ref_reads[k] for k in ref_reads if k[1] == BIG) >= 3 * nbytes  # the fallback's passes
    for name, other in (("whole", whole), ("1 thread", one), ("7 rows/chunk", odd), ("torch path", ref)):
        assert other == got, f"{method} {kind}: output differs from {name}"


def test_pattern_records_are_bounded_and_the_tie_pass_takes_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk keeps its counts of the patterns in its window for the tie-break; over a
    tensor of many chunks they would grow with its size, so past `_MAX_RECORDS` they are
    dropped and the tie-count pass runs: one read more, the same bytes."""
    from moemerge.methods import _selection

    paths = _inputs(tmp_path, "tied", seed=zlib.crc32(b"records"))
    config = _config("ties", paths)
    got, reads = _merge(config, tmp_path / "kept", monkeypatch, chunk_rows=ROWS_PER_CHUNK)
    monkeypatch.setattr(_selection, "_MAX_RECORDS", 0)
    capped, capped_reads = _merge(config, tmp_path / "capped", monkeypatch, chunk_rows=ROWS_PER_CHUNK)
    nbytes = math.prod(SHAPE) * 2
    big = [k for k in reads if k[1] == BIG]
    assert all(reads[k] == 2 * nbytes for k in big)
    assert all(capped_reads[k] == 3 * nbytes for k in big), {k: capped_reads[k] / nbytes for k in big}
    assert capped == got


@pytest.mark.parametrize("which", ["every", "some"])
def test_chunks_with_many_patterns_keep_dense_counts_with_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """A chunk whose window holds more than `_TIE_PATTERNS` distinct patterns keeps its counts
    as dense histograms instead of records (no per-chunk tie counts then): with every chunk,
    or some, so, the low bits still come from pass 1 (the tie-break takes its pass) and the
    bytes are those of the sparse records."""
    from moemerge.methods import _selection

    paths = _inputs(tmp_path, "tied", seed=zlib.crc32(f"dense-{which}".encode()))
    config = _config("ties", paths)
    seen: list[int] = []
    flatnonzero = np.flatnonzero

    def counting(a: Any) -> np.ndarray:  # each chunk's distinct patterns in its window
        out = flatnonzero(a)
        seen.append(out.size)
        return out

    monkeypatch.setattr(_selection.np, "flatnonzero", counting)
    got, _ = _merge(config, tmp_path / "sparse", monkeypatch, chunk_rows=ROWS_PER_CHUNK)
    patterns = 0 if which == "every" else int(np.median(seen))
    monkeypatch.setattr(_selection, "_TIE_PATTERNS", patterns)
    first = len(seen)
    dense, reads = _merge(config, tmp_path / "dense", monkeypatch, chunk_rows=ROWS_PER_CHUNK)
    counts = seen[first:]
    went_dense = sum(c > patterns for c in counts)
    assert 0 < went_dense and (which == "every" or went_dense < len(counts)), (patterns, counts)
    nbytes = math.prod(SHAPE) * 2
    for k in (k for k in reads if k[1] == BIG):
        assert reads[k] == 3 * nbytes, f"dense chunks: low bits from pass 1, the tie pass after ({reads[k] / nbytes})"
    assert dense == got
