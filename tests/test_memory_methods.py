"""Constant memory for methods with whole-tensor statistics (issue: ties and sce).

Three inputs (a base and two fine-tunes) holding one 512 MiB bf16 tensor each, merged with
`--memory-budget 128MB` in a child process: peak RSS stays under 1 GiB while ties streams
three selection passes and sce four passes over every tensor. The output is checked on
row ranges against what the method must keep there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import moemerge
from conftest import write_yaml
from test_memory import BUDGET, NAME, RSS_LIMIT, SHAPE, _rows, _run_child

CONFIGS = {
    "ties": {"merge_method": "ties", "parameters": {"density": 0.3, "lambda": 1.0},
             "weights": [0.4, 0.6]},
    "sce": {"merge_method": "sce", "parameters": {"select_topk": 0.5}, "weights": None},
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_statistics_methods_stream_512mib_tensors_under_1gib(big_inputs: list[Path], tmp_path: Path, method: str) -> None:
    spec = CONFIGS[method]
    base, *models = big_inputs
    config = {
        "merge_method": spec["merge_method"],
        "base_model": str(base),
        "models": [{"model": str(p), **({"parameters": {"weight": w}} if spec["weights"] else {})}
                   for p, w in zip(models, spec["weights"] or [None] * len(models))],
        "parameters": spec["parameters"],
    }
    plan = moemerge.plan(config, memory_budget=BUDGET)
    (t,) = plan.tensors
    assert t.rows_per_chunk < SHAPE[0] and plan.passes >= 3, "the budget must force streamed passes"
    out = tmp_path / "out"
    try:
        peak = _run_child("run", write_yaml(tmp_path / "merge.yml", config), out,
                          "--memory-budget", BUDGET, "--no-progress")
        assert peak < RSS_LIMIT, f"{method}: peak RSS {peak / 2**20:.0f} MiB >= {RSS_LIMIT / 2**20:.0f} MiB"
        # where every task vector is dropped the output is the base exactly; elsewhere it is not
        for r0, r1 in [(0, 4), (SHAPE[0] // 2, SHAPE[0] // 2 + 4), (SHAPE[0] - 4, SHAPE[0])]:
            b = _rows(base, r0, r1)
            got = _rows(out, r0, r1)
            assert got.shape == b.shape and torch.isfinite(got.float()).all()
            changed = (got != b).double().mean().item()
            # ties keeps 30% of each task vector, sce 50% of positions: a clear share changes
            assert 0.15 < changed < 0.95, f"{method}: {changed:.3f} of rows {r0}:{r1} differ from the base"
    finally:
        shutil.rmtree(out, ignore_errors=True)
