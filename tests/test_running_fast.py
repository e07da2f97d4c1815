"""The compiled running-sum pass (methods._running_fast) against the torch stage
(methods.running, block by block as engine/running.py runs it): the same sums and the same
average bits, for every method, mode and dtype it takes; a NaN average hands the chunk back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moemerge.methods import _running_fast as fast
from moemerge.methods.running import RunningStep
from tests.reference_methods import running_fold

pytestmark = pytest.mark.skipif(not fast.available(), reason="numba not available")


def _values(g: torch.Generator, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values of one element spread over many binades, with zeros, -0.0, subnormals
    and exact bf16 midpoints of the average (so rounding twice and ties are exercised)."""
    x = torch.randn(numel, generator=g, dtype=torch.float64) * 0.02
    x[::7] *= 2.0 ** torch.randint(-30, 30, x[::7].shape, generator=g).double()
    x[::11] = 0.0
    x[5::13] = -0.0
    x[3::17] = 1e-40
    return x.to(dtype)


def _fast(step: RunningStep, snaps: list[torch.Tensor], sums_in: dict[str, torch.Tensor],
          out_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    numel = snaps[0].numel() if snaps else next(iter(sums_in.values())).numel()
    out = {q: torch.full((numel,), -3.0, dtype=torch.float64) for q in step.quantities} if step.writes_sums else {}
    avg = torch.empty(numel, dtype=out_dtype)
    before = [x.clone() for x in snaps] + [v.clone() for v in sums_in.values()]
    done = fast.fold_average(step, snaps, sums_in, out, avg)
    after = list(snaps) + list(sums_in.values())
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, after))  # inputs kept
    return out, avg, done


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (so -0.0 and +0.0 differ)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _built(method: str, snaps: list[torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    step = RunningStep(method=method, mode="build", snapshots=len(snaps), window=len(snaps), alpha=alpha)  # type: ignore[arg-type]
    return running_fold(step, snaps, {})[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["sma", "wma", "ema", "linear"])
def test_every_mode_gives_the_torch_bits(method: str, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hash((method, str(dtype), str(out_dtype))) % 2**31)
    numel = 30_011
    snaps = [_values(g, numel, dtype) for _ in range(9)]
    alpha = 0.3 if method == "ema" else None
    n = 5
    built = _built(method, snaps[:n], alpha)
    steps: list[tuple[RunningStep, list[torch.Tensor], dict[str, torch.Tensor]]] = [
        (RunningStep(method=method, mode="build", snapshots=n, window=n, alpha=alpha), snaps[:n], {}),  # type: ignore[arg-type]
        (RunningStep(method=method, mode="output", snapshots=0, window=n, alpha=alpha), [], built),  # type: ignore[arg-type]
    ]
    if method == "ema":
        steps += [(RunningStep(method=method, mode="slide", snapshots=k, window=n + k, alpha=alpha), snaps[n:n + k], built)
                  for k in (1, 3)]
    else:
        steps += [
            # one night: one enters, the oldest leaves; two nights at once
            (RunningStep(method=method, mode="slide", snapshots=2, window=n), [snaps[n], snaps[0]], built),  # type: ignore[arg-type]
            (RunningStep(method=method, mode="slide", snapshots=4, window=n),  # type: ignore[arg-type]
             [snaps[n], snaps[n + 1], snaps[0], snaps[1]], built),
            # a window still filling: two enter with none leaving, then one slides
            (RunningStep(method=method, mode="slide", snapshots=4, window=n + 2, growing=2),  # type: ignore[arg-type]
             [snaps[n], snaps[n + 1], snaps[n + 2], snaps[0]], built),
            (RunningStep(method=method, mode="slide", snapshots=1, window=n + 1, growing=1), [snaps[n]], built),  # type: ignore[arg-type]
        ]
    for step, xs, ins in steps:
        want_sums, want_avg = running_fold(step, xs, ins, out_dtype=out_dtype)
        got_sums, got_avg, done = _fast(step, xs, ins, out_dtype)
        assert done, step
        assert all(_same(got_sums[q], want_sums[q]) for q in want_sums), step
        assert _same(got_avg, want_avg), step


def test_rounding_twice_and_ties_as_torch() -> None:
    """Sums whose average lies just off a bf16 midpoint: torch rounds to float32 first, then to
    bf16 (ties to even); a direct rounding would differ on about half of them."""
    g = np.random.default_rng(3)
    k = g.integers(0, 127, 20_000)
    s = (1.0 + (2 * k + 1) * 2.0 ** -8 + g.choice([-1.0, 1.0], k.size) * 2.0 ** -40) * 4
    step = RunningStep(method="sma", mode="output", snapshots=0, window=4)
    sums = {"S": torch.from_numpy(s)}
    _, want = running_fold(step, [], sums, out_dtype=torch.bfloat16)
    _, got, done = _fast(step, [], sums, torch.bfloat16)
    assert done and _same(got, want)


def test_a_nan_average_hands_the_chunk_back_to_torch() -> None:
    g = torch.Generator().manual_seed(1)
    snaps = [_values(g, 1000, torch.bfloat16) for _ in range(3)]
    snaps[2][17] = float("inf")
    built = _built("sma", snaps[:2], None)
    built["S"][40] = float("nan")
    step = RunningStep(method="sma", mode="slide", snapshots=2, window=2)
    assert not _fast(step, [snaps[2], snaps[0]], built, torch.bfloat16)[2]
    # and where it can run, the chunk is kept; an unsupported dtype is refused
    assert not fast.fold_average(step, [snaps[2].half(), snaps[0].half()], built,
                                 {"S": torch.empty(1000, dtype=torch.float64)}, torch.empty(1000, dtype=torch.bfloat16))
