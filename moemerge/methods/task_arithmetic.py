"""task_arithmetic: b + lambda * sum(w_i (x_i - b)) [/ sum(w_i) if normalize]."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moemerge.methods._kernels import weighted_delta_sum
from moemerge.methods.base import Chunk, Method, ParamSpec, TensorParams

__all__ = ["TASK_ARITHMETIC"]


def _apply(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> torch.Tensor:
    w = params.column("weight")
    lam = float(params.glob.get("lambda", 1.0))
    if params.glob.get("normalize", False):
        div = sum(w)
        # methods.md: a divisor of magnitude under 1e-8 becomes 1 (MergeKit's rule)
        if abs(div) >= 1e-8:
            w = [x / div for x in w]
    base = chunk.base(out=chunk.scratch(2))
    acc = weighted_delta_sum(chunk, base, w)
    acc.mul_(lam)
    acc.add_(base)
    return acc


TASK_ARITHMETIC = Method(
    name="task_arithmetic",
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    params=(
        ParamSpec(name="weight", scope="model", doc="weight of this model's task vector"),
        ParamSpec(name="normalize", scope="global", default=False, kind="bool"),
        ParamSpec(name="lambda", scope="global", default=1.0, doc="scale of the merged task vector"),
    ),
    apply=_apply,
    elementwise=True,
    base="required",
    working_copies=lambda n: 3,
)
