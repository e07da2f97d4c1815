"""The local executor's pipeline: failures in any thread surface as the real error, promptly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import moemerge

from moemerge.api import _open_all, _plan
from moemerge.config import parse_config
from moemerge.engine import run_local
from moemerge.errors import CheckpointError, OutputError


class FailingWriter:
    """Accepts `fail_after` writes, then fails like a full disk."""

    def __init__(self, fail_after: int) -> None:
        self.fail_after = fail_after
        self.writes = 0

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
        self.writes += 1
        if self.writes > self.fail_after:
            raise OutputError(f"{name}: write failed at row {row_start} (No space left on device)")


def _setup(ckpt_factory, n_tensors: int = 6):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    paths = [ckpt_factory(f"m{i}", {f"t{k}": torch.randn(40, 33, generator=g) for k in range(n_tensors)})
             for i in range(2)]
    cfg = parse_config({"merge_method": "linear",
                        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]})
    ckpts = _open_all(cfg)
    return cfg, ckpts


@pytest.mark.parametrize("fail_after", [0, 3, 17])
def test_writer_failure_is_raised_as_itself_and_stops_the_run(ckpt_factory, fail_after: int) -> None:
    cfg, ckpts = _setup(ckpt_factory)
    plan = _plan(cfg, ckpts, memory_budget="1MB", shard_size="5GB", seed=0, chunk_rows=2)
    writer = FailingWriter(fail_after)
    t0 = time.monotonic()
    with pytest.raises(OutputError, match="No space left"):
        run_local(plan, ckpts, writer)
    assert time.monotonic() - t0 < 20  # no thread left waiting for work that never comes
    assert writer.writes == fail_after + 1


def test_read_failure_mid_run_is_raised_as_itself(ckpt_factory, tmp_path: Path) -> None:
    cfg, ckpts = _setup(ckpt_factory)
    plan = _plan(cfg, ckpts, memory_budget="1MB", shard_size="5GB", seed=0, chunk_rows=2)
    calls = {"n": 0}
    original = ckpts[1].read_rows

    def flaky(name: str, r0: int, r1: int, out: memoryview) -> None:
        calls["n"] += 1
        if calls["n"] == 9:
            raise CheckpointError(f"{ckpts[1].url}: file ended at byte 123 (it shrank while being read?)")
        original(name, r0, r1, out)

    ckpts[1].read_rows = flaky  # type: ignore[method-assign]

    class Sink:
        def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
            pass

    with pytest.raises(CheckpointError, match="shrank"):
        run_local(plan, ckpts, Sink())


@pytest.mark.parametrize("dtype, reads_per_chunk", [(torch.float32, 3), (torch.bfloat16, 4)])
def test_tie_count_pass_is_read_only_when_ties_need_breaking(ckpt_factory, tmp_path, monkeypatch,
                                                              dtype, reads_per_chunk) -> None:
    """ties streams a tensor in passes: high bits, low bits, tie counts, apply. Random fp32
    values have no tie at the threshold, so the tie-count pass is not read; coarse bf16 values
    (few distinct values) do, so it is. On the torch path: the compiled kernels settle most
    thresholds and tie cuts in pass 1 (two reads; tests/test_selection_reads.py)."""
    from moemerge.io.checkpoint import Checkpoint

    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    if dtype == torch.float32:
        make = lambda: torch.randn(64, 40, generator=g)  # noqa: E731
    else:
        make = lambda: (torch.randint(-3, 4, (64, 40), generator=g) / 4).to(dtype)  # noqa: E731
    base = ckpt_factory("base", {"w": make()})
    ms = [ckpt_factory(f"m{i}", {"w": make()}) for i in range(2)]
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.3}} for m in ms]}
    reads: list[tuple[str, int]] = []
    real = Checkpoint.read_rows

    def spy(self, name, r0, r1, buf):
        reads.append((self.url, r0))
        return real(self, name, r0, r1, buf)

    monkeypatch.setattr(Checkpoint, "read_rows", spy)
    res = moemerge.run(cfg, str(tmp_path / "out"), chunk_rows=8, memory_budget="1MB")
    chunks = len(res.plan.tensors[0].chunks)
    assert chunks == 8
    assert len(reads) == 3 * chunks * reads_per_chunk  # 3 sources, once per pass read and apply
    monkeypatch.undo()
    whole = moemerge.run(cfg, str(tmp_path / "whole"), memory_budget="1GB")
    assert whole.checksums == res.checksums
