"""The one-pass weighted sum (methods/_fused.py `weighted_into`: linear, sma, wma, ema) against
the torch path it replaces: the same output bits on fresh random bf16/f16/f32 inputs with odd
sizes and negative weights, NaN/Inf left to torch, and the device twin still on torch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import moemerge
from moemerge.engine import compute
from moemerge.engine.constants import ALIGN, BLOCK_ELEMS
from moemerge.engine.device import TWIN
from moemerge.methods import _fused, get_method
from moemerge.methods.base import TensorParams
from tests.test_methods import _make_inputs, _run

pytestmark = pytest.mark.skipif(not _fused.available(), reason="numba is not available")

#: dtype -> (storage dtype, output dtype) pairs the engine meets: like-input and cast outputs
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _read_buffer(sources: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sources laid out as the engine's read buffer holds them: each from a multiple of ALIGN."""
    n, size = sources[0].numel(), sources[0].element_size()
    step = -(-n * size // ALIGN) * ALIGN
    buf = torch.zeros(step * len(sources) + ALIGN, dtype=torch.uint8)
    raws = []
    for k, s in enumerate(sources):
        view = buf[k * step:k * step + n * size].view(s.dtype)
        view.copy_(s.reshape(-1))
        raws.append(view)
    return raws


def _torch_path(method: str, params: TensorParams, raws: list[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """The engine's torch path: `apply` on BLOCK_ELEMS blocks through ChunkView, copied out."""
    m = get_method(method)
    n = raws[0].numel()
    t = SimpleNamespace(name="t", shape=(n,), row_len=n, inputs=raws, base=None)
    slabs = [torch.empty(BLOCK_ELEMS) for _ in range(2)]
    out = torch.empty(n, dtype=out_dtype)
    for s in range(0, n, BLOCK_ELEMS):
        e = min(n, s + BLOCK_ELEMS)
        chunk = compute.ChunkView(t, [r[s:e] for r in raws], [sl[:e - s] for sl in slabs], 0, 1,  # type: ignore[arg-type]
                                  torch.float32, None)
        out[s:e].copy_(m.apply(chunk, {}, params).reshape(-1))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _params(weights: list[float], normalize: bool = True, alpha: float = 0.3) -> TensorParams:
    return TensorParams(per_input=tuple({"weight": w} for w in weights), glob={"normalize": normalize, "alpha": alpha})


@pytest.mark.parametrize("method", ["linear", "sma", "wma", "ema"])
@pytest.mark.parametrize("in_name", list(DTYPES))
@pytest.mark.parametrize("out_name", ["bf16", "f32"])
def test_fast_path_has_the_torch_paths_bits(method: str, in_name: str, out_name: str) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs every run; printed on failure
    gen = torch.Generator().manual_seed(seed)
    n_inputs = 1 + seed % 4
    n = BLOCK_ELEMS + 1 + seed % 997  # odd, more than one engine block, not a multiple of the loop's
    scale = torch.exp(torch.randn(n, generator=gen) * 8)  # magnitudes over many binades, subnormals too
    sources = [(torch.randn(n, generator=gen) * scale).to(DTYPES[in_name]) for _ in range(n_inputs)]
    weights = [float(w) for w in torch.randn(n_inputs, generator=gen) * 2]  # negative ones too
    if method == "linear" and abs(sum(weights)) < 1e-3:
        weights[0] += 1.0
    params = _params(weights, normalize=bool(seed % 2), alpha=0.05 + 0.9 * (seed % 7) / 7)
    raws = _read_buffer(sources)
    want = _torch_path(method, params, raws, DTYPES[out_name])
    got = torch.full_like(want, 7.0)
    ran = _fused.weighted_into(method, params, raws, torch.float32, got)
    if in_name == "f16":  # not a stored type of the loop: the caller's torch path runs
        assert not ran, f"seed {seed}"
        return
    assert ran, f"seed {seed}"
    assert torch.equal(_bits(got), _bits(want)), f"seed {seed}: {int((_bits(got) != _bits(want)).sum())} elements differ"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(bad: float) -> None:
    """NaN results go to torch (its NaN bit patterns); Inf is an ordinary value of the loop."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    n = 4099
    sources = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(3)]
    sources[1][17] = bad
    sources[2][4000] = -bad
    params = _params([0.5, -0.25, 1.5])
    raws = _read_buffer(sources)
    want = _torch_path("linear", params, raws, torch.bfloat16)
    got = torch.zeros_like(want)
    ran = _fused.weighted_into("linear", params, raws, torch.float32, got)
    assert ran == (not math.isnan(bad))
    if ran:
        assert torch.equal(_bits(got), _bits(want))
    # overflow to Inf, and Inf - Inf = NaN, from finite inputs
    big = [torch.full((n,), 3e38, dtype=torch.bfloat16), torch.full((n,), 3e38, dtype=torch.bfloat16)]
    big[1][::2] = -3e38
    p2 = _params([1.0, 1.0], normalize=False)
    raws2 = _read_buffer(big)
    out = torch.zeros(n, dtype=torch.bfloat16)
    assert _fused.weighted_into("linear", p2, raws2, torch.float32, out)  # +Inf and 0: no NaN
    assert torch.equal(_bits(out), _bits(_torch_path("linear", p2, raws2, torch.bfloat16)))


def test_refuses_what_it_cannot_match() -> None:
    raws = _read_buffer([torch.randn(100).to(torch.bfloat16) for _ in range(2)])
    p = _params([0.3, 0.7])
    out = torch.empty(100, dtype=torch.bfloat16)
    assert not _fused.weighted_into("ties", p, raws, torch.float32, out)  # not a weighted sum
    assert not _fused.weighted_into("linear", p, raws, torch.float64, out)  # float64 compute
    assert not _fused.weighted_into("linear", p, raws, torch.float32, torch.empty(100, dtype=torch.float16))
    apart = [raws[0], raws[1].clone()]  # not one read buffer: runs only where the spacing allows, exactly
    if _fused.weighted_into("linear", p, apart, torch.float32, out):
        assert torch.equal(_bits(out), _bits(_torch_path("linear", p, apart, torch.bfloat16)))
    mixed = [raws[0], torch.randn(100)]
    assert not _fused.weighted_into("linear", p, mixed, torch.float32, out)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every `weighted_into` answer the engine gets."""
    calls: list[bool] = []
    real = _fused.weighted_into

    def spy(*a: Any, **k: Any) -> bool:
        calls.append(real(*a, **k))
        return calls[-1]

    monkeypatch.setattr(_fused, "weighted_into", spy)
    return calls


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_engine_output_bytes_match_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  dtype_name: str) -> None:
    """Whole merges (chunked and not) with the loop, without it (MOEMERGE_NO_NUMBA) and on the
    device twin, which must stay on torch: the same bytes."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    _, paths = _make_inputs(tmp_path, DTYPES[dtype_name], 3, False, gen)
    doc = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, [0.7, -0.45, 1.1])]}
    calls = _spy(monkeypatch)
    fast = _run(doc, tmp_path / "fast", chunk_rows=3)
    assert (True in calls) == (dtype_name != "f16"), f"seed {seed}: {calls}"
    calls.clear()
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    plain = _run(doc, tmp_path / "plain")
    monkeypatch.delenv("MOEMERGE_NO_NUMBA")
    twin = _run(doc, tmp_path / "twin", device=TWIN)
    assert True not in calls, f"seed {seed}: the torch path (and the device twin) must not take the loop"
    assert fast.keys() == plain.keys() == twin.keys()
    for k in fast:
        for other in (plain, twin):
            assert fast[k].dtype == other[k].dtype
            assert fast[k].view(torch.uint8).numpy().tobytes() == other[k].view(torch.uint8).numpy().tobytes(), \
                f"seed {seed}: tensor {k}"


def test_big_merges_load_the_loop_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weighted sum reading at least LINEAR_COMPILED_FROM bytes starts loading the loop on a
    thread of its own; while it loads every chunk takes the torch path, after it the loop: the
    output is the same bytes either way. Small merges, other methods and MOEMERGE_LINEAR_NUMBA=0
    start nothing."""
    assert not _fused.preload_weighted("ties", 1 << 40)
    assert not _fused.preload_weighted("linear", _fused.LINEAR_COMPILED_FROM - 1) or \
        os.environ.get("MOEMERGE_LINEAR_NUMBA") == "1"
    monkeypatch.setenv("MOEMERGE_LINEAR_NUMBA", "0")
    assert not _fused.preload_weighted("linear", 1 << 40)
    monkeypatch.delenv("MOEMERGE_LINEAR_NUMBA")
    # while loading, the loop is not taken, even with numba in the process
    _fused._LOADING.set()
    try:
        assert not _fused._linear_wanted()
    finally:
        _fused._LOADING.clear()

    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    _, paths = _make_inputs(tmp_path, torch.bfloat16, 3, False, gen)
    doc = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, [0.3, 0.9, -0.2])]}
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    plain = _run(doc, tmp_path / "plain", chunk_rows=2)
    monkeypatch.delenv("MOEMERGE_NO_NUMBA")
    # a "big" merge: the loop (not yet loaded) is loaded in the background during the run
    monkeypatch.setattr(_fused, "LINEAR_COMPILED_FROM", 0)
    monkeypatch.delitem(_fused._COMPILED, "_linear_numba", raising=False)
    started: list[bool] = []
    real = _fused.preload_weighted
    monkeypatch.setattr(_fused, "preload_weighted", lambda name, n: started.append(real(name, n)) or started[-1])
    calls = _spy(monkeypatch)
    mixed = _run(doc, tmp_path / "mixed", chunk_rows=2)
    assert started and started[0], f"seed {seed}: no background load was started: {started}"
    for _ in range(600):  # the load finishes on its own
        if not _fused._LOADING.is_set():
            break
        time.sleep(0.05)
    assert _fused._COMPILED.get("_linear_numba") is not None
    after = _run(doc, tmp_path / "after", chunk_rows=2)
    assert True in calls, f"seed {seed}: the loop was never taken once loaded: {calls}"
    for k in plain:
        for other in (mixed, after):
            assert plain[k].view(torch.uint8).numpy().tobytes() == other[k].view(torch.uint8).numpy().tobytes(), \
                f"seed {seed}: tensor {k}"
