"""The FP8 scale-group loops (`moemerge.io.quant._fp8`: compiled with numba, or torch without it)
give the bytes of the reference torch expressions below on random data: ragged tiles,
all-zero groups, format-max codes, per-channel and per-tensor groups, round-trip data."""

from __future__ import annotations

import os

import pytest
import torch

from moemerge.io.quant import _fp8, _fp8_kernels

F8 = torch.float8_e4m3fn
FMAX = 448.0


# -- the reference: the plain torch expressions the codecs were written with ------------------


def _expand(scales: torch.Tensor, row_group: torch.Tensor, cols: int, col_block: int) -> torch.Tensor:
    return scales.float()[row_group].repeat_interleave(col_block, dim=1)[:, :cols]


def ref_dequantize(codes: torch.Tensor, scales: torch.Tensor, row_group: torch.Tensor, col_block: int) -> torch.Tensor:
    return codes.float() * _expand(scales, row_group, codes.shape[1], col_block)


def ref_amax(values: torch.Tensor, row_group: torch.Tensor, m: int, col_block: int) -> torch.Tensor:
    n, cols = values.shape
    tc = -(-cols // col_block)
    a = torch.nn.functional.pad(values.abs(), (0, tc * col_block - cols)).view(n, tc, col_block).amax(-1)
    return torch.stack([a[row_group == g].amax(0) if bool((row_group == g).any()) else torch.zeros(tc)
                        for g in range(m)])


def ref_encode(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values / scale).clamp_(-FMAX, FMAX).to(F8)


def ref_quantize(values: torch.Tensor, row_group: torch.Tensor, m: int, col_block: int, *,
                 amax: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32,
                 search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    cols = values.shape[1]
    if amax is None:
        amax = ref_amax(values, row_group, m, col_block)
    c0 = torch.where(amax > 0, (amax.double() / FMAX).to(scale_dtype).float(), torch.ones_like(amax))
    if scale_dtype == torch.float32 and search:
        down = torch.nextafter(c0, torch.zeros_like(c0))
        up = torch.nextafter(c0, torch.full_like(c0, float("inf")))
        chosen, settled = c0.clone(), torch.zeros_like(amax, dtype=torch.bool)
        for cand in (c0, down, up):
            ok = ((cand.double() * FMAX).float() == amax) & (amax > 0)
            e = _expand(cand, row_group, cols, col_block)
            bad = (ref_encode(values, e).float() * e != values).float()
            take = ok & (ref_amax(bad, row_group, m, col_block) == 0) & ~settled
            chosen = torch.where(take, cand, chosen)
            settled |= take
        c0 = chosen
    scale = c0.to(scale_dtype)
    return ref_encode(values, _expand(scale, row_group, cols, col_block)), scale


# -- cases ---------------------------------------------------------------------------------------


@pytest.fixture(params=["compiled", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "compiled":
        if not _fp8_kernels.available():
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
        assert not _fp8_kernels.available()
    return str(request.param)


def _codes(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x7E  # no NaN patterns; ±448 instead
    return raw.view(F8)


#: (rows, cols, tile rows, tile cols): whole tiles, ragged both ways, per channel, per tensor
SHAPES = [(256, 256, 128, 128), (200, 300, 128, 128), (37, 129, 16, 32), (50, 70, 1, 70), (33, 45, 33, 45),
          (5, 3, 128, 128)]


def _groups(n: int, br: int) -> tuple[torch.Tensor, int]:
    return torch.arange(n) // br, -(-n // br)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantize_gives_the_reference_bytes(shape: tuple[int, int, int, int], backend: str) -> None:
    n, c, br, bc = shape
    gen = torch.Generator().manual_seed(n * 1000 + c)
    rg, m = _groups(n, br)
    codes = _codes((n, c), gen)
    scales = torch.rand(m, -(-c // bc), generator=gen) * 1e-2
    scales[0, 0] = 0.0
    want = ref_dequantize(codes, scales, rg, bc)
    assert _same(_fp8.dequantize(codes, scales, rg, bc), want)
    out = torch.full((n, c), float("nan"))
    assert _fp8.dequantize(codes, scales.bfloat16(), rg, bc, out=out) is out
    assert _same(out, ref_dequantize(codes, scales.bfloat16(), rg, bc))


@pytest.mark.parametrize("data", ["merged", "round-trip", "zeros", "max"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_gives_the_reference_bytes(shape: tuple[int, int, int, int], data: str, backend: str) -> None:
    n, c, br, bc = shape
    gen = torch.Generator().manual_seed(n * 7 + c)
    rg, m = _groups(n, br)
    tc = -(-c // bc)
    if data == "merged":  # off every FP8 grid, with some all-zero groups
        values = torch.randn(n, c, generator=gen) * 0.02
        values[: min(n, br)] = 0.0
    else:
        codes = _codes((n, c), gen)
        if data == "zeros":
            codes.view(torch.uint8)[::2] = 0
        if data == "max":
            codes.view(torch.uint8)[:] = 0x7E
            codes.view(torch.uint8)[1::2] |= 0x80
        scales = torch.rand(m, tc, generator=gen) * 1e-3
        values = ref_dequantize(codes, scales, rg, bc)
    assert _same(_fp8.group_amax(values, rg, m, bc), ref_amax(values, rg, m, bc))
    for scale_dtype in (torch.float32, torch.bfloat16):
        for search in (True, False):
            got = _fp8.quantize(values, rg, m, bc, F8, scale_dtype=scale_dtype, search=search)
            want = ref_quantize(values, rg, m, bc, scale_dtype=scale_dtype, search=search)
            assert _same(got[0], want[0]) and _same(got[1], want[1]), (scale_dtype, search)
    amax = torch.tensor([[float(values.abs().max())]])  # one scale for the whole tensor
    ones = torch.zeros(n, dtype=torch.long)
    assert all(_same(g, w) for g, w in zip(_fp8.quantize(values, ones, 1, c, F8, amax=amax),
                                             ref_quantize(values, ones, 1, c, amax=amax)))


def test_compiled_encode_equals_torch_cast_across_float32() -> None:
    """Every 61st float32 bit pattern in [-448, 448] (subnormal, normal, ties), plus the edges."""
    if not _fp8_kernels.available():
        pytest.skip("numba is not installed")
    import numpy as np

    top = int(torch.tensor([FMAX]).view(torch.int32))
    bits = torch.arange(0, top + 1, 61, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), -bits.view(torch.float32),
                   torch.tensor([0.0, -0.0, FMAX, -FMAX, 1e30, -1e30, 2.0 ** -9, 3 * 2.0 ** -10, 464.0])])
    x = x[: x.numel() // 64 * 64].view(-1, 64)
    out = np.empty(tuple(x.shape), np.uint8)
    _fp8_kernels.quantize_codes(x.numpy(), np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), bool),
                                np.zeros(x.shape[0], np.int64), 64, FMAX, out)
    want = x.clamp(-FMAX, FMAX).to(F8).view(torch.uint8).numpy()
    assert int((out != want).sum()) == 0


def test_switch_off_is_read_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    assert not _fp8_kernels.available()
    monkeypatch.delenv("MOEMERGE_NO_NUMBA")
    assert _fp8_kernels.available() == (_fp8_kernels._kernels() is not None)
    assert os.environ.get("MOEMERGE_NO_NUMBA") is None
