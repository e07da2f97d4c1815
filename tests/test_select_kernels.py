"""The compiled statistics kernels (methods/_fused.py) against the torch path they replace: the
same statistics and the same output bits, for every selection method, on fresh random inputs
and the edge cases of exact selection (ties at thresholds, all-equal magnitudes, exact zero
deltas, bf16 cancellations, odd sizes, single rows), whole and streamed in row-chunks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from moemerge.methods import _fused, get_method
from moemerge.methods.base import Method, TensorParams

pytestmark = pytest.mark.skipif(not _fused.available(), reason="numba is not available")

ALIGN = 64
SELECTION = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"]


class _Chunk:
    """Rows [r0, r1) of every source, stored one after another in one buffer (as the engine's
    read buffer holds them), converted on demand like engine/compute.py's ChunkView."""

    def __init__(self, name: str, shape: tuple[int, ...], sources: list[torch.Tensor], r0: int, r1: int,
                 row_len: int, copies: int, fused: bool, out_dtype: torch.dtype | None = None) -> None:
        self.name, self.shape, self.row_start, self.row_stop, self.row_len = name, shape, r0, r1, row_len
        self.n_inputs = len(sources) - 1
        self.has_base = True
        self.compute_dtype = torch.float32
        rows = r1 - r0
        size = sources[0].element_size()
        step = -(-rows * row_len * size // ALIGN) * ALIGN
        self._buf = torch.zeros(step * len(sources) + ALIGN, dtype=torch.uint8)
        self._raws = []
        for k, s in enumerate(sources):
            view = self._buf[k * step:k * step + rows * row_len * size].view(s.dtype).view(rows, row_len)
            view.copy_(s.reshape(-1, row_len)[r0:r1])
            self._raws.append(view)
        self._scratch = [torch.full((rows, row_len), float("nan")) for _ in range(copies)]
        self._fused = fused
        # the engine's output rows (ChunkView.output): stale bytes, as a reused write buffer holds
        self._out = None if out_dtype is None else torch.full((rows, row_len), -7.5, dtype=out_dtype)

    def output(self) -> torch.Tensor | None:
        return self._out

    def input(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._conv(self._raws[i + 1], out)

    def base(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._conv(self._raws[0], out)

    def _conv(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return x.to(torch.float32, copy=True)
        return out.copy_(x)

    def scratch(self, k: int) -> torch.Tensor:
        return self._scratch[k]

    def stored(self) -> tuple[torch.Tensor, ...] | None:
        return tuple(self._raws) if self._fused else None


def _merge(method: Method, params: TensorParams, shape: tuple[int, ...], sources: list[torch.Tensor],
           rows_per_chunk: int | None, fused: bool, out_dtype: torch.dtype | None = None) -> tuple[bytes, dict[str, Any]]:
    """The engine's sequence of jobs on one tensor: every pass over every chunk (or all passes
    and the apply on one read), then the apply; the output's float32 bytes and the stats.
    `out_dtype`: the chunks offer output rows of that type (ChunkView.output) and the bytes are
    the output's, each apply's result rounded into it as engine/compute.apply_into does."""
    rows = shape[0] if shape else 1
    row_len = math.prod(shape[1:]) if len(shape) > 1 else 1
    copies = method.working_copies(len(sources) - 1)
    passes = method.passes(params, shape)
    stats: dict[str, Any] = {}
    outs = []
    if rows_per_chunk is None or rows_per_chunk >= rows:
        chunk = _Chunk("t", shape, sources, 0, rows, row_len, copies, fused, out_dtype)
        for sp in passes:
            stats[sp.name] = sp.reduce([sp.map(chunk, stats, params)])
        outs.append(_rounded(chunk, method.apply(chunk, stats, params)))
    else:
        ranges = [(r, min(rows, r + rows_per_chunk)) for r in range(0, rows, rows_per_chunk)]
        for sp in passes:
            if sp.needed is not None and not sp.needed(stats):
                stats[sp.name] = sp.when_skipped
                continue
            stats[sp.name] = sp.reduce([sp.map(_Chunk("t", shape, sources, a, b, row_len, copies, fused), stats,
                                               params) for a, b in ranges])
        for a, b in ranges:
            chunk = _Chunk("t", shape, sources, a, b, row_len, copies, fused, out_dtype)
            outs.append(_rounded(chunk, method.apply(chunk, stats, params)))
    return torch.cat([o.reshape(-1) for o in outs]).view(torch.uint8).numpy().tobytes(), stats


def _rounded(chunk: _Chunk, result: torch.Tensor) -> torch.Tensor:
    out = chunk.output()
    if out is None:
        return result.clone()
    if result is not out:  # as apply_into: the kernel did not write the output rows itself
        out.copy_(result.reshape(out.shape))
    return out.clone()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) and type(a) is type(b)


def _selection_of(method: Method, params: TensorParams, shape: tuple[int, ...]) -> Any:
    """The method's selection passes for this tensor (None: it selects nothing)."""
    if method.name == "sce":
        from moemerge.methods.sce import _selection
        return _selection(params, shape)
    fam = getattr(method.apply, "__self__", None)
    return fam.selection(params, shape) if fam is not None else None


def _resolved(stats: Mapping[str, Any], sel: Any) -> dict[str, Any]:
    """The statistics as the apply reads them: the high histograms and the exact thresholds of
    a selection (the compiled pass 1 also counts low bits in windows that the torch path does
    not: the same thresholds from other partials), every other statistic as it is."""
    out = {k: v for k, v in stats.items() if not k.endswith((":high", ":low", ":ties"))}
    if sel is not None:
        high = next(v for k, v in stats.items() if k.endswith(":high"))
        out["high"] = {k: v for k, v in high.items() if k != "win"}
        out["thresholds"] = sel.thresholds(stats)
    return out


def _data(kind: str, shape: tuple[int, ...], n: int, dtype: torch.dtype, g: torch.Generator) -> list[torch.Tensor]:
    """Base first, then n fine-tunes, all of `dtype`: each kind stresses one part of selection."""
    base = torch.randn(shape, generator=g)
    if kind == "equal":  # exactly representable, so every |x - base| is exactly 0.25
        base = torch.randint(-4, 5, shape, generator=g).float() * 0.5
    outs = [base]
    for i in range(n):
        if kind == "random":
            d = torch.randn(shape, generator=g) * 0.05
        elif kind == "quantized":  # few distinct magnitudes: ties at every threshold
            d = torch.randint(-3, 4, shape, generator=g).float() * 0.125
        elif kind == "equal":  # all magnitudes equal, random signs
            d = torch.where(torch.rand(shape, generator=g) < 0.5, -0.25, 0.25)
        elif kind == "zeros":  # exact zero deltas in part of the tensor (bf16: x == base cancels)
            d = torch.randn(shape, generator=g) * 0.05 * (torch.rand(shape, generator=g) < 0.4)
        else:
            raise ValueError(kind)
        outs.append(base + d)
    return [o.to(dtype) for o in outs]


def _params(method: str, n: int, g: torch.Generator) -> TensorParams:
    per = []
    for i in range(n):
        per.append({"weight": [0.3, 0.7, -0.45, 1.1][i % 4], "density": [0.35, 0.6, 0.5, 0.2][i % 4],
                    "gamma": 0.07, "epsilon": 0.1})
    glob: dict[str, Any] = {"lambda": 1.3, "rescale": True, "select_topk": 0.45}
    return TensorParams(per_input=tuple(per), glob=glob, seed=int(torch.randint(0, 1 << 30, (1,), generator=g)))


SHAPES = [(1, 37), (13, 29), (50,), (4, 6, 5)]


@pytest.mark.parametrize("name", SELECTION)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_matches_torch_bit_for_bit(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    method = get_method(name)
    g = torch.Generator().manual_seed(hash((name, str(dtype))) & 0xFFFF)
    for kind in ("random", "quantized", "equal", "zeros"):
        for shape in SHAPES:
            n = 1 + int(torch.randint(0, 3, (1,), generator=g))
            sources = _data(kind, shape, n, dtype, g)
            params = _params(name, n, g)
            gran = method.row_granularity(shape, params)
            chunkings: list[int | None] = [None] if len(shape) <= 1 else [None, max(1, gran) * 3]
            for rpc in chunkings:
                monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
                want, want_stats = _merge(method, params, shape, sources, rpc, fused=False)
                monkeypatch.delenv("MOEMERGE_NO_NUMBA")
                got, got_stats = _merge(method, params, shape, sources, rpc, fused=True)
                where = f"{name} {kind} {tuple(shape)} {dtype} n={n} rows/chunk={rpc}"
                sel = _selection_of(method, params, shape)
                assert _same(_resolved(want_stats, sel), _resolved(got_stats, sel)), f"{where}: statistics differ"
                assert want == got, f"{where}: output bits differ"


@pytest.mark.parametrize("name", SELECTION)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16-out", "f32-out"])
def test_kernels_that_round_into_the_output_give_torchs_bits(name: str, out_dtype: torch.dtype,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the engine offers the output rows (ChunkView.output), the generalized family's
    kernel rounds into them itself: the bytes of the torch path's float32 result rounded by torch."""
    method = get_method(name)
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    for kind in ("random", "zeros", "quantized"):
        for shape in SHAPES:
            n = 1 + int(torch.randint(0, 3, (1,), generator=g))
            sources = _data(kind, shape, n, torch.bfloat16, g)
            params = _params(name, n, g)
            monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
            want, _ = _merge(method, params, shape, sources, None, fused=False, out_dtype=out_dtype)
            monkeypatch.delenv("MOEMERGE_NO_NUMBA")
            got, _ = _merge(method, params, shape, sources, None, fused=True, out_dtype=out_dtype)
            assert want == got, f"{name} {kind} {shape} -> {out_dtype}: output bits differ"


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della"])
def test_a_nan_result_is_redone_with_torchs_nan_bits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite bf16 inputs whose difference overflows float32 (+-3.3e38 apart) give an infinite
    task vector; dropped by a random mask it becomes inf * 0 = NaN (x86's default NaN is
    negative, torch's bf16 NaN positive): the kernel counts it and the chunk is redone."""
    method = get_method(name)
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    shape = (16, 64)
    sources = _data("random", shape, 2, torch.bfloat16, g)
    big = torch.tensor(3.3e38).to(torch.bfloat16)
    sources[0].view(-1)[::3] = -big
    sources[1].view(-1)[::3] = big  # x - base = +inf in float32 at every third element
    p = _params(name, 2, g)  # without rescale: its L1 sums refuse an infinite task vector
    params = TensorParams(per_input=p.per_input, glob={**p.glob, "rescale": False}, seed=p.seed)
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    want, _ = _merge(method, params, shape, sources, None, fused=False, out_dtype=torch.bfloat16)
    monkeypatch.delenv("MOEMERGE_NO_NUMBA")
    got, _ = _merge(method, params, shape, sources, None, fused=True, out_dtype=torch.bfloat16)
    nan = torch.frombuffer(bytearray(want), dtype=torch.bfloat16).isnan()
    assert bool(nan.any()), "the case must produce NaN results"
    assert want == got, f"{name}: NaN results are not torch's bits"


def test_fused_runs_where_it_should(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels take bf16 and float32 chunks; other dtypes and MOEMERGE_NO_NUMBA=1 fall back."""
    g = torch.Generator().manual_seed(5)
    for dtype, expect in ((torch.bfloat16, True), (torch.float32, True), (torch.float16, False)):
        srcs = _data("random", (6, 8), 2, dtype, g)
        chunk = _Chunk("t", (6, 8), srcs, 0, 6, 8, 6, fused=True)
        assert (_fused.abs_delta_values(chunk) is not None) is expect
    # a block of an elementwise method's chunk (not whole rows [row_start, row_stop)): torch path
    chunk = _Chunk("t", (6, 8), _data("random", (6, 8), 2, torch.bfloat16, g), 0, 6, 8, 6, fused=True)
    chunk.row_stop = 7
    assert _fused.abs_delta_values(chunk) is None
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    chunk = _Chunk("t", (6, 8), _data("random", (6, 8), 2, torch.bfloat16, g), 0, 6, 8, 6, fused=True)
    assert _fused.abs_delta_values(chunk) is None


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "della", "sce"])
def test_fused_large_chunks_split_across_threads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks big enough to be cut into row ranges on several threads, rows longer than a block
    (the kernels' BLK), and values tied at the threshold: still the torch path's bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # row ranges follow torch's thread count
    try:
        method = get_method(name)
        g = torch.Generator().manual_seed(hash(name) & 0xFFFF)
        shape = (160, 4100)  # 656,000 values: four row ranges; rows of two blocks and a bit
        sources = _data("quantized", shape, 2, torch.bfloat16, g)
        params = _params(name, 2, g)
        for rpc in (None, 70):
            monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
            want, want_stats = _merge(method, params, shape, sources, rpc, fused=False)
            monkeypatch.delenv("MOEMERGE_NO_NUMBA")
            got, got_stats = _merge(method, params, shape, sources, rpc, fused=True)
            sel = _selection_of(method, params, shape)
            assert _same(_resolved(want_stats, sel), _resolved(got_stats, sel)), \
                f"{name} rows/chunk={rpc}: statistics differ"
            assert want == got, f"{name} rows/chunk={rpc}: output bits differ"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", SELECTION)
@pytest.mark.parametrize("densities", [(1.0, 1.0), (1.0, 0.4), (0.0, 1.0)])
def test_fused_matches_torch_when_densities_keep_everything_or_nothing(
        name: str, densities: tuple[float, float], monkeypatch: pytest.MonkeyPatch) -> None:
    """Density 1 sparsifies nothing (no selection at all when every input has it), density 0
    keeps nothing: both are edges of the fused dispatch (every density 1 used to crash it)."""
    method = get_method(name)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    shape = (9, 31)
    sources = _data("random", shape, 2, torch.bfloat16, g)
    params = _params(name, 2, g)
    params = TensorParams(per_input=tuple({**p, "density": d} for p, d in zip(params.per_input, densities)),
                          glob=params.glob, seed=params.seed)
    for rpc in (None, 3):
        monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
        want, want_stats = _merge(method, params, shape, sources, rpc, fused=False)
        monkeypatch.delenv("MOEMERGE_NO_NUMBA")
        got, got_stats = _merge(method, params, shape, sources, rpc, fused=True)
        sel = _selection_of(method, params, shape)
        assert _same(_resolved(want_stats, sel), _resolved(got_stats, sel)) and want == got, \
            f"{name} densities={densities} rows/chunk={rpc}"
