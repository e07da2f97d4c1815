"""engine/finite.py's NaN/Inf test: the compiled loop and numpy's bit test agree with
torch.isfinite on every float type, wherever the bad element lies (first, last, past a block
edge, in a subnormal-rich tensor), and finite tensors pass."""

from __future__ import annotations

import numba  # noqa: F401  (loaded: the compiled loop is used only where numba is)
import pytest
import torch

from moemerge.engine import finite

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _random(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x[::7] *= 1e-30  # subnormals and tiny values (exponent bits 0): finite
    x[::11] *= 1e4 if dtype == torch.float16 else 1e30  # large, still finite after the cast
    return x.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else x.to(dtype)


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finds_every_nan_and_inf_where_torch_does(dtype: torch.dtype, compiled: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    n = (1 << 17) + int(torch.randint(1, 999, (1,), generator=gen))  # past two blocks of 2^16, ragged
    x = _random(dtype, n, gen)
    assert bool(torch.isfinite(x).all()) and not finite._bad(x)
    for where in (0, n - 1, 1 << 16, (1 << 16) - 1, int(torch.randint(0, n, (1,), generator=gen))):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[where] = bad
            assert finite._bad(y), f"{dtype} {bad} at {where} of {n} not found"
            assert finite._bad(y.reshape(-1, 1)), "a 2-D view reads the same elements"
    if compiled:
        assert finite._compiled_bad(x.reshape(-1)) is False, "the compiled loop must have run here"


def test_a_non_contiguous_or_fp8_tensor_takes_the_numpy_path() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    x[5, 3] = float("nan")
    assert finite._compiled_bad(x.t().reshape(-1)) is not None  # reshape of a transpose copies
    assert finite._bad(x.t())
    f8 = torch.randn(256, generator=gen).to(torch.float8_e4m3fn)
    assert finite._compiled_bad(f8) is None and not finite._bad(f8)
    f8[100] = float("nan")
    assert finite._bad(f8)
