"""The safetensors byte layout: golden header bytes, round trips with the reference library,
and exact row-range reads from single-file and sharded checkpoints."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import from_torch
from moemerge.io.safetensors_format import build_header, parse_header, parse_header_length

# -- helpers -------------------------------------------------------------------------------

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64,
           torch.float8_e4m3fn, torch.float8_e5m2)


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random values of `dtype` (never all zeros)."""
    if dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.5
        if t.numel():
            t.view(-1)[0] = True
        return t
    if dtype in _FLOATS:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(1, 256, shape, generator=g, dtype=torch.int64).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def _raw(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor, as safetensors stores them."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _read(ck: Checkpoint, name: str, r0: int, r1: int) -> bytes:
    t = ck.tensors[name]
    buf = bytearray((r1 - r0) * t.row_bytes + 13)  # a larger buffer must be fine too
    ck.read_rows(name, r0, r1, memoryview(buf))
    return bytes(buf[: (r1 - r0) * t.row_bytes])


# -- build_header: golden bytes ------------------------------------------------------------


def test_build_header_golden_bytes_with_metadata() -> None:
    header, offsets = build_header([("a", "F32", (2,)), ("b", "BF16", (1, 3))], {"format": "pt"})
    body = (
        b'{"__metadata__":{"format":"pt"},'
        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}}'
        b"  "  # 8 + 144 = 152, a multiple of 8
    )
    assert header == b"\x90\x00\x00\x00\x00\x00\x00\x00" + body
    assert offsets == {"a": 152, "b": 160}


def test_build_header_golden_bytes_without_metadata() -> None:
    header, offsets = build_header([("x", "F32", (2, 3))])
    assert header == (
        b"\x40\x00\x00\x00\x00\x00\x00\x00"
        b'{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}' + b" " * 7
    )
    assert offsets == {"x": 72}


@pytest.mark.parametrize("n", range(1, 12))
def test_build_header_pads_data_start_to_a_multiple_of_8(n: int) -> None:
    tensors = [(f"t{'x' * i}", "BF16", (i + 1, 3)) for i in range(n)]
    header, offsets = build_header(tensors, {"k" * n: "v"})
    (length,) = struct.unpack("<Q", header[:8])
    assert length == len(header) - 8
    assert len(header) % 8 == 0
    assert header.rstrip(b" ").endswith(b"}")
    # offsets are absolute and back to back
    pos = len(header)
    for name, _, shape in tensors:
        assert offsets[name] == pos
        pos += math.prod(shape) * 2


def test_build_header_round_trips_through_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "embed.weight": _random((7, 5), torch.bfloat16, g),
        "layers.0.w": _random((3, 4, 2), torch.float32, g),
        "layers.0.b": _random((5,), torch.float16, g),
        "ids": _random((6,), torch.int64, g),
        "mask": _random((2, 3), torch.bool, g),
        "q": _random((4, 4), torch.float8_e4m3fn, g),
        "scalar": _random((), torch.float64, g),
    }
    header, offsets = build_header([(k, from_torch(v.dtype), tuple(v.shape)) for k, v in tensors.items()],
                                   {"format": "pt"})
    blob = bytearray(header)
    for k, v in tensors.items():
        assert offsets[k] == len(blob)
        blob += _raw(v)
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(blob))
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert _raw(loaded[k]) == _raw(v), k
    # and our own parser reads back what we built
    n = parse_header_length(bytes(blob[:8]), file_size=len(blob), where="x")
    parsed = parse_header(bytes(blob[8:8 + n]), file_size=len(blob), where="x")
    assert parsed.metadata == {"format": "pt"}
    assert {k: e.start for k, e in parsed.tensors.items()} == offsets


# -- parse_header accepts what safetensors writes -----------------------------------------

ALL_DTYPES = (
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)


