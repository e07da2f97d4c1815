"""The generalized task-arithmetic family (methods.md): sparsify each task vector, weight,
optionally elect signs, mix, normalize, scale by lambda, add to the base.

| method           | sparsify  | consensus | normalize | rescale |
| task_arithmetic  | none      | no        | false     | -       |
| ties             | magnitude | yes       | true      | -       |
| dare_linear      | random    | no        | false     | true    |
| dare_ties        | random    | yes       | false     | true    |
| breadcrumbs      | outliers  | no        | false     | -       |
| breadcrumbs_ties | outliers  | yes       | false     | -       |
| della_linear     | magprune  | no        | false     | true    |
| della            | magprune  | yes       | true      | true    |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods import _fused
from moemerge.methods._host import div_scalar_, same_device
from moemerge.methods._memo import ScratchMemo
from moemerge.methods._selection import Selection, Target, bool_view, selection_passes
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams, check_range
from moemerge.methods.stats import exact_abs_sums, exact_value, random_keep, stream_key, uniform

__all__ = ["FAMILY", "make_generalized"]

Sparsify = Literal["none", "magnitude", "random", "outliers", "magprune"]

#: Extra float32-sized temporaries per element that each sparsifier allocates (memory plan).
#: Random masks live in scratch buffers and their draws in cache-sized blocks (stats.BLOCK);
#: DELLA's ranks hold two int64 argsorts, float64 draws and probabilities.
_EXTRA = {"none": 0, "magnitude": 0, "outliers": 0, "random": 0, "magprune": 14}
#: MergeKit's rule (methods.md): skip the L1 rescale when either norm is under this.
_RESCALE_EPS = 1e-7


def _delta(chunk: Chunk, i: int, out: torch.Tensor) -> torch.Tensor:
    """d_i = x_i - b into `out` (scratch 0 holds the base, converted once per chunk)."""
    chunk.input(i, out=out)
    out.sub_(chunk.scratch(0))
    return out


def _load_base(chunk: Chunk) -> None:
    chunk.base(out=chunk.scratch(0))


def _magprune_probs(d: torch.Tensor, shape: tuple[int, ...], p: float, eps: float) -> torch.Tensor:
    """Keep probabilities p - e + 2 e r from ranks of |d| along dim 1 (rows of the chunk)."""
    if len(shape) <= 1:
        groups, dim = d.reshape(1, 1, -1), 2  # a 1-D tensor is one row
    elif len(shape) == 2:
        groups, dim = d.reshape(-1, 1, shape[-1]), 2  # rank within each row
    else:  # rank along dim 1 for every index of the other dims: [outer, dim1, inner]
        groups, dim = d.reshape(-1, shape[1], math.prod(shape[2:])), 1
    m = groups.shape[dim]
    ranks = torch.argsort(torch.argsort(groups.abs(), dim=dim, stable=True), dim=dim, stable=True)
    # div_scalar_: correctly rounded on CUDA too (it would multiply by 1 / (m - 1))
    r = div_scalar_(ranks.to(torch.float64), m - 1) if m > 1 else torch.full_like(groups, 0.5, dtype=torch.float64)
    return ((p - eps) + 2 * eps * r).reshape(d.shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Family:
    """One member's options (the table in the module docstring) and its math, as methods that
    `make_generalized` hands to `Method`."""

    name: str
    sparsify: Sparsify
    consensus: bool
    normalize: bool
    # what the passes left in the scratch buffers for the next pass or apply on the same read:
    # "base" (scratch 0), "abs{i}" (|d_i| in scratch 4 + i, selection), "delta{i}" (d_i there)
    # and "keep{i}" (input i's random keep-mask in `_mask_slot`, rescale pass)
    memo: ScratchMemo = field(default_factory=lambda: ScratchMemo(lambda n: n + 4))

    def density(self, p: TensorParams, i: int) -> float:
        return float(p.per_input[i].get("density", 1.0))

    def sparse_inputs(self, p: TensorParams) -> list[int]:
        return [i for i in range(len(p.per_input)) if self.sparsify != "none" and self.density(p, i) < 1]

    def selection(self, p: TensorParams, shape: tuple[int, ...]) -> Selection | None:
        """The exact-selection passes of magnitude / outlier sparsification (None for others)."""
        if self.sparsify not in ("magnitude", "outliers"):
            return None
        n = math.prod(shape)
        targets: list[Target] = []
        for i in self.sparse_inputs(p):
            dens = self.density(p, i)
            if self.sparsify == "magnitude":  # methods.md: k = max(1, floor(p n)); p <= 0 keeps none
                k = 0 if dens <= 0 else max(1, math.floor(dens * n))
                targets.append(Target(f"{i}:top", i, _fixed(k), _share(k, n)))
            else:  # outliers: keep descending ranks [n - bottom - keep, n - bottom)
                keep = max(0, math.floor(dens * n))
                top = math.floor(float(p.per_input[i].get("gamma", 0.01)) * n)
                bottom = max(0, n - keep - top)
                targets.append(Target(f"{i}:hi", i, _fixed(n - bottom), _share(n - bottom, n)))
                targets.append(Target(f"{i}:lo", i, _fixed(n - bottom - keep), _share(n - bottom - keep, n)))
        return selection_passes("sel", self._abs_values, targets, n, work=lambda c: c.scratch(2),
                                fused=_fused.abs_delta_values) if targets else None

    def _abs_values(self, chunk: Chunk, stats: Mapping[str, Any], i: int) -> torch.Tensor:
        """|d_i| in scratch 4 + i, the values selection ranks."""
        memo = self.memo
        buf = chunk.scratch(4 + i)
        if not memo.has(chunk, f"abs{i}"):
            if not memo.has(chunk, "base"):
                _load_base(chunk)
                memo.add(chunk, "base")
            _delta(chunk, i, buf).abs_()
            memo.add(chunk, f"abs{i}")
        return buf

    def keep_mask(self, chunk: Chunk, stats: Mapping[str, Any], p: TensorParams, i: int, d: torch.Tensor,
                  sel: Selection | None = None, *, tmp: torch.Tensor) -> torch.Tensor | None:
        """Boolean keep-mask of input i's task vector in this chunk, None to keep all.

        `tmp`: a free float32 scratch buffer of the chunk's shape (bit patterns); random masks
        go to `_mask_slot(chunk, i)`.
        """
        if i not in self.sparse_inputs(p):
            return None
        dens = self.density(p, i)
        if self.sparsify in ("magnitude", "outliers"):
            assert sel is not None
            # |d|'s patterns fill tmp; the masks go to scratch 3 (1.0/0.0: ties' one mask) or
            # its bytes (bool: breadcrumbs' two)
            bits = torch.abs(d, out=tmp).view(torch.int32)
            masks = chunk.scratch(3)
            if self.sparsify == "magnitude":
                return sel.mask(stats, f"{i}:top", bits, chunk.row_start, out=masks)
            hi = sel.mask(stats, f"{i}:hi", bits, chunk.row_start, out=bool_view(masks, d.shape, 0))
            lo = sel.mask(stats, f"{i}:lo", bits, chunk.row_start, out=bool_view(masks, d.shape, 1))
            return hi.logical_and_(lo.logical_not_())
        start = chunk.row_start * chunk.row_len
        key = stream_key(p.seed, chunk.name, i)
        out = _mask_slot(chunk, i, d.shape)
        if self.sparsify == "random":
            mask = random_keep(key, start, d.numel(), dens, out=out.reshape(-1) if out is not None else None)
            return same_device(mask, d).view(d.shape)
        if dens <= 0:
            return out.fill_(False) if out is not None else torch.zeros_like(d, dtype=torch.bool)
        u = same_device(uniform(key, start, d.numel()), d).reshape(d.shape)  # drawn on the host
        eps = float(p.per_input[i].get("epsilon", 0.15))
        probs = _magprune_probs(d, chunk.shape, dens, eps)
        return torch.lt(u, probs, out=out) if out is not None else u < probs

    def needs_rescale(self, p: TensorParams) -> bool:
        return (bool(p.glob.get("rescale", False)) and self.sparsify in ("random", "magprune")
                and bool(self.sparse_inputs(p)))

    def map_l1(self, chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> dict[int, tuple[int, int]]:
        """The rescale pass: exact L1 norms of each sparsified task vector, whole and kept."""
        fast = _fused.l1_partials(self, chunk, stats, p, self.memo)  # compiled kernels (same bits)
        if fast is not None:
            return fast
        memo = self.memo
        memo.clear()
        _load_base(chunk)
        memo.set(chunk, "base")
        out = {}
        for i in self.sparse_inputs(p):
            d = _delta(chunk, i, chunk.scratch(4 + i))
            mask = self.keep_mask(chunk, stats, p, i, d, tmp=chunk.scratch(1))
            assert mask is not None
            out[i] = exact_abs_sums(d, mask)
            # apply on this read takes d_i and the mask as they are (kept masks: first 8 inputs)
            memo.add(chunk, f"delta{i}", *([f"keep{i}"] if _mask_slot(chunk, i, d.shape) is not None else []))
        return out

    def passes(self, p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
        out: tuple[StatPass, ...] = ()
        sel = self.selection(p, shape)
        if sel is not None:
            out += sel.passes
        if self.needs_rescale(p):
            out += (StatPass(name="l1", map=self.map_l1, reduce=_reduce_l1),)
        return out

    def apply(self, chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
        fast = _fused.generalized_apply(self, chunk, stats, p, self.memo)  # compiled kernels (same bits)
        if fast is not None:
            return fast
        memo = self.memo
        sel = self.selection(p, chunk.shape)
        w = p.column("weight")
        n = len(w)
        # what the rescale pass left on this read (d_i, masks), then the buffers are ours
        held = {t for t in ["base"] + [f"{k}{i}" for i in range(n) for k in ("delta", "keep")] if memo.has(chunk, t)}
        memo.clear()
        if "base" not in held:
            _load_base(chunk)
        base = chunk.scratch(0)
        factors = stats.get("l1", {})
        deltas = []
        for i in range(n):
            d = chunk.scratch(4 + i) if f"delta{i}" in held else _delta(chunk, i, chunk.scratch(4 + i))
            if f"keep{i}" in held:
                mask = _mask_slot(chunk, i, d.shape)
            else:
                mask = self.keep_mask(chunk, stats, p, i, d, sel, tmp=chunk.scratch(2))
            if mask is not None:
                d.mul_(mask)
            f = factors.get(i, 1.0)
            if f != 1.0:
                d.mul_(f)
            d.mul_(w[i])  # D_i = w_i d'_i
            deltas.append(d)
        mixed = chunk.scratch(1)
        if n == 1:
            mixed.copy_(deltas[0])
        else:
            torch.add(deltas[0], deltas[1], out=mixed)
        for d in deltas[2:]:
            mixed.add_(d)
        div: torch.Tensor | float
        if self.consensus:
            div = _elect(chunk, mixed, deltas, w)
            _load_base(chunk)  # its buffer was the election's temporary
        else:
            total = math.fsum(w)
            div = 1.0 if abs(total) < 1e-8 else total
        if p.glob.get("normalize", self.normalize):
            mixed.div_(div) if isinstance(div, torch.Tensor) else div_scalar_(mixed, div)
        lam = float(p.glob.get("lambda", 1.0))
        if lam != 1.0:
            mixed.mul_(lam)
        mixed.add_(base)
        return mixed

    def check(self, p: TensorParams) -> str | None:
        if self.sparsify != "magprune":
            return None
        for i in self.sparse_inputs(p):
            dens, eps = self.density(p, i), float(p.per_input[i].get("epsilon", 0.15))
            if dens > 0 and not (dens - eps > 0 and dens + eps < 1):
                return (f"{self.name} input {i + 1}: density {dens} and epsilon {eps} need 0 < density - epsilon "
                        "and density + epsilon < 1 (keep probabilities must lie in (0, 1)); "
                        "change `density` or `epsilon`")
        return None


def _fixed(q: int) -> Callable[[Mapping[str, Any]], int]:
    """A selection count known at plan time (it does not depend on an earlier pass)."""
    return lambda stats: q


def _share(q: int, n: int) -> Callable[[int, int], int]:
    """A chunk of `values` holds about q / n of its own among the tensor's q largest."""
    return lambda values, zeros: round(q * values / n)


