"""nearswap: take the other model where it is within t of the base, blend toward the base elsewhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods.base import Chunk, Method, ParamSpec, TensorParams, check_range

__all__ = ["NEARSWAP"]


def _apply(chunk: Chunk, stats: Mapping[str, Any], p: TensorParams) -> torch.Tensor:
    # a = clamp(t / max(|b - x|, 1e-6), 0, 1); out = a x + (1 - a) b
    b = chunk.base(out=chunk.scratch(0))
    x = chunk.input(0, out=chunk.scratch(1))
    a = chunk.scratch(2)
    torch.sub(b, x, out=a)
    a.abs_().clamp_min_(1e-6)
    torch.div(float(p.glob["t"]), a, out=a)
    a.clamp_(0.0, 1.0)
    x.mul_(a)
    a.neg_().add_(1.0)
    b.mul_(a)
    x.add_(b)
    return x


NEARSWAP = Method(
    name="nearswap",
    pretty_name="NearSwap",
    reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    params=(ParamSpec(name="t", scope="global", range=check_range(0, None),
                      doc="distance below which the other model's value is taken"),),
    apply=_apply,
    base="required",
    min_inputs=1,
    max_inputs=1,
    elementwise=True,
    working_copies=lambda n: 3,
)
