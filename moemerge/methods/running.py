"""The running-sum stage of incremental PMA (`pma update`) on fp64 chunks (methods.md,
"incremental forms"): the snapshots entering and leaving plus the previous sums in, the next
sums and the average out. Pure math on one block of a chunk: no storage, no buffers of its own.

SMA keeps the window sum S; WMA keeps S and W = sum(i * M_i) with i = 1 for the oldest of the
window; EMA keeps E. Multiply and add are separate steps (never fused forms), so results do
not depend on the chunk size (see methods/_kernels.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["RunningStep", "QUANTITIES", "SCRATCH", "include", "slide", "ema_step", "average", "DIVISORS"]

#: Running quantities per method: the state arrays an update reads and writes. Megatron's
#: `linear` schedule is uniform (an SMA: S); `minus-sqrt` keeps its average A, only ever built
#: from the window (its weights all change as the window moves; pma.decide.RECOMPUTED).
QUANTITIES: dict[str, tuple[str, ...]] = {"sma": ("S",), "wma": ("S", "W"), "ema": ("E",),
                                          "linear": ("S",), "minus-sqrt": ("A",)}
#: fp64 scratch blocks a step needs: the entering snapshot, the leaving one (or a product),
#: and WMA's n * M_new.
SCRATCH = 3

Mode = Literal["build", "slide", "output"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningStep:
    """What one update does to every block of every float tensor.

    `build`: the sums from scratch over the window (`snapshots` inputs, oldest first);
    `slide`: the previous sums moved on: SMA/WMA take `entering` new snapshots and drop as many
    oldest (inputs: the entering ones, then the leaving ones, in order), EMA takes `entering`;
    `output`: the sums as they are (no snapshot read), only the average is made.
    """

    method: Literal["sma", "wma", "ema", "linear", "minus-sqrt"]
    mode: Mode
    snapshots: int
    """Snapshot inputs per block, in the order above."""
    window: int
    """Snapshots in the sums after the step: the average's n."""
    alpha: float | None = None
    growing: int = 0
    """`slide`, SMA/WMA: how many of the entering snapshots fill a window not yet full (they
    come first and enter with none leaving, at positions window - growing + 1...; exactly as a
    build adds them); the other entering ones pair with the leaving ones."""

    def __post_init__(self) -> None:
        if self.method not in QUANTITIES:
            raise ValueError(f"running step: unknown average {self.method!r}; use {', '.join(QUANTITIES)}")
        if self.method == "minus-sqrt" and self.mode == "slide":
            raise ValueError("running step: minus-sqrt has no running form; build it from the window")
        if self.mode == "slide" and self.method != "ema" and (self.snapshots - self.growing) % 2:
            raise ValueError(f"running step: {self.snapshots} inputs ({self.growing} filling the window) "
                             "cannot pair entering with leaving snapshots")

    @property
    def quantities(self) -> tuple[str, ...]:
        return QUANTITIES[self.method]

    @property
    def reads_sums(self) -> bool:
        """Whether the previous sums are an input (every mode but `build`)."""
        return self.mode != "build"

    @property
    def writes_sums(self) -> bool:
        """Whether new sums are an output (every mode but `output`)."""
        return self.mode != "output"

    def fold(self, snaps: Sequence[torch.Tensor], sums_in: Mapping[str, torch.Tensor],
             sums_out: Mapping[str, torch.Tensor], scratch: Sequence[torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The sums after this step for one block, into `sums_out` (fp64); returns them (the
        input sums themselves in `output` mode). `snaps` are the block's snapshot values in any
        float dtype (converted exactly to fp64), `scratch` SCRATCH fp64 blocks as long."""
        m, tmp, extra = scratch[0], scratch[1], scratch[2]
        if self.mode == "output":
            return sums_in
        if self.mode == "build":
            if self.method == "minus-sqrt":
                from moemerge.methods.averages import schedule_weights

                a = sums_out["A"]  # A = sum_j c_j M_j, Megatron's coefficients, oldest first
                for i, (x, c) in enumerate(zip(snaps, schedule_weights(self.method, len(snaps)))):
                    (a if i == 0 else m).copy_(x)
                    (a if i == 0 else m).mul_(c)
                    if i:
                        a.add_(m)
                return sums_out
            for i, x in enumerate(snaps):
                m.copy_(x)
                include(self.method, sums_out, m, i + 1, self.alpha, tmp)
            return sums_out
        src: Mapping[str, torch.Tensor] | None = sums_in  # the first step reads the old sums
        if self.method == "ema":
            for x in snaps:
                m.copy_(x)
                ema_step(sums_out["E"], m, float(self.alpha), src=None if src is None else src["E"])  # type: ignore[arg-type]
                src = None
        else:
            g = self.growing
            if g:  # the window fills: the same adds as a build, from the previous sums
                for q in self.quantities:
                    sums_out[q].copy_(src[q])  # type: ignore[index]
                src = None
                for j, x in enumerate(snaps[:g]):
                    m.copy_(x)
                    include(self.method, sums_out, m, self.window - g + j + 1, self.alpha, tmp)
                snaps = snaps[g:]
            k = len(snaps) // 2
            for new, old in zip(snaps[:k], snaps[k:]):
                m.copy_(new)
                tmp.copy_(old)
                slide(sums_out, m, tmp, self.window, extra, src=src)
                src = None
        if src is not None:  # nothing entered
            for q in self.quantities:
                sums_out[q].copy_(src[q])
        return sums_out

    def average(self, sums: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """The average of the window from its sums, into `out` (fp64)."""
        return average(self.method, sums, self.window, out)


def include(method: str, sums: Mapping[str, torch.Tensor], m: torch.Tensor, position: int,
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


def slide(sums: Mapping[str, torch.Tensor], m_new: torch.Tensor, m_old: torch.Tensor, n: int,
          tmp: torch.Tensor, src: Mapping[str, torch.Tensor] | None = None) -> None:
    """Move a window of `n` one snapshot on: M_new enters, M_old (the oldest) leaves.

    W' = W - S + n M_new (every snapshot's position drops by one, the oldest's to zero), then
    S' = S + M_new - M_old. In place, or from the sums `src` into `sums` (the same operations,
    so the same bits, without a copy first).
    """
    import torch

    old = sums if src is None else src
    if "W" in sums:
        w = sums["W"]
        torch.sub(old["W"], old["S"], out=w)
        tmp.copy_(m_new)
        tmp.mul_(n)
        w.add_(tmp)
    s = sums["S"]
    torch.add(old["S"], m_new, out=s)
    s.sub_(m_old)


def ema_step(e: torch.Tensor, m: torch.Tensor, alpha: float, src: torch.Tensor | None = None) -> None:
    """E' = alpha M + (1 - alpha) E, in place or from `src` into `e` (`m` is overwritten with
    alpha M)."""
    import torch

    m.mul_(alpha)
    torch.mul(e if src is None else src, 1.0 - alpha, out=e)
    e.add_(m)


def _n(n: int) -> int:
    return n


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def _one(n: int) -> int:
    return 1


#: What the average divides its running sum by, for a window of n.
DIVISORS = {"sma": _n, "wma": _triangle, "ema": _one, "linear": _n, "minus-sqrt": _one}


def average(method: str, sums: Mapping[str, torch.Tensor], n: int, out: torch.Tensor) -> torch.Tensor:
    """The average of a window of `n` from its sums, into `out` (fp64): S/n, W/(n(n+1)/2), E."""
    import torch

    src = sums["E"] if method == "ema" else sums["W"] if method == "wma" else sums["A"] if method == "minus-sqrt" \
        else sums["S"]
    div = DIVISORS[method](n)
    if div == 1:
        out.copy_(src)
    else:
        torch.div(src, div, out=out)  # one correctly rounded division
    return out
