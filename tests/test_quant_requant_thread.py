"""Requantization runs on the writer thread (engine/pipeline.py `_Requant`), beside the next
chunk's merge: the output is the same bytes whichever chunking the budget gives (chunks of a
few rows, so several chunks are in flight at once), and a requantization that fails there
stops the run with its error, nothing committed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import moemerge
from moemerge.engine import pipeline
from tests.quant_fixtures import block_fp8_model


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _cfg(a: Path, b: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.6}},
                                                 {"model": str(b), "parameters": {"weight": 0.4}}]}


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return block_fp8_model(tmp_path / "a", gen)[0], block_fp8_model(tmp_path / "b", gen)[0]


def test_requantized_output_is_the_same_for_any_chunking(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    small = moemerge.run(_cfg(*inputs), str(tmp_path / "small"), memory_budget="1MB", quantize="like-input")
    big = moemerge.run(_cfg(*inputs), str(tmp_path / "big"), memory_budget="1GB", quantize="like-input")
    assert max(len(t.chunks) for t in small.plan.tensors) > 1  # several chunks per tensor in flight
    assert _digest(tmp_path / "small") == _digest(tmp_path / "big")
    assert small.checksums == big.checksums


@pytest.mark.parametrize("where", ["requantize", "quantize_bands"])
def test_a_failed_requantization_stops_the_run_uncommitted(tmp_path: Path, inputs: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Both ways to requantize: after the merge on the writer thread (`requantize`), and band by
    band inside the fused weighted sum of block-FP8 inputs (`quantize_bands`, engine/fused_fp8.py)."""
    calls = []

    def broken(*a: object, **k: object) -> list:
        calls.append(1)
        raise RuntimeError(f"{where} broke")

    monkeypatch.setattr(pipeline, where, broken)
    if where == "requantize":
        monkeypatch.setattr(pipeline, "fused_for", lambda *a, **k: None)  # requantized after the merge, not in it
    with pytest.raises(RuntimeError, match=f"{where} broke"):
        moemerge.run(_cfg(*inputs), str(tmp_path / "out"), memory_budget="1MB", quantize="like-input")
    assert calls
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "out").glob("moemerge-manifest.json"))
