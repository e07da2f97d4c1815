"""Fused CPU kernels for the statistics methods (ties, dare, breadcrumbs, della, sce): one pass
over a chunk's stored inputs computes task vectors, histogram bins, masks and the sign vote,
in row ranges on every core, with the same bits as the torch path (tests/test_select_kernels.py).
`weighted_into` does the same for the weighted sums (linear, sma, ...): the read buffer straight
into the write buffer (tests/test_linear_kernel.py).

Each entry point returns None when it cannot run (numba missing or off with MOEMERGE_NO_NUMBA=1,
a device other than the CPU, a compute dtype other than float32, inputs cast or of mixed or
other dtypes than bf16/float32); the method then runs its torch path, which stays the reference.
"""

from __future__ import annotations

import importlib

import math
import os
import sys
import threading
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._host import kernel_view, on_host
from moemerge.methods.base import Chunk, TensorParams
from moemerge.methods.stats import Threshold, _for_row_ranges, row_ranges, run_ranges, stream_key
from moemerge.methods._ties import tie_cut

if TYPE_CHECKING:
    from moemerge.methods._memo import ScratchMemo
    from moemerge.methods._selection import Selection

__all__ = ["available", "Ranked", "abs_delta_values", "variance_values", "histograms", "window_histograms",
           "tie_counts",
           "generalized_apply", "l1_partials", "sce_masked", "sce_apply", "WEIGHTED_SUMS", "weighted_into",
           "preload_weighted"]

#: Compiled kernel modules by name, once imported; None: could not be (no numba, no cache dir).
_COMPILED: dict[str, Any] = {}
#: Threshold bits no value reaches (selects nothing) and a cut row after every row (ties: all)
_NEVER = 1 << 31
_ALL_ROWS = 1 << 62


def _compiled(name: str) -> Any:
    """The kernel module `moemerge.methods.NAME`, imported on first use (its numba functions
    compile or load from cache then); None when that fails, and from then on."""
    if name not in _COMPILED:
        try:
            _COMPILED[name] = importlib.import_module(f"moemerge.methods.{name}")
        except (ImportError, RuntimeError, OSError):  # no numba, or no writable cache directory
            _COMPILED[name] = None
    return _COMPILED[name]


def _kernels() -> Any:
    return _compiled("_select_numba")


def available() -> bool:
    """Whether the compiled loops can run (numba importable, not switched off)."""
    return os.environ.get("MOEMERGE_NO_NUMBA", "") in ("", "0") and _kernels() is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """Every source's stored elements of a chunk in one flat numpy view (base first; bf16 as
    uint16 bits): source s's elements start at s * ss, `n` of them."""

    flat: np.ndarray
    ss: int
    n: int


def _stored(chunk: Chunk) -> Stored | None:
    """The chunk's stored rows when every source has one dtype (bf16 or float32) and they lie
    evenly spaced in one read buffer (the engine's read buffer); None otherwise (torch path)."""
    get = getattr(chunk, "stored", None)
    if get is None or chunk.compute_dtype != torch.float32 or not chunk.has_base or not available():
        return None
    raws: Sequence[torch.Tensor] | None = get()
    if not raws:
        return None
    n = raws[0].numel()
    # whole rows only: an elementwise method's 1-D block of a chunk is not rows [start, stop)
    if n != (chunk.row_stop - chunk.row_start) * chunk.row_len:
        return None
    return _evenly_spaced(raws)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ranked:
    """What a selection ranks, computed from the stored inputs: |x_s - base| of input s, or
    (variance) sce's variance of the task vectors."""

    src: Stored
    n_inputs: int
    variance: bool

    def row(self, source: int) -> int:
        return 0 if self.variance else source + 1


def abs_delta_values(chunk: Chunk) -> Ranked | None:
    src = _stored(chunk)
    return None if src is None else Ranked(src=src, n_inputs=chunk.n_inputs, variance=False)


