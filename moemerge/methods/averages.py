"""Checkpoint averages over one training run (PMA): SMA, WMA, EMA; inputs oldest first.

Definitions from methods.md / arXiv 2505.12082: SMA sum(M_i)/N; WMA weights i / sum(i);
EMA E_1 = M_1, E_i = alpha M_i + (1-alpha) E_{i-1}, i.e. weights (1-alpha)^(N-1) for M_1 and
alpha (1-alpha)^(N-i) for i >= 2 (they sum to 1).

The coefficient schedules `linear` and `minus-sqrt` are Megatron-LM's
(`tools/checkpoint/weighted_merge.py`, `schedule_to_merge_coefficients`): the discrete
differences of a decay f over the positions j/N, j = 0..N-1 (oldest first),
c_j = f(j/N) - f((j+1)/N) with f(1) taken as 0, so that they sum to 1: `linear`, f(x) = 1 - x,
gives c_j = 1/N (a uniform average); `minus-sqrt`, f(x) = 1 - sqrt(x), gives
c_j = sqrt((j+1)/N) - sqrt(j/N) (the oldest weighs most: merging emulates a decayed LR, WSM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods._fused import WEIGHTED_SUMS
from moemerge.methods._kernels import weighted_sum
from moemerge.methods.base import Chunk, Method, ParamSpec, TensorParams, check_range
from moemerge.settings import DEFAULT_ALPHA

__all__ = ["SMA", "WMA", "EMA", "MINUS_SQRT", "average_weights", "schedule_weights", "SCHEDULES"]

#: Megatron-LM's decay schedules (`weighted_merge.py` SCHEDULES): position x in [0, 1) -> f(x).
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "minus-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def schedule_weights(schedule: str, n: int) -> list[float]:
    """Megatron's merge coefficients of n checkpoints (oldest first) for a decay schedule.

    As `schedule_to_merge_coefficients` computes them: d_j = f(j/n); c_{n-1} = d_{n-1};
    c_j = d_j - d_{j+1} for 0 < j < n-1; c_0 = 1 - sum(c_1..c_{n-1}); one checkpoint weighs 1.
    Example: schedule_weights("minus-sqrt", 4) == [0.5, 0.2071..., 0.1589..., 0.1339...].
    """
    f = SCHEDULES[schedule]
    if n <= 1:
        return [1.0] * n
    d = [f(j / n) for j in range(n)]
    c = [0.0] * n
    c[-1] = d[-1]
    for j in range(1, n - 1):
        c[j] = d[j] - d[j + 1]
    c[0] = 1 - sum(c)  # c[0] is still 0 here, as in Megatron: the rest's complement
    return c


def average_weights(method: str, n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Weights of the n snapshots (oldest first) for `sma`, `wma`, `ema`, `linear` or
    `minus-sqrt`; they sum to 1.

    Example: average_weights("ema", 3, 0.5) == [0.25, 0.25, 0.5].
    """
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        total = n * (n + 1) / 2
        return [(i + 1) / total for i in range(n)]
    if method == "ema":
        return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
    if method in SCHEDULES:
        return schedule_weights(method, n)
    raise ValueError(f"unknown average {method!r}")


def _make(name: str, pretty: str) -> Method:
    def weights(params: TensorParams, n_inputs: int) -> list[float]:
        return average_weights(name, n_inputs, float(params.glob.get("alpha", DEFAULT_ALPHA)))

    def apply(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> torch.Tensor:
        return weighted_sum(chunk, weights(params, chunk.n_inputs))

    # the engine's one-pass path (methods/_fused.py `weighted_into`) computes the same sum
    WEIGHTED_SUMS[name] = weights

    params: tuple[ParamSpec, ...] = ()
    if name == "ema":
        params = (ParamSpec(name="alpha", scope="global", default=DEFAULT_ALPHA, range=check_range(0, 1, lo_open=True),
                            doc="weight of the newest snapshot in each EMA step"),)
    return Method(
        name=name,
        pretty_name=pretty,
        # minus-sqrt: Megatron-LM tools/checkpoint/weighted_merge.py, after WSM (arXiv 2507.17634)
        reference_url="https://arxiv.org/abs/2507.17634" if name in SCHEDULES else "https://arxiv.org/abs/2505.12082",
        params=params,
        apply=apply,
        elementwise=True,
    )


SMA = _make("sma", "Simple moving average (PMA)")
WMA = _make("wma", "Weighted moving average (PMA)")
EMA = _make("ema", "Exponential moving average (PMA)")
#: Megatron-LM's `minus-sqrt` coefficients (`pma --schedule minus-sqrt`; `linear` is a uniform
#: average, MergeKit's `linear` with equal weights, so it needs no method of its own).
MINUS_SQRT = _make("minus-sqrt", "Minus-sqrt checkpoint-merge schedule (Megatron-LM)")
