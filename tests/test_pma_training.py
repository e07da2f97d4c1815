"""PMA for training teams (issue 14, points 1-3): a nightly job that works from the first
snapshot (growing window, --min-snapshots and its exit status), discovery through symlinks and
past snapshots still being written, Megatron-LM's schedules and negative --weights."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import write_checkpoint
from moemerge.io.checkpoint import Checkpoint
from moemerge.methods.averages import schedule_weights
from moemerge.pma import discovery
from moemerge.pma.state import StateStore
from moemerge.settings import EXIT_NOT_READY
from moemerge.verify import verify

ALPHA = 0.3


def _snapshot(g: torch.Generator, step: int) -> dict[str, torch.Tensor]:
    """Fresh random tensors (never zeros): bf16 2-D, fp32 1-D, fp16 3-D, and an int that varies."""
    return {
        "model.embed.weight": (torch.randn(11, 8, generator=g) * 0.5 + 0.01).bfloat16(),
        "model.norm.weight": 1 + 0.1 * torch.randn(13, generator=g),
        "model.layers.0.experts.w1": (torch.randn(2, 3, 4, generator=g) * 0.3).half(),
        "model.layers.0.step_counter": torch.arange(4, dtype=torch.int64) + step,
    }


class Run:
    """A training run writing one snapshot per night under `root/ckpt` (optionally through a
    symlink to a directory elsewhere, as retention layouts do)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seed = random.SystemRandom().randrange(2**31)
        self.g = torch.Generator().manual_seed(self.seed)
        self.snaps: dict[int, dict[str, torch.Tensor]] = {}
        (root / "ckpt").mkdir(parents=True, exist_ok=True)
        self.pattern = str(root / "ckpt" / "step-*")

    def url(self, step: int) -> str:
        return str(self.root / "ckpt" / f"step-{step:08d}")

    def night(self, step: int, *, link: bool = False) -> None:
        self.snaps[step] = _snapshot(self.g, step)
        if link:
            real = self.root / "store" / f"blob{step}"
            write_checkpoint(real, self.snaps[step], shards=2)
            os.symlink(real, self.url(step))
        else:
            write_checkpoint(self.url(step), self.snaps[step], shards=2)


def _load(out: str | Path) -> dict[str, torch.Tensor]:
    from moemerge.io.dtypes import to_torch

    ck = Checkpoint.open(str(out))
    try:
        res = {}
        for name, t in ck.tensors.items():
            buf = bytearray(t.nbytes)
            ck.read_rows(name, 0, t.rows, memoryview(buf))
            res[name] = torch.frombuffer(buf, dtype=to_torch(t.dtype)).reshape(t.shape).clone()
        return res
    finally:
        ck.close()


def _megatron(schedule: str, n: int) -> list[float]:
    """Megatron-LM's coefficients written out independently: c_j = f(j/n) - f((j+1)/n), f(1) = 0."""
    f = {"linear": lambda x: 1 - x, "minus-sqrt": lambda x: 1 - math.sqrt(x)}[schedule]
    return [f(j / n) - (f((j + 1) / n) if j + 1 < n else 0.0) for j in range(n)]


