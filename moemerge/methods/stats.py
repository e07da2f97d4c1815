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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "exact_row_sum",
    "exact_value",
    "Threshold",
    "high_histogram",
    "low_histogram",
    "pick_high_bin",
    "pick_threshold",
    "abs_bits",
    "uniform",
    "stream_key",
]

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


def exact_value(partial: int) -> float:
    """The correctly rounded float of a sum of `exact_row_sum` partials."""
    return partial / (1 << _SCALE_BITS)  # int / int is correctly rounded in Python


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns (int32) of |x| for float32 x: they order like the values."""
    return x.abs().view(torch.int32)


def high_histogram(bits: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of non-negative float32 patterns (32,768 bins, int64)."""
    return torch.bincount((bits >> 16).reshape(-1), minlength=1 << 15)


def low_histogram(bits: torch.Tensor, high: int) -> torch.Tensor:
    """Counts of the low 16 bits of the patterns whose high 16 bits equal `high`."""
    sel = bits.reshape(-1)
    sel = sel[(sel >> 16) == high]
    return torch.bincount(sel & 0xFFFF, minlength=1 << 16)


def pick_high_bin(hist: torch.Tensor, q: int) -> tuple[int, int]:
    """The high-bits bin holding the q-th largest value (1-based), and the count above it."""
    # counts at or above each bin, from the top: the first bin where that reaches q
    from_top = torch.cumsum(hist.flip(0), dim=0)
    idx = int(torch.searchsorted(from_top, torch.tensor([q], dtype=from_top.dtype)).item())
    if idx >= hist.numel():
        raise ValueError(f"q={q} is larger than the {int(from_top[-1])} values counted")
    b = hist.numel() - 1 - idx
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
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniform(key: int, start: int, count: int) -> torch.Tensor:
    """Uniform floats in [0, 1) (float64) for flat positions start..start+count of a stream.

    splitmix64 of (key + position * golden): a counter-based generator, so the draw for a
    position is the same however the tensor is chunked.
    """
    with np.errstate(over="ignore"):
        z = np.arange(start, start + count, dtype=np.uint64)
        z *= _GOLDEN
        z += np.uint64(key)
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))
