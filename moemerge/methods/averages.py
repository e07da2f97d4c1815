"""Checkpoint averages over one training run (PMA): SMA, WMA, EMA; inputs oldest first.

Definitions from methods.md / arXiv 2505.12082: SMA sum(M_i)/N; WMA weights i / sum(i);
EMA E_1 = M_1, E_i = alpha M_i + (1-alpha) E_{i-1}, i.e. weights (1-alpha)^(N-1) for M_1 and
alpha (1-alpha)^(N-i) for i >= 2 (they sum to 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moemerge.methods._kernels import weighted_sum
from moemerge.methods.base import Chunk, Method, ParamSpec, TensorParams, check_range
from moemerge.settings import DEFAULT_ALPHA

__all__ = ["SMA", "WMA", "EMA", "average_weights"]


def average_weights(method: str, n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Weights of the n snapshots (oldest first) for `sma`, `wma` or `ema`; they sum to 1.

    Example: average_weights("ema", 3, 0.5) == [0.25, 0.25, 0.5].
    """
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        total = n * (n + 1) / 2
        return [(i + 1) / total for i in range(n)]
    if method == "ema":
        return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
    raise ValueError(f"unknown average {method!r}")


def _make(name: str, pretty: str) -> Method:
    def apply(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> torch.Tensor:
        alpha = float(params.glob.get("alpha", DEFAULT_ALPHA))
        return weighted_sum(chunk, average_weights(name, chunk.n_inputs, alpha))

    params: tuple[ParamSpec, ...] = ()
    if name == "ema":
        params = (ParamSpec(name="alpha", scope="global", default=DEFAULT_ALPHA, range=check_range(0, 1, lo_open=True),
                            doc="weight of the newest snapshot in each EMA step"),)
    return Method(
        name=name,
        pretty_name=pretty,
        reference_url="https://arxiv.org/abs/2505.12082",
        params=params,
        apply=apply,
        elementwise=True,
    )


SMA = _make("sma", "Simple moving average (PMA)")
WMA = _make("wma", "Weighted moving average (PMA)")
EMA = _make("ema", "Exponential moving average (PMA)")
