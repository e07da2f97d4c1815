"""linear (model soup): sum(w_i x_i) / sum(w_i), or the plain weighted sum without normalize."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._fused import WEIGHTED_SUMS
from moemerge.methods._kernels import weighted_sum
from moemerge.methods.base import Chunk, Method, ParamSpec, TensorParams

__all__ = ["LINEAR", "linear_weights"]


def linear_weights(params: TensorParams) -> list[float]:
    """Per-input weights, divided by their sum when `normalize` (computed in float64)."""
    w = params.column("weight")
    if params.glob.get("normalize", True):
        total = sum(w)
        w = [x / total for x in w]
    return w


def _check(params: TensorParams) -> str | None:
    if params.glob.get("normalize", True) and abs(sum(params.column("weight"))) < 1e-12:
        return (
            f"weights {params.column('weight')} sum to 0 with normalize: true; "
            "change a weight or set `normalize: false`"
        )
    return None


def _weights(params: TensorParams, n_inputs: int) -> list[float]:
    return linear_weights(params)


def _apply(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> torch.Tensor:
    return weighted_sum(chunk, _weights(params, chunk.n_inputs))


LINEAR = Method(
    name="linear",
    pretty_name="Linear (model soup)",
    reference_url="https://arxiv.org/abs/2203.05482",
    params=(
        ParamSpec(name="weight", scope="model", doc="relative weight of this model"),
        ParamSpec(name="normalize", scope="global", default=True, kind="bool",
                  doc="divide by the sum of the weights"),
    ),
    apply=_apply,
    elementwise=True,
    check_tensor=_check,
)

# the engine's one-pass path (methods/_fused.py `weighted_into`) computes the same sum
WEIGHTED_SUMS[LINEAR.name] = _weights
