"""The state codec's compiled loops (pma._codec_numba) against its numpy loops: the same bytes
for every kind of block, the same values back, and damage still named by the numpy decoder."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moemerge.errors import CheckpointError
from moemerge.pma import state_codec as codec
from moemerge.pma.state import METHOD_ARRAYS

pytestmark = pytest.mark.skipif(codec._compiled() is None, reason="numba not available")


def _numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_KERNELS", [None])


def _cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = codec.BLOCK * 3 + 777
    base = rng.standard_normal(n) * 0.02
    bf16 = (base * (1 + 0.01 * rng.standard_normal((10, n)))).astype(np.float32)
    bf16 = (bf16.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    mixed = bf16.sum(0)
    mixed[codec.BLOCK:2 * codec.BLOCK] = rng.standard_normal(codec.BLOCK)  # one block all exceptions
    mixed[2 * codec.BLOCK:3 * codec.BLOCK] = 0.0                           # one block of zeros
    specials = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1e39, -1e300, 1e-40, 5e-324, 2.0 ** -149,
                         np.float32(3.0) + 2.0 ** -40, np.finfo(np.float32).max])
    odd = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    odd[rng.choice(n, specials.size, replace=False)] = specials
    odd[7] = np.frombuffer(np.uint64(0x7FF8DEAD00000001).tobytes(), dtype=np.float64)[0]  # a NaN payload
    return {"sum of bf16 (24-bit)": bf16.sum(0), "wma of bf16": (bf16 * np.arange(1, 11)[:, None]).sum(0),
            "fp32 values": rng.standard_normal(n).astype(np.float32).astype(np.float64),
            "mixed blocks": mixed, "specials": odd, "zeros": np.zeros(n), "ema values": rng.standard_normal(n)}


def test_compiled_codec_writes_and_reads_the_numpy_codecs_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(random.SystemRandom().randrange(2**31))
    cases = _cases(rng)
    fast = {(what, fb): codec.encode(x, fb) for what, x in cases.items() for fb in ("lz4", "raw")}
    with monkeypatch.context() as m:
        _numpy_only(m)
        slow = {(what, fb): codec.encode(x, fb) for what, x in cases.items() for fb in ("lz4", "raw")}
    for key, data in fast.items():
        assert data == slow[key], key
        x = cases[key[0]]
        out = np.full(x.size, 7.0)
        assert codec.decode(data, out) is out
        assert out.view(np.uint64).tobytes() == x.view(np.uint64).tobytes(), key
    # encode_into: the same bytes into a caller's buffer; too small a buffer is declined
    x = cases["specials"]
    buf = np.empty(codec.encoded_bound(x.size), dtype=np.uint8)
    used = codec.encode_into(x, buf, "raw")
    assert used is not None and bytes(buf[:used]) == slow[("specials", "raw")]
    assert codec.encode_into(x, buf[:100], "raw") is None


def test_damaged_chunks_fail_with_the_numpy_decoders_message() -> None:
    rng = np.random.default_rng(5)
    good = codec.encode(_cases(rng)["specials"])
    idx = bytearray(good)
    # the first block's first exception index (after its 3- or 4-byte planes) pointed past the block
    m = codec.BLOCK
    k = int.from_bytes(good[12 + 8:12 + 12], "little")
    assert k > 0 and good[12] in (codec.F32, codec.F24)
    at = 12 + 20 + (4 if good[12] == codec.F32 else 3) * m
    idx[at:at + 4] = (m + 5).to_bytes(4, "little")
    for bad, why in ((good[:-5], "block lengths"), (good + b"\0", "trailing bytes"), (b"XXXX" + good[4:], "header"),
                     (bytes(idx), "exception index"), (good[:16 + 10], "truncated")):
        with pytest.raises(CheckpointError, match=f"cannot be decoded .*{why}"):
            codec.decode(bad)
    with pytest.raises(CheckpointError, match="values, expected"):
        codec.decode(good, np.empty(5))


@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_updates_with_the_compiled_loops_equal_the_torch_and_numpy_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Nightly updates of one run into two states, one through the compiled sums and codec
    (forced on: the test tensors are small), one through torch and numpy: the same outputs bit
    for bit, the same state chunk files byte for byte; the compiled pass really ran."""
    from test_pma_update import Run, _load

    from moemerge.methods import _running_fast
    from moemerge.pma import update as upd

    ran: list[bool] = []
    real = _running_fast.fold_average

    def spy(*a: Any, **k: Any) -> bool:
        ran.append(real(*a, **k))
        return ran[-1]

    monkeypatch.setattr("moemerge.engine.running.fold_average", spy)
    run_ = Run(tmp_path)
    kw: dict[str, Any] = dict(method=method, last=3, alpha=0.3 if method == "ema" else None, memory_budget="1MB",
                              chunk_rows=random.choice([2, 5, None]))
    for night, step in enumerate(range(1000, 7000, 1000)):
        run_.night(step)
        for name, start in (("compiled", 0), ("reference", 1 << 62)):
            monkeypatch.setattr(upd, "COMPILED_FROM", start)
            upd.update(str(tmp_path / f"state-{name}"), run_.pattern, str(tmp_path / f"out-{name}"), **kw)
        a, b = _load(tmp_path / "out-compiled"), _load(tmp_path / "out-reference")
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8)), (night, n)
        chunks = [{p.relative_to(d).as_posix().split("/", 1)[1]: p.read_bytes() for p in d.rglob("*")
                   if p.is_file() and "/c/" in p.as_posix()} for d in (tmp_path / "state-compiled", tmp_path / "state-reference")]
        assert len(chunks[0]) >= 3 * len(METHOD_ARRAYS[method])  # every float tensor's chunks
        assert chunks[0] and chunks[0] == chunks[1], night
    assert any(ran) and len(set(ran)) == 2  # bf16/fp32 tensors compiled, the fp16 one by torch
