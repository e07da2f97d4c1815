"""engine/prefetch.py: the first work units' input byte ranges are hinted to the kernel, in
plan order, up to the limit; storage without hints is passed over; a failing hint changes
nothing; and `run` hints them before it loads torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moemerge
from moemerge.api import _as_config, _open_all
from moemerge.engine import prefetch
from conftest import write_checkpoint


def _models(tmp_path: Path) -> tuple[dict, list[Path]]:
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    paths = []
    for i in range(3):
        tensors = {f"model.layers.{k}.mlp.w.weight": torch.randn(64, 96, generator=g).bfloat16() for k in range(6)}
        paths.append(write_checkpoint(tmp_path / f"m{i}", tensors, shards=2))
    cfg = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1 / 3}} for p in paths]}
    return cfg, paths


def _hints(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    from moemerge.io import storage

    calls: list[tuple[str, int, int]] = []
    real = storage._LocalSource.prefetch

    def record(self: storage._LocalSource, offset: int, nbytes: int) -> None:
        calls.append((self.name, offset, nbytes))
        real(self, offset, nbytes)

    monkeypatch.setattr(storage._LocalSource, "prefetch", record)
    return calls


def test_the_first_units_are_hinted_in_plan_order_up_to_the_limit(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, paths = _models(tmp_path)
    plan = moemerge.plan(cfg, memory_budget="64MB", unit_size="40KB")
    assert len(plan.units) > 2
    ckpts = _open_all(_as_config(cfg))
    calls = _hints(monkeypatch)
    want = []
    for unit in plan.units:
        for ti, r0, r1 in unit.pieces:
            t = plan.tensors[ti]
            for i, src in enumerate(t.sources_used):
                info = ckpts[src].tensors[t.read_name(i)]
                want.append((info.start + r0 * info.row_bytes, (r1 - r0) * info.row_bytes))
    total = prefetch.prefetch_first_reads(plan, ckpts, limit=1 << 40)
    assert [(o, n) for _, o, n in calls] == want and total == sum(n for _, n in want)
    assert all(any(Path(n).resolve().is_relative_to(p.resolve()) for p in paths) for n, _, _ in calls)
    calls.clear()
    limit = want[0][1] * 4 + 1  # stops after the hint that reaches the limit
    assert prefetch.prefetch_first_reads(plan, ckpts, limit=limit) == sum(n for _, n in want[:5])
    assert [(o, n) for _, o, n in calls] == want[:5]
    for c in ckpts:
        c.close()


def test_storage_without_hints_and_failing_hints_change_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.io import storage

    cfg, _ = _models(tmp_path)
    plan = moemerge.plan(cfg, memory_budget="64MB")

    class Remote:  # a checkpoint whose storage takes no hints
        def __getattr__(self, name: str) -> None:
            raise AttributeError(name)

    assert prefetch.prefetch_first_reads(plan, [Remote(), Remote(), Remote()]) == 0

    def fail(self: object, offset: int, nbytes: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(storage._LocalSource, "prefetch", fail)
    ckpts = _open_all(_as_config(cfg))
    assert prefetch.prefetch_first_reads(plan, ckpts) == 0
    res = moemerge.run(cfg, str(tmp_path / "out"), memory_budget="64MB", copy_tokenizer=False)
    assert res.checksums


def _hint_order(argv: list[str]) -> tuple[bool, int]:
    """Run `moemerge argv` in a fresh interpreter: whether torch was loaded when the first
    reads were hinted, and the bytes hinted."""
    code = f"""
import sys
import moemerge.engine.prefetch as pf
real = pf.prefetch_first_reads
def spy(plan, ckpts, limit=pf.FIRST_READS):
    print("torch loaded at hint:", "torch" in sys.modules)
    n = real(plan, ckpts, limit)
    print("hinted", n)
    return n
pf.prefetch_first_reads = spy
from moemerge.cli import main
sys.exit(main({argv!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert "torch loaded at hint:" in out.stdout, out.stdout
    return "torch loaded at hint: True" in out.stdout, int(out.stdout.split("hinted ")[1].split()[0])


def test_run_hints_its_first_reads_before_it_loads_torch(tmp_path: Path) -> None:
    cfg, _ = _models(tmp_path)
    import yaml

    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    loaded, hinted = _hint_order(["run", str(tmp_path / "merge.yml"), str(tmp_path / "out"), "--no-progress"])
    assert not loaded and hinted == 3 * 6 * 64 * 96 * 2


def test_pma_update_hints_the_snapshots_first_reads_before_it_loads_torch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    for step in (100, 200, 300):
        write_checkpoint(tmp_path / "ckpt" / f"step-{step}",
                         {f"model.layers.{k}.mlp.w.weight": torch.randn(64, 96, generator=g).bfloat16() for k in range(4)})
    loaded, hinted = _hint_order(["pma", "update", str(tmp_path / "state"), str(tmp_path / "ckpt" / "step-*"),
                                  "-o", str(tmp_path / "out"), "--method", "sma", "--last", "3", "--no-progress"])
    assert not loaded and hinted == 3 * 4 * 64 * 96 * 2  # every snapshot's rows