def _ref_weights(schedule: str, n: int) -> list[float]:
    if schedule == "sma":
        return [1 / n] * n
    if schedule == "wma":
        return [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    if schedule == "ema":
        return [(1 - ALPHA) ** (n - 1)] + [ALPHA * (1 - ALPHA) ** (n - i) for i in range(2, n + 1)]
    return _megatron(schedule, n)


def _assert_matches(got: dict[str, torch.Tensor], window: list[dict[str, torch.Tensor]], weights: list[float],
                    what: str) -> None:
    """Every float tensor within rounding of the float64 weighted sum; ints from the newest."""
    newest = window[-1]
    for name, x in newest.items():
        assert got[name].dtype == x.dtype and got[name].shape == x.shape, (what, name)
        if not x.is_floating_point():
            assert torch.equal(got[name], x), (what, name)
            continue
        ref = sum(w * s[name].double() for w, s in zip(weights, window))
        mag = sum(abs(w) * s[name].double().abs() for w, s in zip(weights, window))
        eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[x.dtype]
        tol = eps * ref.abs() + (len(window) + 2) * 2.0 ** -24 * mag + 2.0 ** -24 * 1e-3
        err = (got[name].double() - ref).abs()
        assert bool((err <= tol).all()), f"{what}: {name} max err {err.max():.3g}"


def _manifest(out: Path) -> dict:
    return json.loads((out / "moemerge-manifest.json").read_text())


# -- 1. growing window -------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["sma", "wma", "minus-sqrt"])
def test_nightly_update_from_the_first_snapshot_equals_pma_every_night(tmp_path: Path, run_cli, schedule: str) -> None:
    run_ = Run(tmp_path)
    n = 3
    state, out = tmp_path / "state", tmp_path / "latest"
    flags = ("--schedule", schedule, "--last", str(n), "--no-progress")
    # night 0: the job runs before the first snapshot: nothing to do yet, not an error
    code, _, err = run_cli("pma", "update", state, run_.pattern, "-o", out, *flags)
    assert code == EXIT_NOT_READY and "nothing to do yet" in err and "0 snapshots found" in err, err
    assert not out.exists() and StateStore(str(state)).pointer() is None
    code, _, err = run_cli("pma", run_.pattern, "-o", tmp_path / "x", *flags)
    assert code == EXIT_NOT_READY and "nothing to do yet" in err and not (tmp_path / "x").exists()
    steps = [100 * (i + 1) for i in range(n + 3)]
    for night, s in enumerate(steps, 1):
        run_.night(s)
        code, stdout, err = run_cli("pma", "update", state, run_.pattern, "-o", out, *flags)
        assert code == 0, err
        k = min(night, n)
        window_steps = steps[max(0, night - n):night]
        man = _manifest(out)
        assert man["pma"]["steps"] == window_steps
        assert man["pma"]["window"] == f"window {k} of {n}" and man["pma"]["filling"] == (k < n)
        assert ("window %d of %d" % (k, n) in err) == (k < n), err
        if schedule == "minus-sqrt":
            assert man["pma"]["incremental"] == "recomputed from the window each update"
            if night > 1:
                assert "recomputes the average from the whole window" in err
        meta = StateStore(str(state)).current()
        assert meta is not None
        try:
            assert meta.meta.filling == (k < n) and [s for s, _ in meta.meta.steps] == window_steps
        finally:
            meta.close()
        # the same window by `moemerge pma` from scratch, the same night
        fresh = tmp_path / f"pma-{night}"
        code, stdout, err2 = run_cli("pma", run_.pattern, "-o", fresh, *flags)
        assert code == 0, err2
        assert f"over window {k} of {n}" in stdout
        assert _manifest(fresh)["pma"]["steps"] == window_steps
        got, direct = _load(out), _load(fresh)
        window = [run_.snaps[s] for s in window_steps]
        weights = _ref_weights(schedule, k)
        assert man["pma"]["weights"] == pytest.approx(weights, rel=1e-12)
        _assert_matches(got, window, weights, f"update night {night} (seed {run_.seed})")
        _assert_matches(direct, window, weights, f"pma night {night} (seed {run_.seed})")
        for name, x in got.items():  # both within one rounding of the same fp64 value
            eps = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(x.dtype, 2.0 ** -22)
            assert torch.allclose(x.double(), direct[name].double(), rtol=eps, atol=1e-6), (night, name)
    # incremental over the nights (the window filled, then slid) == one build of the same window
    code, _, err = run_cli("pma", "update", tmp_path / "fresh-state", run_.pattern, "-o", tmp_path / "fresh", *flags)
    assert code == 0, err
    scratch, got = _load(tmp_path / "fresh"), _load(out)
    for name in got:
        assert torch.equal(got[name], scratch[name]), f"{name}: incremental != from scratch (seed {run_.seed})"
    assert verify(str(out)) == len(got)


def test_filling_window_updates_read_only_the_new_snapshot_and_match_a_build_bit_for_bit(tmp_path: Path) -> None:
    from moemerge.pma.update import update

    run_ = Run(tmp_path)
    for s in (10, 20):
        run_.night(s)
    first = update(str(tmp_path / "state"), run_.pattern, str(tmp_path / "o"), method="wma", last=5)
    assert first.action == "built" and first.steps == (10, 20)
    for s in (30, 40, 50, 60):
        run_.night(s)
        res = update(str(tmp_path / "state"), run_.pattern, str(tmp_path / "o"), chunk_rows=random.choice([1, 3, None]))
        assert res.action == "updated" and res.added == (s,), res.message
        assert res.snapshots_read == ((run_.url(s),) if s <= 50 else (run_.url(s), run_.url(10)))
        fresh = update(str(tmp_path / f"fresh{s}"), run_.pattern, str(tmp_path / f"f{s}"), method="wma", last=5)
        a, b = _load(tmp_path / "o"), _load(tmp_path / f"f{s}")
        assert all(torch.equal(a[k], b[k]) for k in a), f"night {s} (seed {run_.seed})"


def test_min_snapshots_exit_status_and_dry_run_lists_what_it_found(tmp_path: Path, run_cli) -> None:
    run_ = Run(tmp_path)
    for s in (100, 200):
        run_.night(s)
    out, state = tmp_path / "o", tmp_path / "state"
    # a dry run lists what there is, fewer than --last included (it used to fail)
    code, stdout, err = run_cli("pma", run_.pattern, "--last", "4", "--dry-run")
    assert code == 0, err
    assert "over window 2 of 4" in stdout and "100" in stdout and "200" in stdout and "window 2 of 4" in err
    # below --min-snapshots: listed, then "nothing to do yet" (exit 3); nothing written
    code, stdout, err = run_cli("pma", run_.pattern, "--last", "4", "--min-snapshots", "3", "--dry-run")
    assert code == EXIT_NOT_READY and "200" in stdout and "--min-snapshots is 3" in err, err
    for args in (("pma", run_.pattern, "-o", out), ("pma", "update", state, run_.pattern, "-o", out)):
        code, _, err = run_cli(*args, "--last", "4", "--min-snapshots", "3", "--no-progress")
        assert code == EXIT_NOT_READY and "nothing to do yet: 2 snapshots found" in err, err
        assert not out.exists() and not (state / "pma-state.json").exists()
    # a bad --min-snapshots is an error (exit 1), not "not ready"
    for bad, needle in (("0", "whole number >= 1"), ("5", "more than --last 4")):
        code, _, err = run_cli("pma", run_.pattern, "-o", out, "--last", "4", "--min-snapshots", bad)
        assert code == 1 and needle in err, err
    # enough: it averages the two there are, and says so
    run_.night(300)
    code, _, err = run_cli("pma", "update", state, run_.pattern, "-o", out, "--last", "4", "--min-snapshots", "3",
                           "--no-progress")
    assert code == 0 and "window 3 of 4" in err, err
    assert _manifest(out)["pma"]["steps"] == [100, 200, 300]
    snaps = {s: {k: v.clone() for k, v in run_.snaps[s].items()} for s in run_.snaps}
    _assert_matches(_load(out), [snaps[s] for s in (100, 200, 300)], [1 / 3] * 3, "3 of 4")
    helptext = " ".join(run_cli("pma", "--help")[1].split())
    assert "--min-snapshots K" in helptext and "3 nothing to do yet" in helptext


# -- 2. discovery --------------------------------------------------------------------------------

def test_symlinked_snapshot_directories_are_discovered(tmp_path: Path, run_cli) -> None:
    run_ = Run(tmp_path)
    for s, link in ((100, True), (200, False), (300, True)):
        run_.night(s, link=link)
    assert os.path.islink(run_.url(100)) and os.path.islink(run_.url(300))
    found, notes = discovery.discover(run_.pattern)
    assert [s.step for s in found] == [100, 200, 300] and not notes
    found2, _ = discovery.discover(str(tmp_path / "ckpt"))  # a prefix, too
    assert [s.step for s in found2] == [100, 200, 300]
    out = tmp_path / "o"
    code, _, err = run_cli("pma", run_.pattern, "-o", out, "--last", "3", "--no-progress")
    assert code == 0, err
    window = [run_.snaps[s] for s in (100, 200, 300)]
    _assert_matches(_load(out), window, [1 / 3] * 3, "symlinks")
    code, _, err = run_cli("pma", "update", tmp_path / "state", run_.pattern, "-o", tmp_path / "u", "--last", "3",
                           "--no-progress")
    assert code == 0, err
    _assert_matches(_load(tmp_path / "u"), window, [1 / 3] * 3, "symlinks, update")
    # a single symlinked snapshot given by itself is a checkpoint, not a prefix
    code, _, err = run_cli("pma", run_.url(300), "-o", tmp_path / "one", "--no-progress")
    assert code == 0, err
    _assert_matches(_load(tmp_path / "one"), window[-1:], [1.0], "one link")
    # inputs unchanged
    assert all(torch.equal(_load(run_.url(s))[k], run_.snaps[s][k]) for s in run_.snaps for k in run_.snaps[s])


def test_a_snapshot_still_growing_between_listing_and_restat_is_skipped_with_a_note(
        tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    run_ = Run(tmp_path)
    for s in (100, 200, 300):
        run_.night(s)
    real = discovery.restat
    growing = Path(run_.url(300))

    def writer_still_busy(fs, url, path):  # a writer appends to step 300 after it looked complete
        if Path(path) == growing:
            with open(growing / "optimizer.pt", "ab") as f:
                f.write(os.urandom(64))
        return real(fs, url, path)

    monkeypatch.setattr(discovery, "restat", writer_still_busy)
    out = tmp_path / "o"
    code, stdout, err = run_cli("pma", run_.pattern, "-o", out, "--last", "3", "--no-progress")
    assert code == 0, err
    assert f"skipped {growing} (step 300): its files changed while it was being listed" in err, err
    assert "window 2 of 3" in err
    assert _manifest(out)["pma"]["steps"] == [100, 200]
    _assert_matches(_load(out), [run_.snaps[100], run_.snaps[200]], [0.5, 0.5], "growing skipped")
    # the nightly update skips it the same way, and takes it the next night once it is still
    code, _, err = run_cli("pma", "update", tmp_path / "state", run_.pattern, "-o", tmp_path / "u", "--last", "3",
                           "--no-progress")
    assert code == 0 and "(step 300): its files changed" in err, err
    assert _manifest(tmp_path / "u")["pma"]["steps"] == [100, 200]
    monkeypatch.setattr(discovery, "restat", real)
    code, _, err = run_cli("pma", "update", tmp_path / "state", run_.pattern, "-o", tmp_path / "u", "--last", "3",
                           "--no-progress")
    assert code == 0 and "step 300" not in err, err
    assert _manifest(tmp_path / "u")["pma"]["steps"] == [100, 200, 300]
    _assert_matches(_load(tmp_path / "u"), [run_.snaps[s] for s in (100, 200, 300)], [1 / 3] * 3, "next night")


# -- 3. schedules and weights ------------------------------------------------------------------

def test_megatron_schedule_coefficients() -> None:
    for n in range(1, 12):
        for sched in ("linear", "minus-sqrt"):
            got = schedule_weights(sched, n)
            assert got == pytest.approx(_megatron(sched, n), rel=1e-12, abs=1e-15)
            assert math.fsum(got) == pytest.approx(1.0, abs=1e-15)
    assert schedule_weights("linear", 4) == pytest.approx([0.25] * 4)
    assert schedule_weights("minus-sqrt", 4) == pytest.approx([0.5, math.sqrt(.5) - .5, math.sqrt(.75) - math.sqrt(.5),
                                                               1 - math.sqrt(.75)])


@pytest.mark.parametrize("schedule", ["sma", "wma", "ema", "linear", "minus-sqrt"])
@pytest.mark.parametrize("window", ["steps", "tokens"])
def test_every_schedule_against_float64(tmp_path: Path, run_cli, schedule: str, window: str) -> None:
    run_ = Run(tmp_path)
    steps = [100 * (i + 1) for i in range(7)]
    for s in steps:
        run_.night(s)
    # snapshots every 100 steps; keep those >= 200 steps apart: 700, 500, 300, 100; the last 3
    spacing = (("--interval-steps", "200") if window == "steps" else
               ("--interval-tokens", "8e8", "--tokens-per-step", "4e6"))
    flags = ("--schedule", schedule, "--last", "3", *spacing, *(("--alpha", str(ALPHA)) if schedule == "ema" else ()),
             "--no-progress")
    want = [300, 500, 700]
    weights = _ref_weights(schedule, 3)
    out = tmp_path / "o"
    code, stdout, err = run_cli("pma", run_.pattern, "-o", out, *flags)
    assert code == 0, err
    man = _manifest(out)
    assert man["pma"]["steps"] == want and man["pma"]["method"] == schedule
    assert man["pma"]["weights"] == pytest.approx(weights, rel=1e-12)
    _assert_matches(_load(out), [run_.snaps[s] for s in want], weights, f"pma {schedule} (seed {run_.seed})")
    # the nightly update agrees, for every schedule (minus-sqrt by recomputing)
    code, _, err = run_cli("pma", "update", tmp_path / "state", run_.pattern, "-o", tmp_path / "u", *flags)
    assert code == 0, err
    assert _manifest(tmp_path / "u")["pma"]["steps"] == want
    _assert_matches(_load(tmp_path / "u"), [run_.snaps[s] for s in want], weights, f"update {schedule}")
    # --method is still accepted, as the same option
    code, _, err = run_cli("pma", run_.pattern, "-o", tmp_path / "m", *flags[2:], "--method", schedule)
    assert code == 0, err
    assert _manifest(tmp_path / "m")["pma"]["weights"] == man["pma"]["weights"]


def test_negative_weights_with_and_without_normalize_and_zero_sum_refused(tmp_path: Path, run_cli) -> None:
    run_ = Run(tmp_path)
    for s in (100, 200, 300):
        run_.night(s)
    snaps = [run_.url(s) for s in (100, 200, 300)]
    window = [run_.snaps[s] for s in (100, 200, 300)]
    w = [round(random.uniform(0.5, 2), 3), -round(random.uniform(0.1, 0.4), 3), round(random.uniform(0.5, 2), 3)]
    text = "--weights=" + ",".join(map(str, w))
    for extra, eff in (((), [x / sum(w) for x in w]), (("--normalize",), [x / sum(w) for x in w]),
                       (("--no-normalize",), w)):
        out = tmp_path / f"o{len(extra)}{extra[0] if extra else ''}"
        code, _, err = run_cli("pma", *snaps, "-o", out, text, *extra, "--no-progress")
        assert code == 0, err
        assert "negative values" in err
        assert ("the merged tensors are scaled by that total" in err) == (extra == ("--no-normalize",))
        man = _manifest(out)
        assert man["pma"]["weights"] == pytest.approx(eff, rel=1e-12)
        assert man["pma"]["normalize"] == (extra != ("--no-normalize",))
        _assert_matches(_load(out), window, eff, f"weights {extra}")
    # a zero sum cannot be normalized; used as given it is a plain difference (Megatron allows it)
    out = tmp_path / "zero"
    for bad, needle in (("--weights=1,-0.25,-0.75", "sum to 0"), ("--weights=-1,0.5,-0.5", "needs a positive sum")):
        code, _, err = run_cli("pma", *snaps, "-o", out, bad, "--normalize", "--no-progress")
        assert code == 1 and needle in err and "--no-normalize" in err, err
        assert not out.exists()
    code, _, err = run_cli("pma", *snaps, "-o", out, "--weights=1,-0.25,-0.75", "--no-normalize", "--no-progress")
    assert code == 0, err
    _assert_matches(_load(out), window, [1, -0.25, -0.75], "zero sum as given")
    # --normalize without --weights, and --weights on an update, are refused by name
    code, _, err = run_cli("pma", *snaps, "-o", tmp_path / "n", "--normalize")
    assert code == 1 and "--normalize" in err
    code, _, err = run_cli("pma", "update", tmp_path / "st", run_.pattern, "-o", tmp_path / "n", text)
    assert code == 1 and "--weights is not supported" in err
    assert all(torch.equal(_load(u)[k], x[k]) for u, x in zip(snaps, window) for k in x)  # inputs unchanged
