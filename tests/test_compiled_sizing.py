"""Chunks sized for the compiled selection loops (`Method.compiled_working_copies`,
`Plan.compiled_sizing`) and by the tensors themselves (planner/build.py `_budget_cap`): bigger
chunks under the same budget (whole tensors, so one read each) where the loops will run, the
torch path's sizing where they will not (DELLA, mixed dtypes, MOEMERGE_NO_NUMBA, loops that do
not load), and the same output bytes either way; a chunk that takes the torch path after all
gets its buffers allocated (correct, said once), and a NaN result is redone in the one buffer."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch

import moemerge
from moemerge import api
from moemerge.engine import compute
from moemerge.methods import _fused
from conftest import write_checkpoint

pytest.importorskip("numba")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _models(root: Path, gen: torch.Generator, *, norm_dtype: torch.dtype = torch.float32,
            mixed: bool = False) -> list[Path]:
    """Base + 2: three 2-D bf16 weights (the largest 96 x 512) and a float32 norm each."""
    paths = []
    for i in range(3):
        t = {f"model.layers.{k}.mlp.w.weight": (torch.randn(96 - 8 * k, 512, generator=gen) * 0.1).bfloat16()
             for k in range(3)}
        if mixed and i == 2:
            t["model.layers.0.mlp.w.weight"] = t["model.layers.0.mlp.w.weight"].float()
        t["model.norm.weight"] = (1 + 0.1 * torch.randn(512, generator=gen)).to(norm_dtype)
        paths.append(write_checkpoint(root / f"m{i}", t, shards=2))
    return paths


def _cfg(paths: list[Path], method: str = "ties") -> dict:
    return {"merge_method": method, "base_model": str(paths[0]), "parameters": {"density": 0.5},
            "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in paths[1:]]}


def _digest(out: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors")))).hexdigest()


#: Budget at which the torch path's buffers (n + 4 working copies and temporaries, n = 2) split the
#: 96 x 512 tensor into chunks and the compiled loops' one buffer does not: 2 x (3 x 2 + 2)
#: bytes + 4 = 20 bytes an element for 49,152 elements is 983,040 bytes.
BUDGET = 1_000_000


def test_the_compiled_loops_get_whole_tensors_where_the_torch_path_gets_chunks(tmp_path: Path,
                                                                                gen: torch.Generator) -> None:
    paths = _models(tmp_path, gen)
    cfg = api._as_config(_cfg(paths))
    ckpts = api._open_all(cfg)
    try:
        fast = api._plan(cfg, ckpts, memory_budget=BUDGET, shard_size="1GB", seed=0, compiled=True)
        slow = api._plan(cfg, ckpts, memory_budget=BUDGET, shard_size="1GB", seed=0, compiled=False)
    finally:
        for c in ckpts:
            c.close()
    big = "model.layers.0.mlp.w.weight"
    chunks = {p.compiled_sizing: {t.name: len(t.chunks) for t in p.tensors} for p in (fast, slow)}
    assert fast.compiled_sizing and not slow.compiled_sizing
    assert fast.working_copies == 1 and slow.working_copies == 2 + 4
    assert chunks[True][big] == 1 and chunks[False][big] > 1
    assert fast.bytes_read < slow.bytes_read  # the selection's passes read a whole tensor once
    for p in (fast, slow):
        assert p.peak_bytes <= BUDGET, p.peak_bytes


def test_small_float32_tensors_do_not_shrink_the_big_ones_chunks(tmp_path: Path, gen: torch.Generator) -> None:
    """With float32 norms beside bf16 weights, chunks were sized for 12 input bytes an element
    (the norms'); sized by each tensor, the weights' chunks are those of a bf16-only model."""
    with_f32 = api.plan(_cfg(_models(tmp_path / "a", gen)), memory_budget=BUDGET)
    only_bf16 = api.plan(_cfg(_models(tmp_path / "b", gen, norm_dtype=torch.bfloat16)), memory_budget=BUDGET)
    rows = {p is with_f32: {t.name: t.rows_per_chunk for t in p.tensors} for p in (with_f32, only_bf16)}
    assert rows[True]["model.layers.0.mlp.w.weight"] == rows[False]["model.layers.0.mlp.w.weight"] == 96
    assert with_f32.peak_bytes <= BUDGET


@pytest.mark.parametrize("case", ["della", "mixed dtypes", "no numba"])
def test_the_torch_path_keeps_its_sizing(tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                         case: str) -> None:
    paths = _models(tmp_path, gen, mixed=case == "mixed dtypes")
    doc = _cfg(paths, "della" if case == "della" else "ties")
    if case == "no numba":
        monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    p = api.plan(doc, memory_budget=BUDGET)
    assert not p.compiled_sizing and p.working_copies == 2 + 4


def test_same_bytes_whatever_the_sizing_and_a_run_replans_when_the_loops_do_not_load(
        tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _models(tmp_path, gen)
    doc = _cfg(paths)
    fast = moemerge.run(doc, str(tmp_path / "fast"), memory_budget=BUDGET)
    assert fast.plan.compiled_sizing
    monkeypatch.setattr(_fused, "available", lambda: False)  # numba present, its loops do not load
    replanned = moemerge.run(doc, str(tmp_path / "replanned"), memory_budget=BUDGET)
    assert not replanned.plan.compiled_sizing and replanned.plan.working_copies == 2 + 4
    monkeypatch.undo()
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    torch_path = moemerge.run(doc, str(tmp_path / "torch"), memory_budget=BUDGET)
    assert _digest(tmp_path / "fast") == _digest(tmp_path / "replanned") == _digest(tmp_path / "torch")
    assert fast.checksums == replanned.checksums == torch_path.checksums


def test_a_chunk_that_takes_the_torch_path_after_all_gets_its_buffers(
        tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    paths = _models(tmp_path, gen)
    doc = _cfg(paths)
    want = moemerge.run(doc, str(tmp_path / "want"), memory_budget=BUDGET)
    monkeypatch.setattr(_fused, "_stored", lambda chunk: None)  # planned for the loops, run by torch
    monkeypatch.setattr(compute, "_over_budget_said", [])
    with caplog.at_level(logging.WARNING, logger="moemerge.engine.compute"):
        got = moemerge.run(doc, str(tmp_path / "got"), memory_budget=BUDGET)
    assert got.plan.compiled_sizing and got.plan.working_copies == 1
    assert _digest(tmp_path / "got") == _digest(tmp_path / "want") and got.checksums == want.checksums
    assert caplog.text.count("more compute buffers than planned") == 1  # said once (a process)


def test_a_nan_result_is_redone_in_the_one_buffer(tmp_path: Path, gen: torch.Generator,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 inputs +-3.3e38 apart: task vectors of +-inf, dropped by dare's random masks to
    inf * 0 = NaN; the compiled loop counts them and redoes the chunk into its one buffer."""
    big = torch.tensor(3.3e38).to(torch.bfloat16)
    paths = []
    for i in range(2):
        w = (torch.randn(64, 256, generator=gen) * 0.1).bfloat16()
        w.view(-1)[::3] = -big if i == 0 else big
        paths.append(write_checkpoint(tmp_path / f"m{i}", {"model.layers.0.mlp.w.weight": w}))
    # without rescale: its L1 sums refuse an infinite task vector
    doc = {"merge_method": "dare_linear", "base_model": str(paths[0]), "parameters": {"density": 0.5, "rescale": False},
           "models": [{"model": str(paths[1]), "parameters": {"weight": 1.0}}]}
    got = moemerge.run(doc, str(tmp_path / "got"), memory_budget=BUDGET)
    assert got.plan.compiled_sizing and got.plan.working_copies == 1
    monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    want = moemerge.run(doc, str(tmp_path / "want"), memory_budget=BUDGET)
    from safetensors.torch import load_file

    out = next((tmp_path / "want").glob("*.safetensors"))
    assert bool(load_file(out)["model.layers.0.mlp.w.weight"].isnan().any())  # the case makes NaN
    assert _digest(tmp_path / "got") == _digest(tmp_path / "want") and got.checksums == want.checksums


@pytest.mark.parametrize("case", range(6))
def test_buffers_stay_under_the_budget_for_random_tensor_sets(tmp_path: Path, gen: torch.Generator, case: int) -> None:
    """`_budget_cap` against the plan's own accounting: for random shapes, dtypes, methods and
    budgets, the buffers the engine allocates (`peak_bytes`) fit the budget (unless the plan
    says single rows are too big), and the compiled sizing's chunks are never smaller than
    the torch path's (fewer buffers, same budget)."""
    import random

    rng = random.Random(int(torch.randint(0, 1 << 30, (1,), generator=gen)))
    shapes = [(rng.randint(1, 700), rng.choice([64, 96, 512, 1000])) for _ in range(rng.randint(1, 6))]
    dtypes = [rng.choice([torch.bfloat16, torch.float32]) for _ in shapes]
    paths = []
    for i in range(3):
        t = {f"model.layers.{k}.mlp.w.weight": torch.randn(*s, generator=gen).to(d)
             for k, (s, d) in enumerate(zip(shapes, dtypes))}
        paths.append(write_checkpoint(tmp_path / f"m{i}", t))
    method = rng.choice(["ties", "dare_ties", "breadcrumbs", "della"])
    cfg = api._as_config(_cfg(paths, method))
    ckpts = api._open_all(cfg)
    budget = rng.randint(1 << 20, 8 << 20)
    try:
        plans = {c: api._plan(cfg, ckpts, memory_budget=budget, shard_size="1GB", seed=0, compiled=c)
                 for c in (True, False)}
    finally:
        for c in ckpts:
            c.close()
    for p in plans.values():
        if not any("single rows" in n for n in p.notes):
            assert p.peak_bytes <= budget, (method, shapes, dtypes, budget, p.compiled_sizing)
    rows = {c: {t.name: t.rows_per_chunk for t in p.tensors} for c, p in plans.items()}
    assert all(rows[True][n] >= rows[False][n] for n in rows[True]), (method, shapes, dtypes, budget)