def _reduce_l1(parts: Sequence[dict[int, tuple[int, int]]]) -> dict[int, float]:
    """Rescale factor of each sparsified input: its task vector's L1 norm over the kept part's."""
    factors = {}
    for i in parts[0]:
        full = exact_value(sum(pt[i][0] for pt in parts))
        kept = exact_value(sum(pt[i][1] for pt in parts))
        factors[i] = full / kept if full >= _RESCALE_EPS and kept >= _RESCALE_EPS else 1.0
    return factors


def _elect(chunk: Chunk, mixed: torch.Tensor, deltas: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """TIES sign election, in place: `mixed` becomes the sum of the D_i that agree with the sign
    of their sum; returns the divisor (sum of the agreeing weights, 1 where none agrees).

    s = sign(sum D_i), 0 counted as +; keep D_i whose sign equals s (0 never matches): D_i
    agrees when s * D_i > 0 (exact: a sign flip; NaN never agrees). Uses scratch 0 (the base)
    as a temporary: the caller reloads the base.
    """
    sgn = chunk.scratch(2)
    torch.ge(mixed, 0, out=sgn)  # 1.0 / 0.0
    sgn.mul_(2.0)
    sgn.sub_(1.0)
    mixed.zero_()
    div_t = chunk.scratch(3)
    div_t.zero_()
    agree = chunk.scratch(0)
    for wi, d in zip(w, deltas):
        # 1.0 / 0.0 masks: the same products as the boolean ones, at a third of the cost
        torch.mul(d, sgn, out=agree)
        torch.gt(agree, 0, out=agree)
        d.mul_(agree)  # d is not needed after this
        mixed.add_(d)
        agree.mul_(wi)
        div_t.add_(agree)
    # no agreeing input: divide by 1 (div + 1.0 where div == 0, + 0.0 elsewhere: exact)
    torch.eq(div_t, 0, out=agree)
    div_t.add_(agree)
    return div_t


def make_generalized(
    name: str, pretty: str, url: str, *, sparsify: Sparsify, consensus: bool,
    normalize: bool, rescale: bool | None,
) -> Method:
    """One member of the family; the options are the table in the module docstring."""
    params = [
        ParamSpec(name="weight", scope="model", doc="weight of this model's task vector"),
        ParamSpec(name="normalize", scope="global", default=normalize, kind="bool"),
        ParamSpec(name="lambda", scope="global", default=1.0, doc="scale of the merged task vector"),
    ]
    if sparsify != "none":
        # methods.md: density 0 keeps nothing (the base), 1 keeps all; MergeKit clamps nothing
        params.append(ParamSpec(name="density", scope="model", default=1.0, range=check_range(0, 1),
                                doc="fraction of each task vector kept"))
        params.append(ParamSpec(name="int8_mask", scope="global", default=False, kind="bool",
                                doc="MergeKit memory option; no effect here"))
    if sparsify == "outliers":
        params.append(ParamSpec(name="gamma", scope="model", default=0.01, range=check_range(0, 1),
                                doc="fraction of the largest magnitudes dropped"))
    if sparsify == "magprune":
        params.append(ParamSpec(name="epsilon", scope="model", default=0.15, range=check_range(0, 1),
                                doc="spread of keep probabilities around density"))
    if rescale is not None:
        params.append(ParamSpec(name="rescale", scope="global", default=rescale, kind="bool",
                                doc="rescale kept entries to the task vector's L1 norm"))
    family = _Family(name=name, sparsify=sparsify, consensus=consensus, normalize=normalize)
    return Method(
        name=name, pretty_name=pretty, reference_url=url, params=tuple(params), apply=family.apply,
        base="required", passes=family.passes, elementwise=sparsify == "none", check_tensor=family.check,
        # scratch: base, mixed, divisor, temp + one task vector per input (masks and bit
        # patterns live in them). Temporaries: 3 spare, plus DELLA's ranks and draws (+14)
        working_copies=lambda n: n + 4,
        # compiled (methods/_fused.py): one, for a NaN result's float32 output; DELLA's
        # keep-masks and rescaled task vectors still take scratch 2 and 4 + i
        compiled_working_copies=None if sparsify == "magprune" else (lambda n: 1),
        temporaries=lambda n: 3 + _EXTRA[sparsify],
        row_granularity=_granularity if sparsify == "magprune" else (lambda s, p: 1),
    )


def _mask_slot(chunk: Chunk, i: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Where input i's random keep-mask lives: a quarter of scratch 2 (inputs 0-3) or 3 (4-7).

    Both are free until the sign election; None (allocate) beyond 8 inputs.
    """
    if i >= 8:
        return None
    return bool_view(chunk.scratch(2 + i // 4), shape, i % 4)


def _granularity(shape: tuple[int, ...], params: TensorParams) -> int:
    """DELLA ranks along dim 1: a chunk holds whole groups (1-D: the whole vector)."""
    if len(shape) <= 1:
        return shape[0] if shape else 1
    if len(shape) == 2:
        return 1
    return math.prod(shape[1:-1])


FAMILY = (
    make_generalized("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                     sparsify="none", consensus=False, normalize=False, rescale=None),
    make_generalized("ties", "TIES", "https://arxiv.org/abs/2306.01708",
                     sparsify="magnitude", consensus=True, normalize=True, rescale=None),
    make_generalized("dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099",
                     sparsify="random", consensus=False, normalize=False, rescale=True),
    make_generalized("dare_ties", "DARE (TIES)", "https://arxiv.org/abs/2311.03099",
                     sparsify="random", consensus=True, normalize=False, rescale=True),
    make_generalized("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
                     sparsify="outliers", consensus=False, normalize=False, rescale=None),
    make_generalized("breadcrumbs_ties", "Model Breadcrumbs (TIES)", "https://arxiv.org/abs/2312.06795",
                     sparsify="outliers", consensus=True, normalize=False, rescale=None),
    make_generalized("della_linear", "DELLA (linear)", "https://arxiv.org/abs/2406.11617",
                     sparsify="magprune", consensus=False, normalize=False, rescale=True),
    make_generalized("della", "DELLA", "https://arxiv.org/abs/2406.11617",
                     sparsify="magprune", consensus=True, normalize=True, rescale=True),
)
