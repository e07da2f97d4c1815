"""ram and ramplus_tl: Reinforced Agent Merging (arXiv 2601.13572), as MergeKit 0.1.5 has them.

Per element, task vectors d_i = x_i - b count where |d_i| > epsilon (m_i) and c = sum_i m_i:
- ram: out = b + sum_i(m_i d_i) / max(c, 1) (a value only one model moved is taken whole,
  values several moved are averaged over those models, the rest stay the base).
- ramplus_tl: per model, over the whole tensor, shared_i = #{m_i and c > 1} and
  unique_i = #{m_i and c == 1}; rho_i = shared_i / max(unique_i, epsilon) and
  lambda_i = 1 + r clamp(rho_i, 0, alpha) (float32, as MergeKit); where c == 1 the one
  moved value is scaled by its model's lambda_i, elsewhere as ram.
Reference: mergekit/merge_methods/ram.py (`ram_merge`, `ramplus_tl_merge`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams, check_range

__all__ = ["RAM", "RAMPLUS_TL", "ramplus_lambdas"]

_EPS = ParamSpec(name="epsilon", scope="global", default=1e-5, range=check_range(0, None),
                 doc="a task-vector entry counts as moved when |x_i - b| > epsilon")
#: ramplus_tl also divides by max(unique_i, epsilon): at 0, a model that moved nothing gives
#: 0/0 = NaN and MergeKit writes NaN wherever one model moved; so epsilon must be > 0 there.
_EPS_PLUS = ParamSpec(name="epsilon", scope="global", default=1e-5, range=check_range(0, None, lo_open=True),
                      doc="as ram's; also the floor of the unique count in rho (must be > 0)")


def _moved_sum(chunk: Chunk, eps: float, lambdas: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sum_i m_i d_i, c, sum_i m_i d_i lambda_i or None) in scratch 2, 3, 5; base in scratch 0.

    Masks are 1.0/0.0 floats, so a NaN task-vector entry propagates as in MergeKit (NaN * 0).
    """
    b = chunk.base(out=chunk.scratch(0))
    d = chunk.scratch(1)
    acc, cnt, m = chunk.scratch(2), chunk.scratch(3), chunk.scratch(4)
    lam_acc = chunk.scratch(5) if lambdas is not None else None
    acc.zero_()
    cnt.zero_()
    if lam_acc is not None:
        lam_acc.zero_()
    for i in range(chunk.n_inputs):
        chunk.input(i, out=d)
        d.sub_(b)
        torch.abs(d, out=m)
        torch.gt(m, eps, out=m)
        d.mul_(m)
        acc.add_(d)
        cnt.add_(m)
        if lam_acc is not None and lambdas is not None:
            d.mul_(lambdas[i])
            lam_acc.add_(d)
    return acc, cnt, lam_acc


def _finish(chunk: Chunk, acc: torch.Tensor, cnt: torch.Tensor, lam_acc: torch.Tensor | None) -> torch.Tensor:
    unique = torch.eq(cnt, 1) if lam_acc is not None else None  # before cnt is clamped
    cnt.clamp_min_(1.0)  # c = 0 leaves acc = 0; c = 1 divides by one exactly
    acc.div_(cnt)
    if lam_acc is not None and unique is not None:
        torch.where(unique, lam_acc, acc, out=acc)
    acc.add_(chunk.scratch(0))
    return acc


def _ram_apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    acc, cnt, _ = _moved_sum(chunk, float(p.glob.get("epsilon", 1e-5)), None)
    return _finish(chunk, acc, cnt, None)


def _count_map(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> np.ndarray:
    """Per input, [#moved where c > 1, #moved where c == 1] in this chunk (int64, exact)."""
    eps = float(p.glob.get("epsilon", 1e-5))
    b = chunk.base(out=chunk.scratch(0))
    d, cnt = chunk.scratch(1), chunk.scratch(3)
    cnt.zero_()
    for i in range(chunk.n_inputs):
        chunk.input(i, out=d)
        d.sub_(b)
        d.abs_()
        torch.gt(d, eps, out=d)
        cnt.add_(d)
    multi = torch.gt(cnt, 1)
    one = torch.eq(cnt, 1)
    out = np.zeros((chunk.n_inputs, 2), np.int64)
    for i in range(chunk.n_inputs):
        chunk.input(i, out=d)
        d.sub_(b)
        d.abs_()
        moved = torch.gt(d, eps)
        out[i, 0] = int(torch.count_nonzero(moved & multi))
        out[i, 1] = int(torch.count_nonzero(moved & one))
    return out


def _count_reduce(parts: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(parts[0])
    for part in parts:
        total += part
    return total


def _ramplus_passes(p: TensorParams, shape: tuple[int, ...]) -> tuple[StatPass, ...]:
    return (StatPass(name="ram:counts", map=_count_map, reduce=_count_reduce,
                     combine=lambda a, b: _count_reduce([a, b])),)


def ramplus_lambdas(counts: np.ndarray, r: float, alpha: float, eps: float) -> list[float]:
    """lambda_i = 1 + r clamp(shared_i / max(unique_i, eps), 0, alpha), in float32 as MergeKit.

    counts: [inputs, 2] of (shared_i, unique_i). Example: counts [[5, 0]] (r 0.1, alpha 0.2,
    eps 1e-5) -> rho 5e5, clamped to 0.2 -> lambda 1.02 (float32).
    """
    f = np.float32
    out = []
    for shared, unique in counts.tolist():
        den = f(unique) if f(unique) >= f(eps) else f(eps)  # torch: int counts .clamp(min=eps) -> float32
        rho = f(shared) / den
        lam = f(1) + f(r) * np.clip(rho, f(0), f(alpha))
        out.append(float(lam))
    return out


def _ramplus_apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    eps = float(p.glob.get("epsilon", 1e-5))
    lambdas = ramplus_lambdas(stats["ram:counts"], float(p.glob.get("r", 0.1)),
                              float(p.glob.get("alpha", 0.2)), eps)
    acc, cnt, lam_acc = _moved_sum(chunk, eps, lambdas)
    return _finish(chunk, acc, cnt, lam_acc)


RAM = Method(
    name="ram",
    pretty_name="Reinforced Agent Merging",
    reference_url="https://arxiv.org/abs/2601.13572",
    params=(_EPS,),
    apply=_ram_apply,
    base="required",
    min_inputs=1,
    elementwise=True,
    # scratch: base, task vector, sum, count, mask
    working_copies=lambda n: 5,
)

RAMPLUS_TL = Method(
    name="ramplus_tl",
    pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
    reference_url="https://arxiv.org/abs/2601.13572",
    params=(
        ParamSpec(name="r", scope="global", default=0.1, range=check_range(0, None),
                  doc="strength of the boost of values only one model moved"),
        ParamSpec(name="alpha", scope="global", default=0.2, range=check_range(0, None),
                  doc="cap on rho = shared / unique before scaling by r"),
        _EPS_PLUS,
    ),
    apply=_ramplus_apply,
    base="required",
    min_inputs=1,
    passes=_ramplus_passes,
    # scratch: base, task vector, sum, count, mask, lambda-weighted sum; temporaries: bool
    # masks (moved, c > 1, c == 1) in the counting pass and the c == 1 mask in apply
    working_copies=lambda n: 6,
    temporaries=lambda n: 1,
)
