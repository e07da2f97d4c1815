"""The fast statistics kernels against their plain whole-array formulas (same values, bit for bit).

The blocked kernels in `moemerge.methods.stats` and the tie-break in `_selection.top_mask`
replace chunk-sized float64/uint64 temporaries and cumulative sums; the methods' outputs must
not change, so each kernel is checked here against the formula it replaces, on fresh random
data of shapes that straddle the block size.
"""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest
import torch

from moemerge.methods import stats
from moemerge.methods._memo import ScratchMemo
from moemerge.methods._selection import top_mask
from moemerge.methods.stats import Threshold

SHAPES = [(1, 1), (3, 5), (300, 1), (7, stats.BLOCK + 3), (2 * stats.BLOCK // 100 + 1, 100), (41, 333)]


def _reference_uniform(key: int, start: int, count: int) -> np.ndarray:
    """splitmix64 over the whole range at once (the formula `uniform` is defined by)."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + count, dtype=np.uint64)
        z *= np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64(key)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _rand(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values over many magnitudes (exact sums must cope with wide exponent ranges)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = torch.exp2(torch.randint(-30, 30, shape, generator=gen).to(torch.float64))
    return (x * scale).to(dtype)


@pytest.mark.parametrize("start,count", [(0, 1), (12_345, 3 * stats.BLOCK + 17), (2**40 + 3, 1000), (5, 0)])
def test_uniform_and_random_keep_match_the_formula(start: int, count: int) -> None:
    key = stats.stream_key(11, "model.layers.0.mlp.up_proj.weight", 2)
    ref = _reference_uniform(key, start, count)
    u = stats.uniform(key, start, count)
    assert u.dtype == torch.float64 and np.array_equal(u.numpy(), ref)
    probes = [0.0, -0.5, 1e-300, 0.3, 0.5, 0.999999999, 1.0, 1.7]
    probes += [float(v) for v in ref[:20]] + [float(np.nextafter(v, 2.0)) for v in ref[:20]]
    for p in probes:  # thresholds equal to a draw must compare exactly like the float
        keep = stats.random_keep(key, start, count, p)
        assert keep.dtype == torch.bool and np.array_equal(keep.numpy(), ref < p), p


def test_random_keep_writes_into_a_given_buffer() -> None:
    key = stats.stream_key(1, "t", 0)
    out = torch.ones(1000, dtype=torch.bool)
    got = stats.random_keep(key, 77, 1000, 0.4, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert np.array_equal(out.numpy(), _reference_uniform(key, 77, 1000) < 0.4)
    with pytest.raises(ValueError, match="bool tensor of 999"):
        stats.random_keep(key, 0, 999, 0.4, out=out)


@pytest.mark.parametrize("shape", SHAPES + [(4, 3, 9), (17,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_dot_and_abs_sums_equal_the_float64_formula(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(math.prod(shape) + (dtype == torch.float64))
    a, b = _rand(shape, gen, dtype), _rand(shape, gen, dtype)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    assert stats.exact_dot(a, b) == stats.exact_row_sum(a64 * b64)
    assert stats.exact_dot(a, a) == stats.exact_row_sum(a64 * a64)
    keep = torch.rand(shape, generator=gen) < 0.4
    assert stats.exact_abs_sums(a, keep) == (stats.exact_row_sum(a64.abs()), stats.exact_row_sum(a64.abs() * keep))
    if len(shape) > 1:
        rows = (a64 * b64).numpy().reshape(shape[0], -1).sum(axis=1)
        assert np.array_equal(stats.dot_rows(a, b), rows)
        # the value itself: the correctly rounded exact sum of the numpy row sums
        assert stats.exact_value(stats.exact_dot(a, b)) == math.fsum(rows.tolist())


def test_exact_dot_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        stats.exact_dot(torch.ones(3, 4), torch.ones(4, 3))


def test_histograms_match_boolean_selection() -> None:
    gen = torch.Generator().manual_seed(5)
    x = _rand((257, 129), gen).abs()
    x[0, :7] = 0.0
    x[1, 0] = float("inf")
    bits = torch.cat([x.reshape(-1).view(torch.int32),
                      torch.tensor([0x7FFFFFFF, 0, 1, 0xFFFF, 0x10000, 0x7FFF0000], dtype=torch.int32)])
    buf = torch.empty(bits.numel() + 5, dtype=torch.int32)
    ref_high = torch.bincount((bits >> 16).to(torch.int64), minlength=1 << 15)
    assert torch.equal(stats.high_histogram(bits), ref_high)
    assert torch.equal(stats.high_histogram(bits, out=buf), ref_high)
    highs = {0, 1, 0x7FFF, 0x7F80} | set((bits[:300] >> 16).tolist())
    for high in highs:
        sel = bits[(bits >> 16) == high]
        ref_low = torch.bincount((sel & 0xFFFF).to(torch.int64), minlength=1 << 16)
        assert torch.equal(stats.low_histogram(bits, high, out=buf), ref_low), high
        assert torch.equal(stats.low_histogram(bits, high), ref_low), high


def _tied_bits(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Non-negative float32 patterns from a coarse grid: many values tie."""
    v = torch.randint(0, 40, (rows, cols), generator=gen).to(torch.float32) * 2.0**-9
    return v.view(torch.int32)


@pytest.mark.parametrize("q", [0, 1, 37, 500, 1299, 1300])
def test_top_mask_keeps_the_q_largest_lowest_index_first_for_any_chunking(q: int) -> None:
    gen = torch.Generator().manual_seed(q)
    bits = _tied_bits(50, 26, gen)
    flat = bits.reshape(-1).to(torch.int64)
    # reference: stable sort by value descending keeps lower flat indices first among ties
    order = sorted(range(flat.numel()), key=lambda j: (-int(flat[j]), j))
    ref = torch.zeros(flat.numel(), dtype=torch.bool)
    ref[order[:q]] = True
    if q == 0:
        thr = Threshold(bits=0x7FFFFFFF, above=0, equal=0, q=0)
    else:
        t = int(flat[order[q - 1]])
        thr = Threshold(bits=t, above=int((flat > t).sum()), equal=int((flat == t).sum()), q=q)
    per_row = (bits == thr.bits).sum(dim=1).numpy()
    ties = np.concatenate(([0], np.cumsum(per_row)))
    for rows_per_chunk in (1, 3, 7, 50):
        got = torch.cat([
            top_mask(bits[r:r + rows_per_chunk], thr, ties, r) for r in range(0, bits.shape[0], rows_per_chunk)
        ])
        assert torch.equal(got.reshape(-1), ref), rows_per_chunk
        out = torch.ones(bits[:rows_per_chunk].shape, dtype=torch.bool)
        assert top_mask(bits[:rows_per_chunk], thr, ties, 0, out=out).data_ptr() == out.data_ptr()
    assert int(ref.sum()) == q


class _Chunk:
    """A stand-in chunk: the memo looks at identity, tensor, rows and scratch buffers only."""

    n_inputs = 2

    def __init__(self, slabs: list[torch.Tensor], name: str = "w", rows: tuple[int, int] = (0, 4)) -> None:
        self.name = name
        self.row_start, self.row_stop = rows
        self._slabs = slabs

    def scratch(self, k: int) -> torch.Tensor:
        return self._slabs[k]


def test_scratch_memo_matches_the_same_read_only_while_it_is_alive() -> None:
    memo = ScratchMemo(lambda n: n + 1)
    slabs = [torch.empty(4, 8) for _ in range(3)]
    a = _Chunk(slabs)
    memo.set(a, "deltas")
    memo.add(a, "var")
    assert memo.has(a, "deltas") and memo.has(a, "var") and not memo.has(a, "masked")
    # apply's own view of the same read (same tensor, rows, buffers) while a is alive: a match
    sibling = _Chunk([s[:] for s in slabs])
    assert memo.has(sibling, "var")
    for other in (_Chunk(slabs, name="v"), _Chunk(slabs, rows=(4, 8)), _Chunk([torch.empty(4, 8) for _ in range(3)])):
        assert not memo.has(other, "var")
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(memo.has(a, "deltas")))
    t.start()
    t.join()
    assert seen == [False], "another thread has its own chunks and scratch buffers"
    memo.drop(sibling, "var")
    assert memo.has(a, "deltas") and not memo.has(a, "var")
    b = _Chunk(slabs, rows=(4, 8))
    memo.add(b, "var")  # another read: a's tags are gone
    assert memo.has(b, "var") and not memo.has(a, "deltas") and not memo.has(b, "deltas")
    del b
    gc.collect()
    # the recorded read is gone: even an identical-looking chunk must not inherit its tags
    assert not memo.has(_Chunk(slabs, rows=(4, 8)), "var")
    c = _Chunk(slabs)
    memo.set(c, "x")
    memo.clear()
    assert not memo.has(c, "x")


def test_float64_kernels_split_across_threads_give_the_same_values() -> None:
    """Big chunks are cut into row ranges run on several threads: the values must not change."""
    gen = torch.Generator().manual_seed(9)
    shape = (97, 4 * stats.BLOCK // 50)  # ~8 blocks: 4 threads get ranges of uneven length
    a, b, c = (_rand(shape, gen) for _ in range(3))
    keep = torch.rand(shape, generator=gen) < 0.3
    a64, b64, c64 = (t.to(torch.float64) for t in (a, b, c))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        pairs = [(0, 1), (0, 0), (1, 2), (2, 2)]
        vs = (a64, b64, c64)
        assert stats.exact_dots_of([a, b, c], pairs) == [stats.exact_row_sum(vs[i] * vs[j]) for i, j in pairs]
        assert np.array_equal(stats.dot_rows(a, b), (a64 * b64).numpy().sum(axis=1))
        assert stats.exact_abs_sums(a, keep) == (stats.exact_row_sum(a64.abs()), stats.exact_row_sum(a64.abs() * keep))
    finally:
        torch.set_num_threads(before)
