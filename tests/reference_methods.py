"""Plain whole-tensor float64 reference implementations of every method, from methods.md.

Deliberately naive (whole tensors, sorts, no streaming): they are the yardstick the
streaming engine is compared with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Ref = Callable[[torch.Tensor | None, list[torch.Tensor], list[dict], dict], torch.Tensor]


def _avg_weights(kind: str, n: int, alpha: float) -> list[float]:
    if kind == "sma":
        return [1 / n] * n
    if kind == "wma":
        return [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def linear(base, xs, per, glob):
    w = [p["weight"] for p in per]
    out = sum(wi * x for wi, x in zip(w, xs))
    return out / sum(w) if glob.get("normalize", True) else out


def task_arithmetic(base, xs, per, glob):
    w = [p["weight"] for p in per]
    mixed = sum(wi * (x - base) for wi, x in zip(w, xs))
    if glob.get("normalize", False) and abs(sum(w)) >= 1e-8:
        mixed = mixed / sum(w)
    return base + glob.get("lambda", 1.0) * mixed


def passthrough(base, xs, per, glob):
    return xs[0] * per[0].get("scale", 1.0)


def _average(kind: str) -> Ref:
    def ref(base, xs, per, glob):
        w = _avg_weights(kind, len(xs), glob.get("alpha", 0.2))
        return sum(wi * x for wi, x in zip(w, xs))

    return ref


REFERENCES: dict[str, Ref] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "passthrough": passthrough,
    "sma": _average("sma"),
    "wma": _average("wma"),
    "ema": _average("ema"),
}


def fp32_bound(base, xs, per, glob, method: str) -> torch.Tensor:
    """Rounding bound of fp32 accumulation: about n * 2^-24 * sum |w_i x_i| (+ base terms)."""
    n = len(xs) + 2
    if method in ("sma", "wma", "ema"):
        w = _avg_weights(method, len(xs), glob.get("alpha", 0.2))
    else:
        w = [p.get("weight", p.get("scale", 1.0)) for p in per]
        if method == "linear" and glob.get("normalize", True):
            w = [x / sum(w) for x in w]
    mag = sum(abs(wi) * x.abs() for wi, x in zip(w, xs))
    if base is not None:
        lam = abs(glob.get("lambda", 1.0))
        mag = lam * (mag + sum(abs(wi) for wi in w) * base.abs()) + base.abs()
    return 4 * n * 2.0**-24 * mag
