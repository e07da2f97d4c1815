"""Streaming statistics that do not depend on how a tensor was cut into chunks.

- Exact sums: each chunk's contribution is a Python int (the exact sum of its float64
  per-row partials, scaled by 2^1127), so partials add exactly in any order and the final
  value is the correctly rounded float of the exact sum. Rows never split across chunks,
  and numpy sums each contiguous row the same way whatever the rows around it, so the
  result is identical for every chunking, worker count and order.
- Exact selection: the k-th largest value of a non-negative float32 tensor from its bit
  patterns (non-negative floats order like their bits): a 32,768-bin histogram of the high
  16 bits, then a 65,536-bin histogram of the low 16 bits inside the chosen bin. No sort,
  no sampling; histograms are small integers and add exactly.
- Counter-based randomness: uniform numbers from a hash of (seed, tensor, input, flat
  position), so a mask never depends on chunking.

The float64 and uint64 kernels work in cache-sized blocks of `BLOCK` elements into small
reused buffers: no chunk-sized float64 or uint64 temporaries, and every value is the same
as the whole-array formula's (products of float32 values are exact in float64; rows are
summed by numpy one row at a time wherever they are cut).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._host import host_copy, on_host

__all__ = [
    "BLOCK",
    "exact_row_sum",
    "exact_dot",
    "exact_dots_of",
    "dot_rows",
    "exact_abs_sums",
    "exact_value",
    "Threshold",
    "high_histogram",
    "low_histogram",
    "pick_high_bin",
    "pick_threshold",
    "uniform",
    "random_keep",
    "stream_key",
]

#: Elements per block of the float64/uint64 kernels (512 KiB of float64: stays in L2).
BLOCK = 1 << 16

_SCALE_BITS = 1074 + 53  # 2^-1074 is the smallest subnormal; mantissas are 53-bit integers
_GROUP = 512  # int64 mantissas (< 2^53) summed 512 at a time stay below 2^62


def _exact_int(values: np.ndarray) -> int:
    """Exact sum of float64 `values`, as an integer multiple of 2^-1127."""
    v = values[values != 0]
    if v.size == 0:
        return 0
    if not np.all(np.isfinite(v)):
        raise FloatingPointError("non-finite value in a statistic")
    mant, exp = np.frexp(v)
    ints = np.ldexp(mant, 53).astype(np.int64)  # exact: |mant| < 1 has 53 significant bits
    total = 0
    order = np.argsort(exp, kind="stable")
    exp_sorted = exp[order]
    ints_sorted = ints[order]
    bounds = np.flatnonzero(np.diff(exp_sorted)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [exp_sorted.size]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        seg = ints_sorted[s:e]
        full = seg.size // _GROUP * _GROUP
        acc = int(seg[full:].sum()) + sum(int(x) for x in seg[:full].reshape(-1, _GROUP).sum(axis=1).tolist())
        total += acc << int(exp_sorted[s] - 53 + _SCALE_BITS)
    return total


def exact_row_sum(x: torch.Tensor) -> int:
    """The exact-sum partial of a [rows, row_len] float64 tensor (sum over all elements).

    Each row is summed by numpy (same pairwise order for a row wherever it sits), then the
    row sums are added exactly.
    """
    a = x.detach().to("cpu", torch.float64).numpy()
    if a.ndim == 1:
        return _exact_int(a)
    return _exact_int(a.reshape(a.shape[0], -1).sum(axis=1))


def _rows(x: torch.Tensor) -> np.ndarray:
    """A [rows, row_len] numpy view of a CPU tensor (a copy only if it is not contiguous)."""
    t = host_copy(x.detach())  # off the host: a copy (same values, so the same sums)
    a = t.contiguous().numpy()
    if a.ndim <= 1:
        return a
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))


def _row_step(row_len: int) -> int:
    return max(1, BLOCK // max(1, row_len))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _for_row_ranges(rows: int, row_len: int, body: Callable[[int, int], None]) -> None:
    """body(r0, r1) over [0, rows), split among torch's intra-op thread count.

    numpy's float64 loops run on one core; each range is independent (its own buffers, its
    own slice of the row sums), so the split does not change any value. Small chunks run inline.
    """
    run_ranges(row_ranges(rows, row_len), body)


def run_ranges(ranges: Sequence[tuple[int, int]], body: Callable[[int, int], None]) -> None:
    """body(r0, r1) for each range, on the pool's threads (inline when there is one range)."""
    global _pool
    if len(ranges) <= 1:
        for r0, r1 in ranges:
            body(r0, r1)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < len(ranges):  # noqa: SLF001 (grow once)
            _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="moemerge-stats")
        pool = _pool
    for f in [pool.submit(body, r0, r1) for r0, r1 in ranges]:
        f.result()


