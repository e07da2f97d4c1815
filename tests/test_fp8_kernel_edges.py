"""The vectorized FP8 loops (`io/quant/_fp8_numba.py`: E4M3 values computed from the code's
bits, integer-max group amax, array-step encode) against torch on the cases random finite data
never reaches: every one of the 256 codes (NaN codes and subnormals included) times scales
(zero, negative, NaN), groups holding NaN, +-inf, -0.0 or nothing but zeros, and encoding of
NaN, +-inf, subnormal and overflowing quotients. Each case runs on ragged shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moemerge.io.quant import _fp8, _fp8_kernels

F8 = torch.float8_e4m3fn
FMAX = 448.0

pytestmark = pytest.mark.skipif(not _fp8_kernels.available(), reason="numba is not installed")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("shape", [(2, 128, 128), (3, 130, 32), (7, 37, 5), (1, 300, 128)])
def test_every_code_dequantizes_to_torchs_bits(shape: tuple[int, int, int]) -> None:
    reps, cols, bc = shape
    gen = torch.Generator().manual_seed(cols)
    all_codes = torch.arange(256, dtype=torch.uint8)
    flat = torch.cat([all_codes.repeat(-(-reps * cols // 256))[: reps * cols]])
    perm = torch.randperm(flat.numel(), generator=gen)
    codes = flat[perm].view(reps, cols)
    codes.view(-1)[:256 if reps * cols >= 256 else 0] = all_codes[: min(256, reps * cols)]  # each code once, in order
    tc = -(-cols // bc)
    rg = torch.arange(reps) // 2
    m = int(rg.max()) + 1
    scales = torch.rand(m, tc, generator=gen) * 1e-2 - 2e-3  # some negative
    scales.view(-1)[0] = 0.0
    if scales.numel() > 2:
        scales.view(-1)[1] = float("nan")
        scales.view(-1)[2] = 3.0e38  # products overflow to inf
    got = _fp8.dequantize(codes.view(F8), scales, rg, bc)
    per = scales[rg].repeat_interleave(bc, dim=1)[:, :cols]
    want = codes.view(F8).float() * per
    same_bits = _bits(got) == _bits(want)
    both_nan = torch.isnan(got) & torch.isnan(want)  # NaN x NaN: which payload x86 keeps is the operand order's
    assert bool((same_bits | both_nan).all())
    # one code x one scale of 1: the value is exactly torch's cast, bit for bit (NaN codes too)
    one = _fp8.dequantize(all_codes.view(1, 256).view(F8), torch.ones(1, 2), torch.zeros(1, dtype=torch.long), 128)
    assert torch.equal(_bits(one), _bits(all_codes.view(F8).float().view(1, 256)))


@pytest.mark.parametrize("shape", [(256, 256, 128, 128), (200, 300, 128, 128), (37, 129, 16, 32), (5, 3, 128, 128)])
def test_group_amax_of_special_values(shape: tuple[int, int, int, int]) -> None:
    n, c, br, bc = shape
    gen = torch.Generator().manual_seed(n + c)
    v = torch.randn(n, c, generator=gen) * 0.02
    if n > 2 * br:
        v[br:2 * br, :] = 0.0  # a whole tile row of zeros
        v[br, min(c, bc) - 1] = -0.0
    v[0, 0] = float("nan")
    v[n - 1, c - 1] = float("-inf")
    v[n // 2, : min(c, bc)] = -0.0
    v[n - 1, 0] = -7.5  # the largest magnitude is negative
    rg = torch.arange(n) // br
    m = -(-n // br)
    got = _fp8.group_amax(v, rg, m, bc)
    a = torch.nn.functional.pad(v.abs(), (0, -(-c // bc) * bc - c)).view(n, -1, bc).amax(-1)
    want = torch.stack([a[rg == g].amax(0) for g in range(m)])
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.equal(_bits(got[fin]), _bits(want[fin]))  # +0.0 for -0.0 groups, inf, exact maxima
    assert math.isnan(float(got[0, 0]))
    if got.numel() > 1:  # the -inf is in another group than the NaN
        assert float(got[-1, -1]) == math.inf


def test_encode_of_special_quotients() -> None:
    """NaN, +-inf, +-0, subnormal, tie and overflowing quotients in ragged column blocks,
    against torch's clamp-then-cast, through the public quantize with given scales."""
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0 ** -9, -3 * 2.0 ** -10,
                             2.0 ** -12, 464.0, -464.0, 1e30, 448.0, -448.0, 13.0, 0.1, -1e-30])
    gen = torch.Generator().manual_seed(5)
    n, c, bc = 9, 70, 16
    v = torch.randn(n, c, generator=gen) * 100
    idx = torch.randint(0, n * c, (200,), generator=gen)
    v.view(-1)[idx] = specials[torch.arange(200) % specials.numel()]
    scales = torch.tensor([0.5, 1.0, 2.0 ** -20, 3.3][: 4]).repeat(n, 2)[:, : -(-c // bc)].contiguous()
    rg = torch.arange(n)
    raw = np.empty((n, c), np.uint8)
    _fp8_kernels.quantize_codes(v.numpy(), scales.numpy()[None], np.zeros((1, n, scales.shape[1]), bool),
                                rg.numpy(), bc, FMAX, raw)
    per = scales[rg].repeat_interleave(bc, dim=1)[:, :c]
    want = (v / per).clamp(-FMAX, FMAX).to(F8).view(torch.uint8)
    assert torch.equal(torch.from_numpy(raw), want)
