"""Weighted sums of block-FP8 inputs read as stored and summed from their codes
(engine/fused_fp8.py, io/quant/stored.py): the same bytes as dequantizing on read and then
summing, for any chunking, bf16 and FP8 output, NaN codes (the fallback), stacked experts with
ragged tiles; and the pieces on their own against plain references."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moemerge
from moemerge.engine import fused_fp8, pipeline
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.quant import dequantizing, get_codec
from moemerge.io.quant.base import QuantScheme
from moemerge.io.quant.stored import dequantize_in_place, fits, stored_layout, stored_nbytes, stored_parts
from tests.conftest import write_checkpoint
from tests.quant_fixtures import fp8_block_quantize

pytest.importorskip("numba")

F8 = torch.float8_e4m3fn


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def _model(path: Path, gen: torch.Generator, *, nan: bool = False) -> Path:
    """Block FP8 with ragged tiles, a stack of experts whose R is not a tile multiple (chunks of
    whole matrices), a one-row tensor (its stored rows do not fit the served bytes), bf16 rest."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = {"model.layers.0.self_attn.q_proj.weight": (384, 256),
              "model.layers.0.mlp.experts.0.up_proj.weight": (200, 300),
              "model.layers.0.mlp.experts.0.down_proj.weight": (300, 200),
              "model.layers.0.mlp.experts.gate_up_proj": (3, 136, 130),
              "model.layers.0.self_attn.o_proj.weight": (1, 3)}
    for name, shape in shapes.items():
        w = torch.randn(*shape, generator=gen) * 0.05
        if len(shape) == 3:
            qs = [fp8_block_quantize(m, (128, 128)) for m in w]
            q, s = torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs])
        else:
            q, s = fp8_block_quantize(w, (128, 128))
        if nan and name.endswith("up_proj.weight"):  # a NaN code in the second scale-block row
            q.view(torch.uint8)[150, 11] = 0x7F
        tensors[name], tensors[name + "_scale_inv"] = q, s
    tensors["model.norm.weight"] = (torch.randn(256, generator=gen) * 0.1).to(torch.bfloat16)
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 1, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}
    return write_checkpoint(path, tensors, config=cfg, shards=2)


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _cfg(paths: list[Path], gen: torch.Generator) -> dict:
    w = torch.rand(len(paths), generator=gen).add(0.1).tolist()
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": x}} for p, x in zip(paths, w)]}


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = fused_fp8.FusedChunk.sum_into

    def counting(self: fused_fp8.FusedChunk, a: int, b: int, out: torch.Tensor) -> bool:
        ok = real(self, a, b, out)
        calls.append(int(ok))
        return ok

    monkeypatch.setattr(fused_fp8.FusedChunk, "sum_into", counting)
    return calls


@pytest.mark.parametrize("quantize", ["none", "like-input"])
def test_fused_sums_give_the_bytes_of_dequantize_then_sum(tmp_path: Path, gen: torch.Generator,
                                                          monkeypatch: pytest.MonkeyPatch, quantize: str) -> None:
    paths = [_model(tmp_path / f"in{i}", gen) for i in range(3)]
    cfg = _cfg(paths, gen)
    calls = _counted(monkeypatch)
    small = moemerge.run(cfg, str(tmp_path / "small"), memory_budget="1MB", quantize=quantize)
    big = moemerge.run(cfg, str(tmp_path / "big"), memory_budget="1GB", quantize=quantize)
    assert max(len(t.chunks) for t in small.plan.tensors) > 1
    assert calls and all(calls)  # the fused path ran, and found no NaN
    monkeypatch.setattr(pipeline, "fused_for", lambda *a, **k: None)  # dequantize on read, then sum
    ref = moemerge.run(cfg, str(tmp_path / "ref"), memory_budget="1MB", quantize=quantize)
    assert _digest(tmp_path / "small") == _digest(tmp_path / "big") == _digest(tmp_path / "ref")
    assert small.checksums == big.checksums == ref.checksums


