"""examples/pma_pretrain: the PMA pipeline end to end on a tiny MoE language model (short
version here; the full run, a few minutes, is marked slow)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from moemerge.verify import verify

SCRIPT = Path(__file__).parent.parent / "examples" / "pma_pretrain" / "run.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pma_pretrain_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _check(ex: ModuleType, out: Path, log: dict) -> None:
    s = ex.Setup(**log["setup"])
    losses = [v for _, v in log["snapshots"]] + [v for m in ex.METHODS for _, v in log["merged"][m]]
    losses += [v for c in log["resume"].values() for _, v in c] + [v for _, v in log["spike"]]
    assert losses and all(math.isfinite(v) for v in losses)
    assert len(log["snapshots"]) == s.steps // s.every
    for m in ex.METHODS:  # every night's average was made, and the last one loads as a model
        assert log["merged"][m], m
        assert verify(str(out / "merged" / m)) > 0
        assert math.isfinite(ex.evaluate(ex.load_hf_model(out / "merged" / m, s),
                                         [ex.Corpus(s.vocab, s.seed).batch(2, s.seq, ex.torch.Generator())]))
    # PMA-init: a DCP checkpoint that torch.distributed.checkpoint loads into the training model
    assert (out / "pma-init" / ".metadata").is_file() and verify(str(out / "pma-init")) > 0
    model = ex.load_dcp_model(out / "pma-init", s)
    assert all(ex.torch.isfinite(p).all() for p in model.parameters())
    assert (out / "pma_pretrain.png").stat().st_size > 1000
    assert "| last snapshot |" in (out / "results.md").read_text()


def test_the_short_example_runs_the_pipeline_and_its_outputs_load(tmp_path: Path) -> None:
    ex = _example()
    out = tmp_path / "pma"
    log = ex.main(["--out", str(out), "--small"])
    _check(ex, out, log)


@pytest.mark.slow
def test_the_full_example_averages_beat_the_last_snapshot(tmp_path: Path) -> None:
    ex = _example()
    out = tmp_path / "pma"
    log = ex.main(["--out", str(out)])
    _check(ex, out, log)
    last = log["snapshots"][-1][1]
    assert log["merged"]["sma"][-1][1] < last  # the paper's effect at a constant learning rate
