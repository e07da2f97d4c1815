"""FP8 scale math shared by every FP8 codec: scale groups of rows x column blocks.

A group is (a row group, a column block): block FP8 has tile rows x tile columns, per-channel
FP8 one row x all columns, per-tensor FP8 one group. `row_group[i]` is the group row of local
row i (0..m-1); columns are cut every `col_block` (the last block may be partial).
"""

from __future__ import annotations

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.io.quant import _fp8_kernels

__all__ = ["dequantize", "quantize", "group_amax", "pow2_scale", "not_pow2"]

#: UE8M0 (an 8-bit exponent, bias 127; 255 is NaN) holds 2^-127 .. 2^127.
UE8M0_MIN_EXP, UE8M0_MAX_EXP = -127, 127


def pow2_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """float32 power-of-two scales for `scale_fmt: ue8m0`: 2^ceil(log2(amax / fmax)), the
    quotient taken exactly (float64 of the float32 amax), clamped to UE8M0's 2^-127..2^127;
    1 for an all-zero group. Rounding up keeps every code within +-fmax; amax = fmax * 2^k
    gives 2^k exactly (DeepSeek's `fast_round_scale` multiplies by a rounded 1/fmax instead,
    which can take 2^(k+1) there)."""
    x = amax.double() / fmax
    mant, exp = torch.frexp(x)  # x = mant * 2^exp, mant in [0.5, 1)
    k = torch.where(mant == 0.5, exp - 1, exp).clamp_(UE8M0_MIN_EXP, UE8M0_MAX_EXP)
    scale = torch.ldexp(torch.ones_like(x), k).float()
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def not_pow2(scales: torch.Tensor) -> torch.Tensor:
    """Mask of the scales that are not a power of two in UE8M0's range (2^-127 .. 2^127)."""
    s = scales.float()
    mant, _ = torch.frexp(s)
    return ~((mant == 0.5) & (s >= 2.0 ** UE8M0_MIN_EXP) & (s <= 2.0 ** UE8M0_MAX_EXP))


def _expand(scales: torch.Tensor, row_group: torch.Tensor, cols: int, col_block: int) -> torch.Tensor:
    """Per-element scale [n, cols] (float32) from group scales [m, tc]."""
    per_row = scales.float()[row_group]  # [n, tc]
    return per_row.repeat_interleave(col_block, dim=1)[:, :cols]


def _compiled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops (`_fp8_kernels`) serve these: E4M3 codes, numba present."""
    return all(t.dtype in (torch.float8_e4m3fn, torch.float32) and t.device.type == "cpu" for t in tensors) \
        and _fp8_kernels.available()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, row_group: torch.Tensor, col_block: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [n, cols]: each code times its group's scale, one rounding (formats.md); into
    `out` (float32 [n, cols], contiguous) when given, with no temporary of that size."""
    n, cols = codes.shape
    if out is not None and (out.shape != (n, cols) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"dequantize: out must be contiguous float32 {[n, cols]}, got {out.dtype} {list(out.shape)}")
    if codes.dtype == torch.float8_e4m3fn and _compiled(codes):
        dst = out if out is not None else torch.empty(n, cols, dtype=torch.float32)
        _fp8_kernels.dequantize(codes.contiguous().view(torch.uint8).numpy(), scales.float().contiguous().numpy(),
                                row_group.to(torch.int64).contiguous().numpy(), col_block, dst.numpy())
        return dst
    values = _dequantize_torch(codes, scales, row_group, col_block)
    return values if out is None else out.copy_(values)


def _dequantize_torch(codes: torch.Tensor, scales: torch.Tensor, row_group: torch.Tensor,
                      col_block: int) -> torch.Tensor:
    n, cols = codes.shape
    values = codes.float()
    per_row = scales.float()[row_group]
    if cols % col_block == 0:  # the common case: no [n, cols] scale temporary
        return values.view(n, -1, col_block).mul_(per_row.unsqueeze(-1)).view(n, cols)
    return values.mul_(_expand(scales, row_group, cols, col_block))


