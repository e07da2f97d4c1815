"""The method interface: parameters, statistics passes, and `apply` on one row-chunk.

A method is pure math on chunks (STYLE "Methods are pure functions on chunks"): it never
touches storage, Dask or devices. The engine feeds it `Chunk`s; for methods that need
whole-tensor statistics it first runs the declared `StatPass`es (map each chunk to a small
partial, reduce the partials in row order) and hands the results to `apply`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

__all__ = ["Interval", "FINITE", "ParamSpec", "TensorParams", "Chunk", "StatPass", "Method", "check_range"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Interval:
    """The valid range of a numeric parameter; None is unbounded on that side.

    Example: str(Interval(lo=0, hi=1, lo_open=True)) == "(0, 1]"; 0.5 in it is True.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


#: Any finite real (weights, lambda, scale): NaN and Inf are refused everywhere.
FINITE = Interval()


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamSpec:
    """One parameter a method takes, with MergeKit's name, default and valid range.

    Methods only declare their parameters; `moemerge.config` checks configs against them."""

    name: str
    scope: Literal["model", "global"]
    """`model`: resolved per input (model's own, then top-level); `global`: once per tensor."""
    default: float | bool | None = None
    """None means required."""
    kind: Literal["float", "bool", "int"] = "float"
    range: Interval = FINITE
    """Valid values (MergeKit 0.1.5's meaning, methods.md); outside is a ConfigError before
    work, never clamped. `config.param_problem` checks every value written in the config (each
    gradient entry, each filter rule) and the planner every value it resolves for a tensor."""
    doc: str = ""


def check_range(lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False) -> Interval:
    """An `Interval`, e.g. check_range(0, 1, lo_open=True) for (0, 1]."""
    return Interval(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorParams:
    """Parameters resolved for one tensor: per input (config order, base excluded) and global."""

    per_input: tuple[Mapping[str, Any], ...]
    glob: Mapping[str, Any]
    seed: int = 0

    def column(self, name: str) -> list[float]:
        return [float(p[name]) for p in self.per_input]


class Chunk(Protocol):
    """Rows [row_start, row_stop) of one tensor, all inputs; tensors are [rows, row_len].

    For `elementwise` methods the engine passes 1-D blocks of a chunk instead (any shape
    works for elementwise math); `row_start`/`row_stop` then still name the enclosing rows.
    """

    name: str
    shape: tuple[int, ...]
    row_start: int
    row_stop: int
    row_len: int
    n_inputs: int
    has_base: bool
    compute_dtype: torch.dtype

    def input(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Input i (base excluded) in the compute dtype, converted into `out` if given."""
        ...

    def base(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's rows in the compute dtype (methods with a base only)."""
        ...

    def scratch(self, k: int) -> torch.Tensor:
        """The k-th reusable buffer of the chunk's shape, k < method.working_copies(n)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StatPass:
    """A whole-tensor statistic: map every chunk to a partial, reduce partials in row order."""

    name: str
    map: Callable[[Chunk, Mapping[str, Any], TensorParams], Any]
    reduce: Callable[[Sequence[Any]], Any]
    combine: Callable[[Any, Any], Any] | None = None
    """Exact, order-free merge of two partials (e.g. adding histograms). When given, the
    engine folds partials as they arrive, so memory does not grow with the chunk count."""
    needed: Callable[[Mapping[str, Any]], bool] | None = None
    """Given the earlier passes' statistics, whether this pass needs the data at all. When it
    returns False for a tensor streamed in several chunks, the engine does not read the tensor
    for this pass and the statistic is `when_skipped` (e.g. no ties to break at a threshold)."""
    when_skipped: Any = None
    """The statistic of a pass `needed` said to skip: what reduce would have returned."""


def _no_passes(params: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    return ()


def _one_row(shape: tuple[int, ...], params: TensorParams) -> int:
    return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Method:
    """A merge method: what it takes, what statistics it needs, and the math per chunk."""

    name: str
    pretty_name: str
    reference_url: str
    params: tuple[ParamSpec, ...]
    apply: Callable[[Chunk, Mapping[str, Any], TensorParams], torch.Tensor]
    base: Literal["none", "required", "optional"] = "none"
    """Whether the method uses `base_model` (then the inputs are the models other than it)."""
    min_inputs: int = 1
    max_inputs: int | None = None
    elementwise: bool = False
    """Output element j depends only on input elements j: the engine then feeds cache-sized
    1-D blocks (faster, and compute buffers stay small whatever the chunk)."""
    working_copies: Callable[[int], int] = lambda n: 2
    """Compute buffers (`Chunk.scratch`) the method uses for n inputs (allocated once)."""
    compiled_working_copies: Callable[[int], int] | None = None
    """The compute buffers it uses where its compiled loops (methods/_fused.py) take every
    chunk, with no temporaries: the planner sizes chunks by these when they will run (a chunk
    that still takes the torch path gets the rest allocated, engine.compute.ChunkView)."""
    temporaries: Callable[[int], int] = lambda n: 0
    """Further float32-sized temporaries per element it allocates while computing (masks,
    float64 products, random draws): budgeted by the planner, not preallocated."""
    passes: Callable[[TensorParams, tuple[int, ...]], tuple[StatPass, ...]] = _no_passes
    row_granularity: Callable[[tuple[int, ...], TensorParams], int] = _one_row
    """Chunks hold a multiple of this many rows (per-row statistics never split a row)."""
    check_tensor: Callable[[TensorParams], str | None] = lambda p: None
    """Plan-time check of one tensor's resolved parameters (e.g. weights summing to 0)."""
    ignored_params: tuple[str, ...] = ()
    """Accepted for MergeKit compatibility but without effect here (a warning says so)."""
    notes: tuple[str, ...] = field(default=())

    def spec(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None
