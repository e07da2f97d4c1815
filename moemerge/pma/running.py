"""Running-sum math of incremental PMA on fp64 chunks (methods.md, "incremental forms").

SMA keeps the window sum S; WMA keeps S and W = sum(i * M_i) with i = 1 for the oldest of the
window; EMA keeps E. Pure functions on tensors of one row-chunk: no storage here. Multiply and
add are separate steps (never fused forms), so results do not depend on the chunk size (see
methods/_kernels.py).
"""

from __future__ import annotations

import torch

__all__ = ["include", "slide", "ema_step", "average", "DIVISORS"]


def include(method: str, sums: dict[str, torch.Tensor], m: torch.Tensor, position: int,
            alpha: float | None, tmp: torch.Tensor) -> None:
    """Fold snapshot chunk `m` (fp64), the `position`-th of a window (1 = oldest), into `sums`.

    Building from scratch: S = M_1 + ... + M_N; W = 1 M_1 + ... + N M_N; EMA E_1 = M_1,
    E_i = alpha M_i + (1 - alpha) E_{i-1}. `m` and `tmp` are scratch (may be overwritten).
    """
    if position == 1:
        for q in sums.values():
            q.copy_(m)
        return
    if method == "ema":
        ema_step(sums["E"], m, float(alpha))  # type: ignore[arg-type]
        return
    if "W" in sums:
        tmp.copy_(m)
        tmp.mul_(position)  # exact: an integer times a value of <= 24 significant bits
        sums["W"].add_(tmp)
    sums["S"].add_(m)


def slide(sums: dict[str, torch.Tensor], m_new: torch.Tensor, m_old: torch.Tensor, n: int,
          tmp: torch.Tensor) -> None:
    """Move a window of `n` one snapshot on: M_new enters, M_old (the oldest) leaves.

    W' = W - S + n M_new (every snapshot's position drops by one, the oldest's to zero), then
    S' = S + M_new - M_old.
    """
    if "W" in sums:
        w = sums["W"]
        w.sub_(sums["S"])
        tmp.copy_(m_new)
        tmp.mul_(n)
        w.add_(tmp)
    s = sums["S"]
    s.add_(m_new)
    s.sub_(m_old)


def ema_step(e: torch.Tensor, m: torch.Tensor, alpha: float) -> None:
    """E' = alpha M + (1 - alpha) E, in place (`m` is overwritten with alpha M)."""
    m.mul_(alpha)
    e.mul_(1.0 - alpha)
    e.add_(m)


#: What the average divides its running sum by, for a window of n.
DIVISORS = {"sma": lambda n: n, "wma": lambda n: n * (n + 1) // 2, "ema": lambda n: 1}


def average(method: str, sums: dict[str, torch.Tensor], n: int, out: torch.Tensor) -> torch.Tensor:
    """The average of a window of `n` from its sums, into `out` (fp64): S/n, W/(n(n+1)/2), E."""
    src = sums["E"] if method == "ema" else sums["W"] if method == "wma" else sums["S"]
    div = DIVISORS[method](n)
    if div == 1:
        out.copy_(src)
    else:
        torch.div(src, div, out=out)  # one correctly rounded division
    return out