def group_amax(values: torch.Tensor, row_group: torch.Tensor, m: int, col_block: int) -> torch.Tensor:
    """max |v| per group, float32 [m, ceil(cols / col_block)]."""
    n, cols = values.shape
    tc = -(-cols // col_block)
    if values.dtype == torch.float32 and _compiled(values):
        return torch.from_numpy(_fp8_kernels.group_amax(values.contiguous().numpy(),
                                                        row_group.to(torch.int64).contiguous().numpy(), m, col_block))
    a = values.abs()
    full = cols // col_block * col_block
    per_row = a[:, :full].reshape(n, full // col_block, col_block).amax(-1)
    if full != cols:  # the ragged last block on its own: no padded copy of the band
        per_row = torch.cat([per_row, a[:, full:].amax(-1, keepdim=True)], dim=1)
    if m == n:  # one row per group (per-channel scales)
        return per_row
    # groups are runs of consecutive rows (tile rows, one tensor): a few slices per chunk
    counts = torch.bincount(row_group, minlength=m).tolist()
    return torch.stack([p.amax(0) if len(p) else torch.zeros(tc) for p in torch.split(per_row, counts)])


def _encode(values: torch.Tensor, scale: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(fp8).max
    # clamp: v / (amax / fmax) can land a rounding above fmax, and torch casts overflow to NaN
    return (values / scale).clamp_(-fmax, fmax).to(fp8)


def _inexact(values: torch.Tensor, scale_e: torch.Tensor, fp8: torch.dtype, row_group: torch.Tensor,
             m: int, col_block: int) -> torch.Tensor:
    """Per group: 1 where some value is not reproduced exactly by (code, scale), else 0."""
    codes = _encode(values, scale_e, fp8)
    bad = (codes.float() * scale_e != values).float()
    return group_amax(bad, row_group, m, col_block)


def quantize(values: torch.Tensor, row_group: torch.Tensor, m: int, col_block: int, fp8: torch.dtype,
             *, amax: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None,
             search: bool = True, pow2: bool = False,
             codes_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [n, cols] fp8, scales [m, tc] scale_dtype) with fresh scales amax / fmax; the
    codes' bytes are written into `codes_out` (uint8 [n, cols], contiguous) when given, and
    the codes returned are a view of it.

    The scale is `amax / fmax` rounded once to the scale dtype (DeepSeek-V3's weight_quant,
    compressed-tensors, fbgemm), 1.0 for an all-zero group (transformers' Fp8Quantize keeps
    zeros stable so). Served values are code * scale rounded to float32, which loses up to 4
    bits of an F32 scale: amax / fmax then lands one float32 step off the stored scale about
    one time in ten. With `search`, where a neighbour one step away also maps back to amax,
    the first of (amax / fmax, one step down, one step up) that reproduces every value of the
    group exactly is taken: requantizing dequantized data gives its bytes back, and data no
    scale reproduces (any real merge) gets amax / fmax as the reference does.

    With `pow2` (`scale_fmt: ue8m0`) the scale is `pow2_scale(amax)` = 2^k instead; where
    amax / fmax is exactly 2^k and 2^(k+1) reproduces every value of the group, 2^(k+1) (a
    block whose largest code rounded down to fmax / 2): data written with power-of-two scales
    gets its scales, and so its bytes, back.
    """
    scale_dtype = torch.float32 if scale_dtype is None else scale_dtype  # None: float32 (no torch at import)
    n, cols = values.shape
    fmax = torch.finfo(fp8).max
    if amax is None:
        amax = group_amax(values, row_group, m, col_block)
    tc = amax.shape[1]
    if pow2:
        c0 = pow2_scale(amax, fmax)
    else:
        c0 = torch.where(amax > 0, (amax.double() / fmax).to(scale_dtype).float(), torch.ones_like(amax))
    cands, ok = [c0], [torch.zeros_like(amax, dtype=torch.bool)]
    if pow2:
        # amax = fmax * 2^k exactly: the group's largest code may be fmax / 2 = 224 rounded down
        # at scale 2^(k+1) (where a ue8m0 quantizer puts it); that scale is taken when it
        # reproduces every value, so requantizing such a checkpoint gives its bytes back
        up = c0 * 2
        fits = (c0.double() * fmax == amax.double()) & (amax > 0) & (c0 < 2.0 ** UE8M0_MAX_EXP)
        if bool(fits.any()):
            cands, ok = [c0, up], [ok[0], fits]
    if scale_dtype == torch.float32 and search and not pow2:
        down = torch.nextafter(c0, torch.zeros_like(c0))
        up = torch.nextafter(c0, torch.full_like(c0, float("inf")))

        def maps_back(c: torch.Tensor) -> torch.Tensor:
            return ((c.double() * fmax).float() == amax) & (amax > 0)

        v0, vd, vu = maps_back(c0), maps_back(down), maps_back(up)
        if bool((vd | vu).any()):  # else c0 is taken, exact or not: no search
            cands, ok = [c0, down, up], [v0, vd, vu]
    if fp8 == torch.float8_e4m3fn and _compiled(values):
        # one pass: the search stops at a group's first value off a candidate's grid (at once
        # for a real merge), then the chosen scales encode the band
        raw = codes_out if codes_out is not None else torch.empty(n, cols, dtype=torch.uint8)
        chosen = _fp8_kernels.quantize_codes(
            values.contiguous().numpy(), torch.stack(cands).contiguous().numpy(), torch.stack(ok).numpy(),
            row_group.to(torch.int64).contiguous().numpy(), col_block, fmax, raw.numpy())
        scale = torch.from_numpy(chosen).to(scale_dtype)
        assert scale.shape == (m, tc)
        return raw.view(fp8), scale
    if len(cands) > 1:
        chosen_t = c0.clone()
        settled = torch.zeros_like(ok[0])
        for cand, good in zip(cands, ok):
            if not bool((good & ~settled).any()):
                continue
            exact = _inexact(values, _expand(cand, row_group, cols, col_block), fp8, row_group, m,
                             col_block) == 0
            take = good & exact & ~settled
            chosen_t = torch.where(take, cand, chosen_t)
            settled |= take
        c0 = chosen_t
    scale = c0.to(scale_dtype)
    codes = _encode(values, _expand(scale, row_group, cols, col_block), fp8)
    assert scale.shape == (m, tc)
    if codes_out is not None:
        codes = codes_out.copy_(codes.view(torch.uint8)).view(fp8)
    return codes, scale