def variance_values(chunk: Chunk) -> Ranked | None:
    src = _stored(chunk)
    return None if src is None else Ranked(src=src, n_inputs=chunk.n_inputs, variance=True)


def _flat_ranges(total: int, body: Any) -> None:
    _for_row_ranges(total, 1, body)


def histograms(ranked: Ranked, sources: Sequence[int], bins: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per target t (source sources[t]): the high-bits histogram (bins[t] < 0, 32,768 bins) or
    the low-bits histogram inside high bin bins[t] (65,536 bins), and the count of zeros."""
    k = _kernels()
    trow = np.array([ranked.row(s) for s in sources], np.int64)
    tbin = np.array(list(bins), np.int64)
    width = 1 << 15 if all(b < 0 for b in bins) else 1 << 16
    n = ranked.src.n
    parts: list[tuple[np.ndarray, np.ndarray]] = []

    def body(j0: int, j1: int) -> None:
        hist = np.zeros((len(trow), width), np.int64)
        zeros = np.zeros(len(trow), np.int64)
        k.hist_k(ranked.src.flat, ranked.src.ss, ranked.n_inputs, trow, tbin, j0, j1, hist, zeros)
        parts.append((hist, zeros))  # list.append is atomic; the sums do not depend on order

    _flat_ranges(n, body)
    return sum(p[0] for p in parts[1:]) + parts[0][0], sum(p[1] for p in parts[1:]) + parts[0][1]


def window_histograms(ranked: Ranked, sources: Sequence[int], wlo: Sequence[int], nb: Sequence[int]) -> np.ndarray:
    """[targets, max(nb), 65,536] int32: per target t (source sources[t]) the low-bits
    histograms of its values whose high bits lie in [wlo[t], wlo[t] + nb[t]). A buffer of the
    calling thread's (`_zeroed`): valid until its next call there."""
    k = _kernels()
    trow = np.array([ranked.row(s) for s in sources], np.int64)
    lo = np.array(list(wlo), np.int64)
    cnt = np.array(list(nb), np.int64)
    width = max(1, int(cnt.max(initial=1)))
    ranges = row_ranges(ranked.src.n, 1)
    # one slot per range, all in this (calling) thread's buffer: the ranges run on pool threads
    # int32: a chunk holds fewer than 2^31 values (a work unit's bytes at most)
    parts = _zeroed("window", (len(ranges), len(trow), width, 1 << 16))

    def body(i: int, _: int) -> None:  # slot i: range i
        j0, j1 = ranges[i]
        k.window_k(ranked.src.flat, ranked.src.ss, ranked.n_inputs, trow, lo, cnt, j0, j1, parts[i])

    run_ranges([(i, i + 1) for i in range(len(ranges))], body)
    out: np.ndarray = parts[0]
    for p in parts[1:]:
        out += p
    return out


#: Each thread's reusable histogram buffers by purpose (`_zeroed`).
_THREAD_BUFS = threading.local()


def _zeroed(purpose: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed int32 array of `shape`, this thread's buffer for `purpose`: reused from call to
    call (a fresh one costs its page faults: ~10x its zeroing here), so valid only until this
    thread asks for `purpose` again. At most the largest shape asked per thread is kept (the
    selection windows: one histogram per range and window bin, 512 KiB each, up to 64 bins;
    outside --memory-budget)."""
    bufs: dict[str, np.ndarray] | None = getattr(_THREAD_BUFS, "bufs", None)
    if bufs is None:
        bufs = _THREAD_BUFS.bufs = {}
    n = math.prod(shape)
    buf = bufs.get(purpose)
    if buf is None or buf.size < n:
        buf = bufs[purpose] = np.empty(n, np.int32)
    out = buf[:n].reshape(shape)
    out.fill(0)
    return out


def tie_counts(ranked: Ranked, sources: Sequence[int], thr_bits: Sequence[int], rows: int) -> np.ndarray:
    """[targets, rows]: values equal to thr_bits[t] in each chunk row."""
    k = _kernels()
    trow = np.array([ranked.row(s) for s in sources], np.int64)
    thr = np.array(list(thr_bits), np.int64)
    row_len = ranked.src.n // rows
    counts = np.zeros((len(trow), rows), np.int64)
    _for_row_ranges(rows, row_len, lambda r0, r1: k.ties_k(ranked.src.flat, ranked.src.ss, ranked.n_inputs, trow, thr, r0, r1,
                                                           row_len, counts))
    return counts


def _encode(thr: Threshold, ties: Any, row_start: int, rows: int,
            row_counts: Callable[[], np.ndarray]) -> tuple[int, int, int]:
    """(bits, cut row, tied values kept in the cut row) of `top_mask`'s rule for the chunk of
    `rows` rows from `row_start`: above `bits`, or equal to it in a row before the cut row, or
    among the cut row's first few equal values. `row_counts()`: the chunk's per-row count of
    values equal to `thr.bits` (asked only when the cut falls inside this chunk)."""
    if thr.q == 0:
        return _NEVER, -1, 0
    if thr.take_equal <= 0:
        return thr.bits, -1, 0
    if thr.take_equal >= thr.equal:
        return thr.bits, _ALL_ROWS, 0
    cut, take = tie_cut(thr, ties, row_start, row_start + rows, row_counts)
    return thr.bits, cut, take


def _targets(sel: Selection, stats: Mapping[str, Any], names: Sequence[Sequence[str]], ranked: Ranked,
             sources: Sequence[int], row_start: int, rows: int) -> tuple[np.ndarray, ...]:
    """thr, cut and take arrays [len(names), 2] for the selection targets names[i] (up to 2
    each) ranking source sources[i]'s values, for the chunk of `rows` rows from `row_start`."""
    thrs = sel.thresholds(stats)
    ties = sel.ties(stats)
    thr = np.full((max(1, len(names)), 2), _NEVER, np.int64)
    cut = np.full_like(thr, -1)
    take = np.zeros_like(thr)
    for i, group in enumerate(names):
        for m, name in enumerate(group):
            th = thrs[name]
            counts = partial(_row_ties, ranked, sources[i] if i < len(sources) else 0, th.bits, rows)
            thr[i, m], cut[i, m], take[i, m] = _encode(th, ties[name], row_start, rows, counts)
    return thr, cut, take


def _row_ties(ranked: Ranked, source: int, bits: int, rows: int) -> np.ndarray:
    counts: np.ndarray = tie_counts(ranked, [source], [bits], rows)[0]
    return counts


def _random_bound(p: float) -> tuple[int, bool]:
    """`random_keep`'s rule as (bound, keep all): z < bound, bound = ceil(p 2^53) 2^11."""
    limit = math.ceil(p * 2.0**53) if p > 0 else 0
    if limit <= 0:
        return 0, False
    if limit >= 1 << 53:
        return 0, True
    return limit << 11, False


def _groups(shape: tuple[int, ...], n: int) -> tuple[int, int, int]:
    """[groups, m, inner] layout of a chunk of n elements for DELLA's ranks along dim 1
    (a 1-D tensor is one group, a 2-D one ranks within rows): `_magprune_probs`'s groups."""
    if len(shape) <= 1:
        return 1, n, 1
    if len(shape) == 2:
        return n // shape[-1], shape[-1], 1
    m, inner = shape[1], math.prod(shape[2:])
    return n // (m * inner), m, inner


def _keep_masks(fam: Any, chunk: Chunk, p: TensorParams, src: Stored, inputs: Sequence[int],
                deltas: Sequence[np.ndarray | None], masks: Sequence[np.ndarray]) -> None:
    """Random (DARE) or magprune (DELLA) keep-masks of `inputs` into `masks` (flat bool), and
    their task vectors into `deltas` where given, as `_Family.keep_mask` draws them."""
    k = _kernels()
    n = src.n
    start = chunk.row_start * chunk.row_len
    for i, d, mask in zip(inputs, deltas, masks):
        dens = fam.density(p, i)
        key = np.uint64(stream_key(p.seed, chunk.name, i))
        bound, everything = _random_bound(dens) if fam.sparsify == "random" else (0, False)
        if fam.sparsify == "random":
            mode = 2 if everything else (1 if bound else 3)
        else:
            mode = 3 if dens <= 0 else 0
        if d is not None:
            _flat_ranges(n, partial(k.delta_mask_k, src.flat, src.ss, i + 1, start=start, key=key,
                                    bound=np.uint64(bound), mode=mode, d=d, mask=mask))
        elif mode == 3:
            mask[:] = False
        if fam.sparsify == "magprune" and dens > 0:
            eps = float(p.per_input[i].get("epsilon", 0.15))
            groups, m, inner = _groups(chunk.shape, n)
            _for_row_ranges(groups, m * inner, partial(_magprune, k, src, i + 1, m, inner, key, start,
                                                       dens - eps, 2 * eps, mask))


def _magprune(k: Any, src: Stored, row: int, m: int, inner: int, key: Any, start: int, pe: float, te: float,
              mask: np.ndarray, g0: int, g1: int) -> None:
    k.magprune_k(src.flat, src.ss, row, m, inner, g0, g1, key, start, pe, te, mask)


def _slots(chunk: Chunk, inputs: Sequence[int]) -> list[torch.Tensor]:
    """Where each input's keep-mask goes: its slot (`generalized._mask_slot`), else a new one."""
    from moemerge.methods.generalized import _mask_slot

    out = []
    for i in inputs:
        shape = tuple(chunk.scratch(0).shape)  # the chunk's [rows, row_len]
        slot = _mask_slot(chunk, i, shape)
        out.append(slot if slot is not None else torch.empty(shape, dtype=torch.bool))
    return out


def l1_partials(fam: Any, chunk: Chunk, stats: Mapping[str, Any], p: TensorParams,
                memo: ScratchMemo) -> dict[int, tuple[int, int]] | None:
    """`_Family.map_l1` (random or magprune): task vectors into scratch 4 + i, keep-masks into
    their slots, the exact L1 sums; records both in `memo` for apply on the same read."""
    from moemerge.methods.generalized import _mask_slot
    from moemerge.methods.stats import exact_abs_sums

    src = _stored(chunk)
    if src is None:
        return None
    inputs = fam.sparse_inputs(p)
    memo.clear()
    slots = _slots(chunk, inputs)
    _keep_masks(fam, chunk, p, src, inputs, [chunk.scratch(4 + i).reshape(-1).numpy() for i in inputs],
                [s.reshape(-1).numpy() for s in slots])
    out = {}
    for i, slot in zip(inputs, slots):
        d = chunk.scratch(4 + i)
        out[i] = exact_abs_sums(d, slot.view(d.shape))
        memo.add(chunk, f"delta{i}", *([f"keep{i}"] if _mask_slot(chunk, i, d.shape) is not None else []))
    return out


def generalized_apply(fam: Any, chunk: Chunk, stats: Mapping[str, Any], p: TensorParams,
                      memo: ScratchMemo) -> torch.Tensor | None:
    """`_Family.apply` in one pass over the stored inputs, into the chunk's output rows, or
    where a result is NaN into scratch 0 (None: torch path). Scratch 0 is the only compute
    buffer this needs outside DELLA (`Method.compiled_working_copies`)."""
    from moemerge.methods.generalized import _mask_slot

    src = _stored(chunk)
    if src is None:
        return None
    k = _kernels()
    w = p.column("weight")
    n = len(w)
    sparse = set(fam.sparse_inputs(p))
    kind = np.zeros(n, np.int64)
    names: list[list[str]] = [[] for _ in range(n)]
    key = np.zeros(n, np.uint64)
    bound = np.zeros(n, np.uint64)
    masks = np.zeros((1, 1), np.bool_)
    sel = fam.selection(p, chunk.shape) if fam.sparsify in ("magnitude", "outliers") else None
    if sel is not None:  # None: no input is sparsified here (every density 1), nothing selected
        for i in sparse:
            kind[i] = 1 if fam.sparsify == "magnitude" else 2
            names[i] = [f"{i}:top"] if fam.sparsify == "magnitude" else [f"{i}:hi", f"{i}:lo"]
        thr, cut, take = _targets(sel, stats, names, Ranked(src=src, n_inputs=chunk.n_inputs, variance=False),
                                  list(range(n)), chunk.row_start, chunk.row_stop - chunk.row_start)
    else:
        thr = np.full((max(1, n), 2), _NEVER, np.int64)
        cut, take = np.full_like(thr, -1), np.zeros_like(thr)
    if fam.sparsify == "random":
        for i in sparse:
            b, everything = _random_bound(fam.density(p, i))
            if not everything:  # keeping all multiplies by 1.0: the same bits as no mask
                kind[i], key[i], bound[i] = 3, stream_key(p.seed, chunk.name, i), b
    elif fam.sparsify == "magprune" and sparse:
        order = sorted(sparse)
        masks = np.empty((n, src.n), np.bool_)
        todo = []
        for i in order:
            kind[i] = 4
            slot = _mask_slot(chunk, i, tuple(chunk.scratch(0).shape))
            if memo.has(chunk, f"keep{i}") and slot is not None:  # drawn by the rescale pass on this read
                masks[i] = slot.reshape(-1).numpy()
            else:
                todo.append(i)
        if todo:
            _keep_masks(fam, chunk, p, src, todo, [None] * len(todo), [masks[i] for i in todo])
    memo.clear()  # scratch 0 may be written below
    factors = stats.get("l1", {})
    fac = np.array([factors.get(i, 1.0) for i in range(n)], np.float32)
    use_fac = np.array([factors.get(i, 1.0) != 1.0 for i in range(n)], np.bool_)
    w32 = np.array(w, np.float32)
    total = math.fsum(w)
    div = np.float32(1.0 if abs(total) < 1e-8 else total)
    lam = float(p.glob.get("lambda", 1.0))
    normalize = bool(p.glob.get("normalize", fam.normalize))
    rows, row_len = chunk.row_stop - chunk.row_start, chunk.row_len

    def run(out: np.ndarray) -> bool:
        nans: list[int] = []

        def body(r0: int, r1: int) -> None:
            nans.append(k.generalized_k(src.flat, src.ss, r0, r1, row_len, chunk.row_start, kind, thr, cut, take,
                                        key, bound, masks, fac, use_fac, w32, fam.consensus, normalize, div,
                                        np.float32(lam), lam != 1.0, out))

        _for_row_ranges(rows, row_len, body)
        return not any(nans)

    direct = _direct_output(chunk)
    if direct is not None and run(direct[1]):
        return direct[0]
    out_t = chunk.scratch(0)  # float32: a NaN result keeps its bits, and the engine rounds it as torch does
    run(out_t.reshape(-1).numpy())
    return out_t


def _direct_output(chunk: Chunk) -> tuple[torch.Tensor, np.ndarray] | None:
    """The chunk's output rows (`ChunkView.output`) and a flat numpy view of them (bf16 as its
    uint16 bits) where a kernel can round into them as torch does (bf16 or float32 on the
    host); None otherwise."""
    get = getattr(chunk, "output", None)
    out: torch.Tensor | None = get() if get is not None else None
    if out is None or str(out.dtype) not in _OUT_DTYPES or not on_host(out) or not out.is_contiguous():
        return None
    flat = out.reshape(-1)
    return out, kernel_view(flat)


def sce_masked(chunk: Chunk, stats: Mapping[str, Any], sel: Selection | None,
               memo: ScratchMemo) -> list[torch.Tensor] | None:
    """sce's task vectors times the variance selection's mask, into scratch 3 + i."""
    out = [chunk.scratch(3 + i) for i in range(chunk.n_inputs)]
    tag = "masked" if sel is not None else "deltas"
    if memo.has(chunk, tag):
        return out
    src = _stored(chunk)
    if src is None:
        return None
    k = _kernels()
    if sel is not None:
        thr, cut, take = _targets(sel, stats, [["var"]], Ranked(src=src, n_inputs=chunk.n_inputs, variance=True),
                                  [0], chunk.row_start, chunk.row_stop - chunk.row_start)
    else:
        thr = np.full((1, 2), _NEVER, np.int64)
        cut, take = np.full_like(thr, -1), np.zeros_like(thr)
    memo.clear()
    rows, row_len = chunk.row_stop - chunk.row_start, chunk.row_len
    bufs = tuple(d.reshape(-1).numpy() for d in out)

    def body(r0: int, r1: int) -> None:
        k.sce_k(src.flat, src.ss, chunk.n_inputs, r0, r1, row_len, chunk.row_start, sel is not None, thr, cut, take, bufs)

    _for_row_ranges(rows, row_len, body)
    memo.set(chunk, tag)
    return out


def sce_apply(chunk: Chunk, stats: Mapping[str, Any], sel: Selection | None,
              memo: ScratchMemo) -> torch.Tensor | None:
    """sce's apply on the masked task vectors (one pass), into scratch 1."""
    src = _stored(chunk)
    if src is None:
        return None
    deltas = sce_masked(chunk, stats, sel, memo)
    if deltas is None:
        return None
    memo.clear()
    energy = stats["energy"]
    total = math.fsum(energy)
    eta = [1.0 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    out_t = chunk.scratch(1)
    out = out_t.reshape(-1).numpy()
    bufs = tuple(d.reshape(-1).numpy() for d in deltas)
    eta32 = np.array(eta, np.float32)
    _flat_ranges(src.n, lambda j0, j1: _kernels().sce_apply_k(src.flat, src.ss, bufs, eta32, j0, j1, out))
    return out_t


# -- weighted sums (linear, the PMA averages): the stored inputs straight into the output ------

#: Elementwise methods whose output is a weighted sum of their inputs, as `_kernels.weighted_sum`
#: computes it: method name -> weights(params, n_inputs). Each method registers the function its
#: own `apply` uses, so the two paths cannot disagree on the weights.
WEIGHTED_SUMS: dict[str, Callable[[TensorParams, int], Sequence[float]]] = {}
#: Output dtypes the loop writes: bf16 (as its uint16 bits) and float32.
_OUT_DTYPES = ("torch.bfloat16", "torch.float32")


def _linear_kernels() -> Any:
    return _compiled("_linear_numba")


#: Bytes read from which a weighted-sum merge loads the compiled loop. Measured (scripts/bench.py,
#: bf16): the loop saves ~0.2 s of CPU per GB read, but loading numba and its cached code costs
#: ~0.8 s and ~120 MB of RSS (a 3 x 500 MB linear run was 1.86x the floor with it, 1.43x
#: without). From here on it pays for itself, and it loads on a thread of its own meanwhile.
LINEAR_COMPILED_FROM = 4 << 30
#: Set while `preload_weighted` loads the loop in the background, and cleared when it is done.
_LOADING = threading.Event()


def _linear_wanted() -> bool:
    """Whether `weighted_into` may use the compiled loop now: never while it loads in the
    background (the torch path meanwhile: same bits); where numba is loaded anyway (a
    statistics method, FP8 inputs), once `preload_weighted` loaded it, or always with
    MOEMERGE_LINEAR_NUMBA=1; never with MOEMERGE_LINEAR_NUMBA=0 unless numba is loaded."""
    if _LOADING.is_set():
        return False
    if _COMPILED.get("_linear_numba") is not None or "numba" in sys.modules:
        return True
    return os.environ.get("MOEMERGE_LINEAR_NUMBA", "") not in ("", "0")


def preload_weighted(name: str, bytes_read: int) -> bool:
    """Start loading the compiled weighted sum on a background thread when method `name` is one
    (`WEIGHTED_SUMS`) and the merge reads at least `LINEAR_COMPILED_FROM` bytes (or with
    MOEMERGE_LINEAR_NUMBA=1); chunks computed before it is ready take the torch path, with the
    same bits. True when a load was started."""
    env = os.environ.get("MOEMERGE_LINEAR_NUMBA", "")
    if (name not in WEIGHTED_SUMS or "_linear_numba" in _COMPILED or _LOADING.is_set() or env == "0"
            or os.environ.get("MOEMERGE_NO_NUMBA", "") not in ("", "0")
            or (bytes_read < LINEAR_COMPILED_FROM and env in ("", "0"))):
        return False
    _LOADING.set()

    def load() -> None:
        try:
            _linear_kernels()
        finally:
            _LOADING.clear()

    threading.Thread(target=load, name="moemerge-numba-load", daemon=True).start()
    return True


def _evenly_spaced(raws: Sequence[torch.Tensor]) -> Stored | None:
    """`raws` (one dtype, bf16 or float32, equal lengths, host memory) as one flat numpy view
    when they lie evenly spaced in one buffer (the engine's read buffer), else None."""
    if not raws:
        return None
    dt = raws[0].dtype
    if dt not in (torch.bfloat16, torch.float32) or any(r.dtype != dt or not on_host(r) or not r.is_contiguous()
                                                         for r in raws):
        return None
    n = raws[0].numel()
    if n == 0 or any(r.numel() != n for r in raws):
        return None
    size = raws[0].element_size()
    ptrs = [r.data_ptr() for r in raws]
    step = ptrs[1] - ptrs[0] if len(ptrs) > 1 else n * size
    if step < n * size or step % size or any(b - a != step for a, b in zip(ptrs, ptrs[1:])):
        return None
    first = raws[0].reshape(-1)
    a0 = kernel_view(first)
    ss = step // size
    flat = np.lib.stride_tricks.as_strided(a0, shape=((len(raws) - 1) * ss + n,), strides=(size,), writeable=False)
    return Stored(flat=flat, ss=ss, n=n)


def weighted_into(name: str, params: TensorParams, raws: Sequence[torch.Tensor], compute: torch.dtype,
                  out: torch.Tensor) -> bool:
    """Method `name`'s weighted sum of the stored inputs `raws` (base excluded) written straight
    into `out` (the output's typed elements, bf16 or float32) in one pass, with the bits of the
    torch path (read -> float32 -> multiply-add in input order -> one rounding). False when it
    cannot run (see the module docstring; also float64 compute, other output dtypes, a method
    not in `WEIGHTED_SUMS`) or a result is NaN: then nothing is promised about `out`, and the
    caller runs the torch path, which keeps torch's NaN bit patterns."""
    weights_of = WEIGHTED_SUMS.get(name)
    if not _linear_wanted():
        return False
    if (weights_of is None or compute != torch.float32 or str(out.dtype) not in _OUT_DTYPES
            or not on_host(out) or not out.is_contiguous()
            or os.environ.get("MOEMERGE_NO_NUMBA", "") not in ("", "0")):
        return False
    src = _evenly_spaced(raws)
    if src is None or out.numel() != src.n:
        return False
    k = _linear_kernels()
    if k is None:
        return False
    w = np.array([float(x) for x in weights_of(params, len(raws))], np.float32)  # torch: a float32 operand
    if len(w) != len(raws):
        return False
    flat = out.reshape(-1)
    dst = kernel_view(flat)
    nans: list[int] = []
    _flat_ranges(src.n, lambda j0, j1: nans.append(k.wsum_k(src.flat, src.ss, len(w), w, j0, j1, dst)))
    return not any(nans)