@pytest.mark.parametrize("quantize", ["none", "like-input"])
def test_a_nan_sum_takes_the_dequantized_path_with_its_bytes(tmp_path: Path, gen: torch.Generator,
                                                            monkeypatch: pytest.MonkeyPatch, quantize: str) -> None:
    """Also with a quantized output whose chunks are summed and requantized in several bands
    (a band of one scale-block row): a NaN in a later band drops the bands already quantized."""
    paths = [_model(tmp_path / "a", gen, nan=True), _model(tmp_path / "b", gen)]
    cfg = _cfg(paths, gen)
    calls = _counted(monkeypatch)
    bands: list[tuple[bool, int, int, int]] = []
    real = fused_fp8.FusedChunk.sum_into

    def recording(self: fused_fp8.FusedChunk, a: int, b: int, out: torch.Tensor) -> bool:
        ok = real(self, a, b, out)
        bands.append((ok, a - self.r0, b - a, self.r1 - self.r0))
        return ok

    monkeypatch.setattr(fused_fp8.FusedChunk, "sum_into", recording)
    monkeypatch.setattr(pipeline, "FUSED_BAND", 1)  # one scale-block row a band
    got = moemerge.run(cfg, str(tmp_path / "got"), memory_budget="1GB", quantize=quantize)
    assert 0 in calls and 1 in calls  # the NaN chunks fell back, the others did not
    if quantize == "like-input":
        assert any(rows < chunk_rows for _, _, rows, chunk_rows in bands)  # chunks summed in several bands
        assert any(not ok and at > 0 for ok, at, _, _ in bands)  # a NaN after a band was quantized
    monkeypatch.setattr(pipeline, "fused_for", lambda *a, **k: None)
    ref = moemerge.run(cfg, str(tmp_path / "ref"), memory_budget="1MB", quantize=quantize)
    assert _digest(tmp_path / "got") == _digest(tmp_path / "ref")
    assert got.checksums == ref.checksums


@pytest.mark.parametrize("quantize", ["none", "like-input"])
@pytest.mark.parametrize("nan", [False, True])
def test_chunks_split_between_two_threads_give_the_same_bytes(tmp_path: Path, gen: torch.Generator,
                                                              monkeypatch: pytest.MonkeyPatch, quantize: str,
                                                              nan: bool) -> None:
    """A fused chunk of at least two bands is split at a scale-block row, its first half summed
    (and requantized) on a helper thread: the bytes and the manifest's checksums (each tensor
    hashed in row order across the halves) are those of one thread, a NaN in either half included."""
    paths = [_model(tmp_path / "a", gen, nan=nan), _model(tmp_path / "b", gen), _model(tmp_path / "c", gen)]
    cfg = _cfg(paths, gen)
    monkeypatch.setattr(pipeline, "FUSED_BAND", 64)  # a band of one scale-block row: 256-row chunks split
    splits: list[tuple[int, int, int, int]] = []
    real = pipeline._Pipeline._split_row

    def recording(self: pipeline._Pipeline, t: object, r0: int, r1: int, align: int, scratch: int | None) -> int | None:
        self.cores = 2
        m = real(self, t, r0, r1, align, scratch)  # type: ignore[arg-type]
        if m is not None:
            splits.append((r0, m, r1, align))
        return m

    monkeypatch.setattr(pipeline._Pipeline, "_split_row", recording)
    got = moemerge.run(cfg, str(tmp_path / "got"), memory_budget="1GB", quantize=quantize)
    # at a scale-block row (128), or between whole matrices of a stack of experts (136 rows each)
    assert splits and all(r0 < m < r1 and align in (128, 136) and (m - r0) % align == 0
                          for r0, m, r1, align in splits)
    monkeypatch.setattr(pipeline._Pipeline, "_split_row", lambda *a: None)
    one = moemerge.run(cfg, str(tmp_path / "one"), memory_budget="1GB", quantize=quantize)
    monkeypatch.setattr(pipeline, "fused_for", lambda *a, **k: None)
    ref = moemerge.run(cfg, str(tmp_path / "ref"), memory_budget="1MB", quantize=quantize)
    assert _digest(tmp_path / "got") == _digest(tmp_path / "one") == _digest(tmp_path / "ref")
    assert got.checksums == one.checksums == ref.checksums


