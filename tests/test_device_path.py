"""The device path (`--device cuda`): host storage buffers, each chunk copied to the device
for the math and back, every method on its torch path.

Here it runs as the CPU twin (engine/device.py `TWIN`): the same copies and the same code as
on CUDA, with "device" tensors that refuse `.numpy()` as CUDA tensors do. Every registered
method, on fresh random inputs, at several chunk sizes, must give the same bytes as the plain
CPU path (numba/numpy kernels where they exist). On a machine with CUDA the same comparison
runs on the GPU (skipped here): bytes identical for every method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import moemerge
from moemerge.engine import pipeline
from moemerge.engine.device import TWIN, allocate, device_bytes, placement, twin_tensor
from moemerge.errors import ConfigError
from moemerge.methods import REGISTRY
from moemerge.methods._host import host_copy, on_host
from tests.test_methods import CASES, DTYPES, _config, _make_inputs, _run

#: Every method's CUDA output is byte-identical to the CPU's (README "GPU path"): on the
#: device run only separate IEEE adds, subtractions, multiplies, divisions (by device tensors:
#: methods/_host.py div_scalar_), comparisons, stable sorts and integer counts; statistics are
#: summed exactly on the host and coefficients computed there, random streams drawn there.
PARAMS = [pytest.param(m, i, id=f"{m}-{i}") for m, cases in CASES.items() for i in range(len(cases))]
#: chunk sizes the device path is run at: whole tensors, one row, three rows
CHUNKINGS: list[dict[str, Any]] = [{}, {"chunk_rows": 1, "memory_budget": "1MB"}, {"chunk_rows": 3}]


def _inputs(tmp_path: Path, method: str, case: int) -> tuple[dict[str, Any], int, str]:
    glob, per, with_base = CASES[method][case]
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs every run; printed on failure
    gen = torch.Generator().manual_seed(seed)
    dtype_name = list(DTYPES)[seed % len(DTYPES)]
    _, paths = _make_inputs(tmp_path, DTYPES[dtype_name], len(per), with_base, gen)
    return _config(method, glob, per, paths, with_base), seed, dtype_name


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()


def _count_staging(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the chunks the pipeline copies to the device (proves the device path ran)."""
    calls = [0]
    real = pipeline._Pipeline._to_device

    def spy(self: Any, *a: Any) -> Any:
        calls[0] += 1
        return real(self, *a)

    monkeypatch.setattr(pipeline._Pipeline, "_to_device", spy)
    return calls


@pytest.mark.parametrize("method,case", PARAMS)
def test_device_twin_gives_the_cpu_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                         case: int) -> None:
    doc, seed, dtype_name = _inputs(tmp_path, method, case)
    cpu = _run(doc, tmp_path / "cpu")
    staged = _count_staging(monkeypatch)
    for k, kw in enumerate(CHUNKINGS):
        before = staged[0]
        twin = _run(doc, tmp_path / f"twin{k}", device=TWIN, **kw)
        assert staged[0] > before, "the device path did not run"
        assert twin.keys() == cpu.keys()
        for name in cpu:
            assert _bytes(twin[name]) == _bytes(cpu[name]), \
                f"{method} case {case} {dtype_name} {kw}: `{name}` differs on the device path (seed {seed})"


def test_every_method_is_covered() -> None:
    assert {m for m, _ in ((p.values[0], p.values[1]) for p in PARAMS)} == set(REGISTRY)


def test_twin_tensors_behave_like_device_tensors() -> None:
    """What the twin stands for: results stay "on the device", `.numpy()` fails as on CUDA,
    `.cpu()` is a host copy; numpy/numba kernels never see twin tensors."""
    x = twin_tensor(torch.randn(5, 7))
    y = (x * 2).to(torch.float64).reshape(-1)[3:]
    assert not on_host(x) and not on_host(y) and on_host(torch.zeros(2))
    with pytest.raises(RuntimeError, match="numpy"):
        y.numpy()
    import numpy as np

    with pytest.raises(RuntimeError, match="numpy"):
        np.asarray(x)
    h = host_copy(x)
    assert on_host(h) and torch.equal(h, x.as_subclass(torch.Tensor))
    h += 1  # a copy: the device tensor is unchanged
    assert not torch.equal(h, x.as_subclass(torch.Tensor))
    same = x.to("cpu", torch.float32)
    assert on_host(same) and same.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_placements() -> None:
    cpu, twin = placement("cpu"), placement(TWIN)
    assert not cpu.staged and cpu.host_kind == "cpu"
    assert twin.staged and twin.host_kind == "cpu" and not on_host(allocate(16, twin.device))
    cuda = placement("cuda:1")
    assert cuda.staged and cuda.host_kind == "cpu-pinned" and cuda.cuda


