"""The running-sum stage of `pma update` (methods.running) and its plan (planner.plan_update):
the stage against plain fp64 sums, block by block as the engine runs it, and the plan's chunks
within the budget and on every input's scale blocks."""

from __future__ import annotations

import pytest
import torch

from moemerge.io.checkpoint import TensorInfo
from moemerge.methods.running import RunningStep
from moemerge.planner.update import plan_update, state_source
from tests.reference_methods import running_fold


def _snaps(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(n)]


@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_build_then_slide_matches_plain_fp64_sums_for_any_block(method: str) -> None:
    snaps = _snaps(6, 1000)
    m = [x.double() for x in snaps]
    alpha = 0.3 if method == "ema" else None
    built, avg = running_fold(RunningStep(method=method, mode="build", snapshots=4, window=4, alpha=alpha), snaps[:4], {}, 97)
    if method == "ema":
        e = m[0].clone()
        for x in m[1:4]:
            e = alpha * x + (1 - alpha) * e  # type: ignore[operator]
        assert torch.equal(built["E"], e) and torch.equal(avg, e)
    else:
        assert torch.equal(built["S"], m[0] + m[1] + m[2] + m[3])
        if method == "wma":
            assert torch.equal(built["W"], 1 * m[0] + 2 * m[1] + 3 * m[2] + 4 * m[3])
    # one more snapshot: slide (SMA/WMA: step 5 enters, step 1 leaves), in blocks of any size
    ins = [snaps[4]] if method == "ema" else [snaps[4], snaps[0]]
    step = RunningStep(method=method, mode="slide", snapshots=len(ins), window=4 if method != "ema" else 5, alpha=alpha)
    a, avg_a = running_fold(step, ins, built, 1000)
    b, avg_b = running_fold(step, ins, built, 13)
    assert all(torch.equal(a[q], b[q]) for q in a) and torch.equal(avg_a, avg_b)
    if method == "sma":
        assert torch.equal(avg_a, (((m[0] + m[1] + m[2] + m[3]) + m[4]) - m[0]) / 4)
    # output only: the average of the sums as they are, nothing written
    out, avg_o = running_fold(RunningStep(method=method, mode="output", snapshots=0, window=step.window, alpha=alpha),
                       [], a, 100)
    assert torch.equal(avg_o, avg_a)


def _info(name: str, shape: tuple[int, ...], dtype: str = "BF16", start: int = 0, row_align: int = 1) -> TensorInfo:
    numel = 1
    for d in shape:
        numel *= d
    return TensorInfo(name=name, dtype=dtype, shape=shape, file="model.safetensors", start=start,
                      nbytes=numel * 2, row_align=row_align)


def test_plan_update_reads_state_sizes_chunks_within_budget_and_aligns_them() -> None:
    newest = {"w": _info("w", (3000, 512), row_align=128), "b": _info("b", (512,), start=1),
              "step": _info("step", (1,), dtype="I64", start=2)}
    old = {"w": _info("w", (3000, 512)), "b": _info("b", (512,), start=1)}
    step = RunningStep(method="wma", mode="slide", snapshots=2, window=5)
    p = plan_update(step, ("/new", newest), [("/new", newest), ("/old", old)], state="/st/v000002-ab",
                    memory_budget=16 << 20, shard_size=1 << 30)
    assert p.sources == ("/new", "/old", state_source("/st/v000002-ab", "S"), state_source("/st/v000002-ab", "W"))
    by = {t.name: t for t in p.tensors}
    assert by["w"].in_dtypes == ("BF16", "BF16", "F64", "F64") and by["w"].inputs == (0, 1, 2, 3)
    assert by["step"].method == "copy" and by["step"].inputs == (0,)
    assert 1 < len(by["w"].chunks) and by["w"].rows_per_chunk % 128 == 0  # the scale blocks of `w`
    assert p.peak_bytes <= p.memory_budget
    assert p.bytes_written == 3000 * 512 * 2 + 512 * 2 + 8  # the output only, not the state
    build = plan_update(RunningStep(method="wma", mode="build", snapshots=2, window=2), ("/new", newest),
                        [("/old", old), ("/new", newest)], state=None, memory_budget=8 << 20, shard_size=1 << 30)
    assert build.sources == ("/old", "/new") and build.tensors[0].in_dtypes == ("BF16", "BF16")
