"""sce's top-k by variance keeps the lowest flat index of positions with equal variance.

Found by a random-seed run of test_methods (seed 1793804445): two positions whose bf16 task
vectors are a shift of each other ((0.65625, 0.390625, 0.3515625) and (-0.3125, 0.0078125,
-0.078125)) have the same variance, but a float32 mean-then-squares formula rounded them one
ulp apart, so the top-k kept the later position where methods.md's rule keeps the earlier one,
and the energies (so every output value) moved with it. Now the variance comes from float64
sums (exact for bf16), in the torch path and in the compiled kernel alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemerge.methods.sce import variance_into
from tests.conftest import write_checkpoint
from tests.reference_methods import REFERENCES
from tests.test_methods import _run

#: (base, three inputs) at the two tied positions (bf16-exact values)
TIED_A = (1.0546875, (1.7109375, 1.4453125, 1.40625))
TIED_B = (1.0, (0.6875, 1.0078125, 0.921875))


def _tied_inputs(gen: torch.Generator, extra: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """A bf16 tensor (base, 3 inputs): positions 0 and 1 tie in variance; `extra` random
    positions after them with larger variance; one position with all task vectors zero (not
    counted by count_nonzero). Returns k's select_topk denominator index: the tie is at rank
    extra (0-based), so keeping extra + 1 positions keeps exactly one of the pair."""
    n = 2 + extra + 1
    base = torch.empty(n, dtype=torch.float64)
    xs = [torch.empty(n, dtype=torch.float64) for _ in range(3)]
    for pos, (b, vals) in enumerate((TIED_A, TIED_B)):
        base[pos] = b
        for x, v in zip(xs, vals):
            x[pos] = v
    base[2:] = torch.randn(n - 2, generator=gen, dtype=torch.float64)
    for i, x in enumerate(xs):  # large spreads: variances far above the pair's 0.0183
        x[2:-1] = base[2:-1] + (i - 1) * (2.0 + torch.rand(n - 3, generator=gen, dtype=torch.float64))
        x[-1] = base[-1]  # zero variance
    return base.to(torch.bfloat16), [x.to(torch.bfloat16) for x in xs], n


def test_equal_variances_compare_equal() -> None:
    """The shifted triples get bit-identical variances (the old float32 formula did not)."""
    deltas = [torch.tensor([a - TIED_A[0], b - TIED_B[0]], dtype=torch.float32)
              for a, b in zip(TIED_A[1], TIED_B[1])]
    out = torch.empty(2)
    variance_into(deltas, out)
    assert out[0].item() == out[1].item() and out[0].item() > 0
    # and a permutation of the task vectors gives the same bits
    perm = torch.empty(2)
    variance_into(deltas[::-1], perm)
    assert torch.equal(out.view(torch.int32), perm.view(torch.int32))


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_tie_at_the_threshold_keeps_the_lowest_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     compiled: bool) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    extra = int(torch.randint(3, 40, (), generator=gen))
    base, xs, n = _tied_inputs(gen, extra)
    nonzero = n - 1
    # keep the extra positions and exactly one of the tied pair: k = extra + 1
    topk = (extra + 1.5) / nonzero
    assert int(topk * nonzero) == extra + 1
    paths = [write_checkpoint(tmp_path / f"m{i}", {"w": t.reshape(1, n)}) for i, t in enumerate([base, *xs])]
    doc = {"merge_method": "sce", "base_model": str(paths[0]), "parameters": {"select_topk": topk},
           "models": [{"model": str(p)} for p in paths[1:]]}
    if not compiled:
        monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    got = _run(doc, tmp_path / "out")["w"].reshape(-1)
    one_row = _run(doc, tmp_path / "one", chunk_rows=1, memory_budget="1MB")["w"].reshape(-1)
    assert torch.equal(got.view(torch.int16), one_row.view(torch.int16))
    # position 0 (the lower index of the tied pair) is kept, position 1 is left at the base
    assert got[0].item() != base[0].item(), f"seed {seed}: the tied position 0 was not kept"
    assert got[1].item() == base[1].item(), f"seed {seed}: the tied position 1 was kept"
    ref = REFERENCES["sce"](base.double(), [x.double() for x in xs], [{}, {}, {}], {"select_topk": topk})
    err = (got.double() - ref).abs()
    # one bf16 rounding of the float64 reference (plus the float32 apply's few ulps)
    assert bool((err <= ref.abs() * 2.0**-8 + 1e-6).all()), f"seed {seed}: {err.max().item()}"