def row_ranges(rows: int, row_len: int) -> list[tuple[int, int]]:
    """The row ranges `_for_row_ranges` splits [0, rows) into: one per thread it uses."""
    workers = min(torch.get_num_threads(), 8, rows * row_len // (4 * BLOCK))
    if workers <= 1:
        return [(0, rows)]
    per = -(-rows // workers)
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def dot_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-row sums of a.double() * b.double() ([rows, ...] tensors; a 1-D tensor is rows of one),
    each row summed by numpy, in row blocks (no float64 copy of the chunk). `b` may be `a`."""
    x = _rows(a if a.ndim > 1 else a.reshape(-1, 1))
    y = x if b is a else _rows(b if b.ndim > 1 else b.reshape(-1, 1))
    if x.shape != y.shape:
        raise ValueError(f"dot_rows: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    rows, row_len = x.shape
    sums = np.empty(rows, np.float64)
    step = _row_step(row_len)

    def body(r0: int, r1: int) -> None:
        buf = np.empty(min(step, r1 - r0) * row_len, np.float64)
        for r in range(r0, r1, step):
            k = min(step, r1 - r)
            p = buf[:k * row_len].reshape(k, row_len)
            np.multiply(x[r:r + k], y[r:r + k], out=p, dtype=np.float64)  # exact: 24 + 24 bits < 53
            p.sum(axis=1, out=sums[r:r + k])

    _for_row_ranges(rows, row_len, body)
    return sums


def exact_dots_of(vectors: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]]) -> list[int]:
    """`[exact_dot(vectors[i], vectors[j]) for i, j in pairs]`, converting each row block of
    each vector to float64 once (a Gram matrix of n vectors reads each n times otherwise)."""
    if any(v.ndim <= 1 for v in vectors):
        return [exact_dot(vectors[i], vectors[j]) for i, j in pairs]
    xs = [_rows(v) for v in vectors]
    if len({x.shape for x in xs}) > 1:
        raise ValueError(f"exact_dots_of: shapes {[tuple(v.shape) for v in vectors]} differ")
    rows, row_len = xs[0].shape
    if rows == 0:
        return [0] * len(pairs)
    step = _row_step(row_len)
    used = sorted({k for pair in pairs for k in pair})
    sums = np.empty((len(pairs), rows), np.float64)

    def body(r0: int, r1: int) -> None:
        size = min(step, r1 - r0) * row_len
        bufs = {i: np.empty(size, np.float64) for i in used}
        prod = np.empty(size, np.float64)
        for r in range(r0, r1, step):
            k = min(step, r1 - r)
            blk = {i: bufs[i][:k * row_len].reshape(k, row_len) for i in used}
            for i in used:
                np.copyto(blk[i], xs[i][r:r + k])  # exact: float32 -> float64
            p = prod[:k * row_len].reshape(k, row_len)
            for m, (i, j) in enumerate(pairs):
                np.multiply(blk[i], blk[j], out=p)
                p.sum(axis=1, out=sums[m, r:r + k])

    _for_row_ranges(rows, row_len, body)
    return [_exact_int(sums[m]) for m in range(len(pairs))]


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> int:
    """`exact_row_sum(a.double() * b.double())`, in row blocks (no float64 copy of the chunk).

    `b` may be `a` (a squared norm).
    """
    if a.ndim > 1:
        return _exact_int(dot_rows(a, b))
    x = _rows(a)  # a 1-D tensor: every element is one addend, as in exact_row_sum
    y = x if b is a else _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"exact_dot: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    total = 0
    buf = np.empty(min(BLOCK, x.size), np.float64)
    for s in range(0, x.size, BLOCK):
        e = min(x.size, s + BLOCK)
        p = buf[:e - s]
        np.multiply(x[s:e], y[s:e], out=p, dtype=np.float64)
        total += _exact_int(p)
    return total


def exact_abs_sums(d: torch.Tensor, keep: torch.Tensor) -> tuple[int, int]:
    """Exact-sum partials of |d| and of |d| where `keep` (bool, d's shape), in row blocks.

    The same as `exact_row_sum(d.abs().double())` and `exact_row_sum(d.abs().double() * keep)`.
    """
    x = _rows(d)
    m = _rows(keep)
    if x.ndim == 1:
        a = np.abs(x).astype(np.float64)
        return _exact_int(a), _exact_int(a * m)
    rows, row_len = x.shape
    if rows == 0:
        return 0, 0
    step = _row_step(row_len)
    full = np.empty(rows, np.float64)
    kept = np.empty(rows, np.float64)

    def body(r0: int, r1: int) -> None:
        buf = np.empty(min(step, r1 - r0) * row_len, np.float64)
        for r in range(r0, r1, step):
            k = min(step, r1 - r)
            p = buf[:k * row_len].reshape(k, row_len)
            np.abs(x[r:r + k], out=p, casting="same_kind")
            p.sum(axis=1, out=full[r:r + k])
            np.multiply(p, m[r:r + k], out=p)
            p.sum(axis=1, out=kept[r:r + k])

    _for_row_ranges(rows, row_len, body)
    return _exact_int(full), _exact_int(kept)


def exact_value(partial: int) -> float:
    """The correctly rounded float of a sum of `exact_row_sum` partials."""
    return partial / (1 << _SCALE_BITS)  # int / int is correctly rounded in Python


def high_histogram(bits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of the high 16 bits of non-negative float32 patterns (32,768 bins, int64).

    `out`: an int32 buffer of bits' size for the shifted patterns (else one is allocated).
    """
    tmp = out.reshape(-1)[:bits.numel()] if out is not None else None
    shifted = torch.bitwise_right_shift(bits.reshape(-1), 16, out=tmp) if tmp is not None else bits.reshape(-1) >> 16
    return torch.bincount(shifted, minlength=1 << 15)


def low_histogram(bits: torch.Tensor, high: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of the low 16 bits of the patterns whose high 16 bits equal `high`.

    Patterns are clamped to the bin's edges and shifted to 1..65,536 (below the bin -> 0,
    above -> 65,537), so one bincount over the chunk needs no boolean selection. `out`: an
    int32 buffer of bits' size for the clamped patterns.
    """
    lo = (high << 16) - 1
    hi = min((high << 16) + (1 << 16), (1 << 31) - 1)  # nothing lies above 0x7FFFFFFF
    flat = bits.reshape(-1)
    if out is not None:
        idx = torch.clamp(flat, lo, hi, out=out.reshape(-1)[:flat.numel()])
    else:
        idx = torch.clamp(flat, lo, hi)
    idx.sub_(lo)
    return torch.bincount(idx, minlength=(1 << 16) + 2)[1:(1 << 16) + 1]


def pick_high_bin(hist: torch.Tensor, q: int) -> tuple[int, int]:
    """The high-bits bin holding the q-th largest value (1-based), and the count above it."""
    # counts at or above each bin, from the top: the first bin where that reaches q (numpy:
    # torch's flip + cumsum of 65,536 bins cost milliseconds, as often as there are targets)
    h = hist.detach().cpu().numpy() if isinstance(hist, torch.Tensor) else np.asarray(hist)
    from_top = np.cumsum(h[::-1].astype(np.int64, copy=False))
    idx = int(np.searchsorted(from_top, q, side="left"))
    if idx >= h.size:
        raise ValueError(f"q={q} is larger than the {int(from_top[-1])} values counted")
    b = h.size - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return b, above


@dataclass(frozen=True, slots=True)
class Threshold:
    """The q-th largest value's bit pattern, with how many values are above and equal to it.

    The set "the q largest, ties broken by lowest flat index" is: every value whose bits are
    above `bits`, plus the first `q - above` values equal to it in flat order.
    """

    bits: int
    above: int
    equal: int
    q: int

    @property
    def take_equal(self) -> int:
        return self.q - self.above

    @property
    def needs_tiebreak(self) -> bool:
        return 0 < self.take_equal < self.equal


def pick_threshold(low_hist: torch.Tensor, high: int, above_high: int, q: int) -> Threshold:
    """Refine `pick_high_bin`'s answer to the exact bit pattern of the q-th largest value."""
    b, above = pick_high_bin(low_hist, q - above_high)
    return Threshold(bits=(high << 16) | b, above=above_high + above, equal=int(low_hist[b]), q=q)


def stream_key(seed: int, tensor: str, input_index: int) -> int:
    """A 64-bit key for the random stream of one input of one tensor."""
    h = hashlib.blake2b(f"{seed}\x00{tensor}\x00{input_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_S30, _S27, _S31, _S11 = (np.uint64(k) for k in (30, 27, 31, 11))
#: position * golden (mod 2^64) for the positions of one block, computed once
_STEPS = np.arange(BLOCK, dtype=np.uint64) * np.uint64(_GOLDEN)


def _splitmix_blocks(key: int, start: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset, z) with z = splitmix64(key + (start + offset + j) * golden), block by block.

    z is a reused buffer: use it before asking for the next block.
    """
    z = np.empty(min(BLOCK, max(count, 1)), np.uint64)
    t = np.empty_like(z)
    with np.errstate(over="ignore"):
        for s in range(0, count, BLOCK):
            k = min(BLOCK, count - s)
            zz, tt = z[:k], t[:k]
            # (key + p * golden) mod 2^64, with p = start + s + j: a block constant plus j * golden
            np.add(_STEPS[:k], np.uint64((key + (start + s) * _GOLDEN) & _MASK64), out=zz)
            np.right_shift(zz, _S30, out=tt)
            zz ^= tt
            zz *= _M1
            np.right_shift(zz, _S27, out=tt)
            zz ^= tt
            zz *= _M2
            np.right_shift(zz, _S31, out=tt)
            zz ^= tt
            yield s, zz


def uniform(key: int, start: int, count: int) -> torch.Tensor:
    """Uniform floats in [0, 1) (float64) for flat positions start..start+count of a stream.

    splitmix64 of (key + position * golden): a counter-based generator, so the draw for a
    position is the same however the tensor is chunked. The float is (z >> 11) * 2^-53.
    """
    out = np.empty(count, np.float64)
    for s, z in _splitmix_blocks(key, start, count):
        np.right_shift(z, _S11, out=z)
        np.multiply(z, 1.0 / (1 << 53), out=out[s:s + z.size], casting="unsafe")
    return torch.from_numpy(out)


def random_keep(key: int, start: int, count: int, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """`uniform(key, start, count) < p` as a bool tensor (into `out` if given), without floats.

    u = m * 2^-53 with m = z >> 11 an integer, so u < p exactly when m < ceil(p * 2^53),
    i.e. when z < ceil(p * 2^53) * 2^11 (p * 2^53 is exact: a power-of-two scale).
    """
    if out is not None and not on_host(out):  # drawn on the host (numpy), then copied: same bits
        return out.reshape(-1).copy_(random_keep(key, start, count, p))
    res = torch.empty(count, dtype=torch.bool) if out is None else out.reshape(-1)
    if res.numel() != count or res.dtype != torch.bool:
        raise ValueError(f"random_keep: out must be a bool tensor of {count} elements")
    limit = math.ceil(p * 2.0**53) if p > 0 else 0
    if limit <= 0 or count == 0:
        res.fill_(False)
        return res
    if limit >= 1 << 53:  # every draw is below 1 <= p
        res.fill_(True)
        return res
    bound = np.uint64(limit << 11)
    r = res.numpy()
    for s, z in _splitmix_blocks(key, start, count):
        np.less(z, bound, out=r[s:s + z.size])
    return res