def test_mixed_and_ue8m0_inputs_are_not_fused(tmp_path: Path, gen: torch.Generator) -> None:
    from moemerge.methods import get_method
    from tests.quant_fixtures import block_fp8_model

    a, b = _model(tmp_path / "a", gen), _model(tmp_path / "b", gen)
    ue, _ = block_fp8_model(tmp_path / "ue", gen, ue8m0=True)
    plan = moemerge.plan(_cfg([a, b], gen), memory_budget="1GB")
    t = next(t for t in plan.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert t.sources_used == (0, 1)
    fa, fb, fue = (dequantizing(Checkpoint.open(str(p))) for p in (a, b, ue))
    plain = Checkpoint.open(str(b))  # FP8 codes, not dequantized: never summed from codes
    try:
        linear = get_method("linear")
        assert fused_fp8.fused_for(linear, t, [fa, fb], None) is not None
        assert fused_fp8.fused_for(get_method("ties"), t, [fa, fb], None) is None
        assert fused_fp8.fused_for(linear, t, [fa, plain], None) is None
        assert fused_fp8.fused_for(linear, t, [fue, fue], None) is None  # scales checked as dequantized
    finally:
        for c in (fa, fb, fue, plain):
            c.close()


def test_stored_rows_dequantized_in_place_equal_the_served_rows(tmp_path: Path, gen: torch.Generator) -> None:
    ck = dequantizing(Checkpoint.open(str(_model(tmp_path / "m", gen))))
    try:
        for name, spec in ck.specs.items():
            rows = spec.rows
            cuts = sorted({0, rows, *(int(x) for x in torch.randint(0, rows + 1, (4,), generator=gen))})
            align = spec.row_align
            for r0, r1 in zip(cuts, cuts[1:]):
                r0 = r0 // align * align
                if r1 <= r0:
                    continue
                served = bytearray((r1 - r0) * spec.row_len * 4)
                ck.read_rows(name, r0, r1, memoryview(served))
                want = torch.frombuffer(served, dtype=torch.float32)
                if not fits(spec, r0, r1):
                    assert stored_nbytes(spec, r0, r1) > len(served)
                    continue
                buf = torch.full((len(served) + 64,), 0xAB, dtype=torch.uint8)
                ck.read_stored(name, r0, r1, memoryview(buf.numpy()))
                parts = stored_parts(spec, buf, r0, r1)
                codec = get_codec(spec.codec)
                direct = codec.dequantize_rows(spec, parts, r0, r1)
                got = dequantize_in_place(spec, buf, r0, r1)
                assert torch.equal(got.reshape(-1).view(torch.int32), want.view(torch.int32)), (name, r0, r1)
                assert torch.equal(direct.reshape(-1).view(torch.int32), want.view(torch.int32))
                assert [off % 64 for _, off, _, _ in stored_layout(spec, r0, r1)] == [0, 0]
    finally:
        ck.close()


def test_the_fused_kernel_equals_dequantize_then_weighted_sum(gen: torch.Generator) -> None:
    from moemerge.engine._fused_fp8_numba import fp8_wsum_k
    from moemerge.io.quant import _fp8
    from moemerge.methods._linear_numba import wsum_k

    for rows, cols, cb in ((256, 300, 128), (130, 64, 32), (7, 129, 128)):
        n = 3
        groups = torch.arange(rows) // 128
        m, tc = int(groups[-1]) + 1, -(-cols // cb)
        seg = rows * cols * 4
        flat = torch.randint(0, 256, (n * seg,), dtype=torch.uint8, generator=gen)
        codes = [flat[k * seg:k * seg + rows * cols].view(rows, cols) for k in range(n)]
        for c in codes:  # no NaN codes here (NaN results are the caller's fallback)
            c[(c & 0x7F) == 0x7F] = 0x7E
        # scales of every size, subnormal codes included (codes 0..7)
        scales = torch.exp2(torch.randint(-20, 20, (n, m, tc), generator=gen).float()) * torch.rand(n, m, tc, generator=gen)
        w = (torch.rand(n, generator=gen) - 0.3).numpy().astype(np.float32)
        vals = torch.stack([_fp8.dequantize(c.view(F8), s, groups, cb) for c, s in zip(codes, scales)])
        for out_dtype in (torch.float32, torch.bfloat16):
            want = torch.empty(rows * cols, dtype=out_dtype)
            dst = want.view(torch.int16).numpy().view(np.uint16) if out_dtype == torch.bfloat16 else want.numpy()
            assert wsum_k(vals.reshape(-1).numpy(), rows * cols, n, w, 0, rows * cols, dst) == 0
            got = torch.empty(rows, cols, dtype=out_dtype)
            gdst = got.view(torch.int16).numpy().view(np.uint16) if out_dtype == torch.bfloat16 else got.numpy()
            offs = np.arange(n, dtype=np.int64) * seg
            assert fp8_wsum_k(flat.numpy(), offs, cols, scales.numpy(), groups.numpy(), cb, w, 0, gdst) == 0
            bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
            assert torch.equal(got.reshape(-1).view(bits), want.view(bits)), (rows, cols)
            row0 = rows // 3  # a band of the rows: rows row0.. of the whole
            band = torch.empty(rows - row0, cols, dtype=out_dtype)
            bdst = band.view(torch.int16).numpy().view(np.uint16) if out_dtype == torch.bfloat16 else band.numpy()
            assert fp8_wsum_k(flat.numpy(), offs, cols, scales.numpy(), groups.numpy(), cb, w, row0, bdst) == 0
            assert torch.equal(band.reshape(-1).view(bits), want.view(bits)[row0 * cols:])


def test_quantize_into_place_equals_quantize_rows(gen: torch.Generator) -> None:
    codec = get_codec("fp8-block")
    spec = codec.layout("w", (300, 200), QuantScheme(method="fp8", block=(128, 128)))
    values = torch.randn(300, 200, generator=gen) * 0.05
    want = codec.quantize_rows(spec, values, 0, 300)
    codes = torch.empty(300 * 200, dtype=torch.uint8)
    scale = torch.empty(3 * 2 * 4, dtype=torch.uint8)
    codec.quantize_rows_into(spec, values, 0, 300, {"weight": codes, "scale": scale})
    assert torch.equal(codes, want["weight"].reshape(-1).view(torch.uint8))
    assert torch.equal(scale, want["scale"].reshape(-1).view(torch.uint8))