def test_plan_counts_device_memory(tmp_path: Path) -> None:
    """The device's need: one chunk's staged inputs and output plus the compute buffers and the
    method's temporaries; a smaller budget gives smaller chunks and so a smaller need."""
    doc, _, _ = _inputs(tmp_path, "ties", 0)
    big = moemerge.plan(doc)
    small = moemerge.plan(doc, chunk_rows=1, memory_budget="1MB")
    need = device_bytes(big)
    assert need >= big.chunk_in_bytes + big.chunk_out_bytes + big.working_copies * big.chunk_elems * 4
    assert device_bytes(small) < need


def test_cuda_without_cuda_is_refused_before_any_output(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    doc, _, _ = _inputs(tmp_path, "linear", 0)
    with pytest.raises(ConfigError, match="no CUDA device"):
        moemerge.run(doc, str(tmp_path / "out"), device="cuda")
    assert not (tmp_path / "out").exists()


# -- on a CUDA machine (skipped here) ---------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("method,case", PARAMS)
def test_cuda_matches_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, case: int) -> None:
    doc, seed, dtype_name = _inputs(tmp_path, method, case)
    cpu = _run(doc, tmp_path / "cpu")
    staged = _count_staging(monkeypatch)
    for k, kw in enumerate(CHUNKINGS):
        got = _run(doc, tmp_path / f"cuda{k}", device="cuda", **kw)
        assert staged[0] > 0 and got.keys() == cpu.keys()
        for name in cpu:
            assert _bytes(got[name]) == _bytes(cpu[name]), \
                f"{method} case {case} {dtype_name} {kw}: `{name}` differs on CUDA (seed {seed})"


@cuda
def test_cuda_device_memory_is_checked_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc, _, _ = _inputs(tmp_path, "ties", 0)
    free, total = torch.cuda.mem_get_info()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (16, total))
    with pytest.raises(ConfigError, match="device memory"):
        moemerge.run(doc, str(tmp_path / "out"), device="cuda")
    assert not list((tmp_path / "out").glob("*.safetensors*")), "output written before the refusal"


@cuda
def test_cuda_host_buffers_are_pinned() -> None:
    assert allocate(1 << 10, placement("cuda").host_kind).is_pinned()
    assert allocate(1 << 10, "cuda").device.type == "cuda"


def test_plan_prints_the_device_memory(tmp_path: Path, run_cli: Any) -> None:
    import json

    from tests.conftest import write_yaml

    doc, _, _ = _inputs(tmp_path, "ties", 1)
    cfg = write_yaml(tmp_path / "m.yml", doc)
    need = device_bytes(moemerge.plan(doc))
    code, out, err = run_cli("plan", cfg, "--device", "cuda")
    assert code == 0, err
    from moemerge.sizes import format_size

    assert f"device memory on cuda: {format_size(need)}" in out
    code, out, err = run_cli("plan", cfg, "--json", "--cuda")
    assert code == 0 and json.loads(out)["device_bytes"] == need
    code, out, _ = run_cli("plan", cfg)
    assert code == 0 and "device memory" not in out


def test_partials_handed_back_hold_no_device_tensors() -> None:
    """What a Dask task returns (unreduced statistics) is copied off the device."""
    from moemerge.engine.device import to_host

    dev = twin_tensor(torch.arange(6))
    got = to_host({"a": [dev, (dev[:2], 3)], "b": None})
    assert on_host(got["a"][0]) and on_host(got["a"][1][0]) and got["a"][1][1] == 3 and got["b"] is None
    assert torch.equal(got["a"][0], torch.arange(6)) and isinstance(got["a"][1], tuple)