def test_parse_header_accepts_save_file_output(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(ALL_DTYPES):
        tensors[f"t{i}.{str(dt).split('.')[-1]}"] = _random((3 + i, 5), dt, g)
        tensors[f"v{i}"] = _random((11,), dt, g)
    tensors["scalar"] = _random((), torch.float32, g)
    tensors["empty"] = torch.empty((0, 4), dtype=torch.bfloat16)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    blob = path.read_bytes()
    n = parse_header_length(blob[:8], file_size=len(blob), where=str(path))
    hdr = parse_header(blob[8:8 + n], file_size=len(blob), where=str(path))
    assert hdr.data_start == 8 + n
    assert hdr.metadata == {"format": "pt", "note": "x"}
    assert set(hdr.tensors) == set(tensors)
    for name, t in tensors.items():
        e = hdr.tensors[name]
        assert e.dtype == from_torch(t.dtype), name
        assert e.shape == tuple(t.shape), name
        assert e.nbytes == t.numel() * t.element_size()
        assert blob[e.start:e.start + e.nbytes] == _raw(t), name


def test_parse_header_rejects_a_file_cut_by_one_byte(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(path))
    blob = path.read_bytes()[:-1]
    n = parse_header_length(blob[:8], file_size=len(blob), where="cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*`w`"):
        parse_header(blob[8:8 + n], file_size=len(blob), where="cut.safetensors")


# -- Checkpoint.read_rows: exact bytes -----------------------------------------------------


def _reference_rows(t: torch.Tensor, r0: int, r1: int) -> bytes:
    rows = t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(-1, 1)
    return _raw(rows[r0:r1])


@pytest.mark.parametrize("shards", [1, 3])
def test_read_rows_returns_exact_bytes(tmp_path: Path, ckpt_factory, shards: int) -> None:
    g = torch.Generator().manual_seed(3 + shards)
    tensors = {
        "model.embed_tokens.weight": _random((37, 12), torch.bfloat16, g),
        "model.layers.0.experts.gate_up_proj": _random((3, 9, 10), torch.bfloat16, g),
        "model.layers.0.input_layernorm.weight": _random((41,), torch.float32, g),
        "model.layers.0.mlp.down_proj.weight": _random((17, 8), torch.float16, g),
        "model.layers.1.mlp.down_proj.weight": _random((17, 8), torch.float64, g),
        "model.layers.1.q.weight": _random((13, 16), torch.float8_e4m3fn, g),
        "model.layers.1.k.weight": _random((2, 5, 7), torch.float8_e5m2, g),
        "position_ids": _random((29,), torch.int64, g),
        "flags": _random((6, 3), torch.bool, g),
        "table": _random((4, 2, 3), torch.uint8, g),
        "counts": _random((9, 2), torch.int32, g),
    }
    path = ckpt_factory("ck", tensors, shards=shards)
    if shards > 1:
        assert len(list(path.glob("*.safetensors"))) == shards
    loaded: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        loaded.update(load_file(str(f)))
    ck = Checkpoint.open(str(path))
    try:
        assert set(ck.tensors) == set(tensors)
        pick = torch.Generator().manual_seed(99)
        for name, ref in loaded.items():
            info = ck.tensors[name]
            assert info.shape == tuple(ref.shape) and info.dtype == from_torch(ref.dtype)
            rows = info.rows
            assert rows == (math.prod(ref.shape[:-1]) if ref.dim() >= 2 else ref.shape[0])
            ranges = [(0, rows), (0, 1), (rows - 1, rows)]
            for _ in range(6):
                a, b = sorted(torch.randint(0, rows + 1, (2,), generator=pick).tolist())
                ranges.append((a, b))
            for r0, r1 in ranges:
                assert _read(ck, name, r0, r1) == _reference_rows(ref, r0, r1), (name, r0, r1)
    finally:
        ck.close()


def test_read_rows_of_a_bare_safetensors_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    t = _random((10, 6), torch.bfloat16, g)
    u = _random((3, 4, 5), torch.float32, g)
    path = tmp_path / "weights.safetensors"
    save_file({"t": t, "u": u}, str(path))
    ck = Checkpoint.open(str(path))
    try:
        assert _read(ck, "t", 3, 8) == _reference_rows(t, 3, 8)
        assert _read(ck, "u", 5, 12) == _reference_rows(u, 5, 12)
    finally:
        ck.close()


def test_read_rows_refuses_a_small_buffer(ckpt_factory) -> None:
    path = ckpt_factory("ck", {"w": torch.randn(4, 4)})
    ck = Checkpoint.open(str(path))
    try:
        with pytest.raises(ValueError, match="too small"):
            ck.read_rows("w", 0, 2, memoryview(bytearray(31)))
    finally:
        ck.close()


def test_index_json_matches_the_shards(ckpt_factory) -> None:
    """The checkpoints the fixture writes are what the reader expects (sanity of the helper)."""
    path = ckpt_factory("ck", {f"w{i}": torch.randn(3, 2) for i in range(5)}, shards=2)
    wmap = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    ck = Checkpoint.open(str(path))
    try:
        assert {k: v.file for k, v in ck.tensors.items()} == wmap
    finally:
        ck.close()
