"""`moemerge pma` end to end over a run's snapshots found by a pattern: SMA / WMA / EMA against
float64 references, the window flags, --dry-run, the manifest, non-float tensors taken from the
newest snapshot, S3 input, and memory that does not grow with the number of snapshots."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import moemerge
from conftest import write_checkpoint
from moemerge.pma.discovery import parse_step
from moemerge.synthetic import make_single_tensor_checkpoint

MANIFEST = "moemerge-manifest.json"
COUNTER = "model.rotary.inv_freq_steps"  # an integer tensor that changes during training
EXTRA = "model.layers.0.self_attention.core_attention._extra_state"  # TE's pickled U8 blob
FLOATS = ("model.embed_tokens.weight", "model.layers.0.mlp.experts.gate_up_proj", "model.norm.weight",
          "model.layers.0.self_attn.q_proj.weight")
STYLES = ("step-{:08d}", "global_step{}", "iter_{:07d}", "checkpoint-{}", "step_{}")


def _tensors(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(3, 16, 10, generator=g),
        "model.norm.weight": torch.randn(16, generator=g) + 1,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        COUNTER: torch.randint(0, 2**40, (5,), generator=g, dtype=torch.int64),
        # a serialized blob whose length changes between snapshots
        EXTRA: torch.randint(0, 256, (20 + step % 17,), generator=g, dtype=torch.uint8),
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, list[int]]:
    """A run's checkpoint directory: 8 finished snapshots (mixed name styles, some sharded),
    one still being written and one without a step in its name."""
    ckpt = tmp_path / "ckpt"
    steps = sorted(random.Random(11).sample(range(1000, 400_000, 1000), 8))
    for i, step in enumerate(steps):
        write_checkpoint(ckpt / STYLES[i % len(STYLES)].format(step), _tensors(step), shards=1 + i % 2,
                         config={"model_type": "test", "num_hidden_layers": 1, "step": step})
    newest = write_checkpoint(ckpt / f"step-{steps[-1] + 1000}", _tensors(1), shards=2)
    (newest / "model.safetensors.index.json").unlink()  # being written: never read
    write_checkpoint(ckpt / "latest", _tensors(2))
    return ckpt, steps


def _load(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _reference(method: str, steps: list[int], alpha: float = 0.2,
               weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The average in float64, from the definitions (EMA by its recursion, not its weights)."""
    snaps = [{k: v.double() for k, v in _tensors(s).items() if k in FLOATS} for s in steps]
    n = len(snaps)
    out = {}
    for k in FLOATS:
        if method == "ema":
            e = snaps[0][k]
            for s in snaps[1:]:
                e = alpha * s[k] + (1 - alpha) * e
            out[k] = e
        else:
            w = weights or ([1.0] * n if method == "sma" else [float(i) for i in range(1, n + 1)])
            out[k] = sum(wi * s[k] for wi, s in zip(w, snaps)) / math.fsum(w)
    return out


def _assert_matches(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], steps: list[int],
                    weights: list[float]) -> None:
    snaps = [_tensors(s) for s in steps]
    for k, r in ref.items():
        out = got[k]
        assert out.dtype == snaps[0][k].dtype and out.shape == r.shape, k
        if out.dtype == torch.float32:
            # fp32 accumulation: each of N multiplies and N-1 adds rounds once (2**-24 relative)
            scale = sum(abs(w) * s[k].double().abs() for w, s in zip(weights, snaps))
            bound = (2 * len(steps) + 1) * 2**-24 * scale
            assert ((out.double() - r).abs() <= bound).all(), k
        else:  # bf16 output: the fp32 sum rounded once, so within one bf16 ulp
            assert ((out.double() - r).abs() <= r.abs() * 2**-7 + 1e-30).all(), k
            assert (out == r.to(out.dtype)).double().mean() > 0.95, k
    newest = snaps[-1]
    assert torch.equal(got[COUNTER], newest[COUNTER])
    assert torch.equal(got[EXTRA], newest[EXTRA]) and got[EXTRA].shape != snaps[0][EXTRA].shape


@pytest.mark.parametrize("method, n, extra", [
    ("sma", 5, ()), ("wma", 8, ()), ("ema", 7, ("--alpha", "0.3")), ("ema", 10, ()),
])
def test_averages_over_a_pattern_equal_the_float64_reference(run_dir, tmp_path: Path, run_cli,
                                                             method: str, n: int, extra: tuple[str, ...]) -> None:
    ckpt, steps = run_dir
    if n > len(steps):  # more snapshots: a longer run
        more = [steps[-1] + 7000 * (i + 1) for i in range(n - len(steps))]
        for s in more:
            write_checkpoint(ckpt / f"step-{s}", _tensors(s))
        steps = steps + more
    chosen = steps[-n:]
    alpha = float(extra[1]) if extra else 0.2
    out = tmp_path / "out"
    code, stdout, err = run_cli("pma", f"{ckpt}/*", "-o", out, "--method", method, "--last", n, *extra,
                                "--no-progress")
    assert code == 0, err
    assert "latest" in err and "no step number" in err and "still being written" in err  # the notes
    manifest = json.loads((out / MANIFEST).read_text())["pma"]
    assert manifest["steps"] == chosen and manifest["method"] == method
    assert [Path(u).parent for u in manifest["snapshots"]] == [ckpt] * n
    w = manifest["weights"]
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-12)
    if method == "ema":
        assert manifest["alpha"] == alpha
        assert w == pytest.approx([(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)])
    for step, wi in zip(chosen, w):  # the table printed before the work: step and weight
        assert any(str(step) in ln and f"{wi:.6f}" in ln for ln in stdout.splitlines()), stdout
    _assert_matches(_load(out), _reference(method, chosen, alpha), chosen, w)
    assert run_cli("verify", out)[0] == 0


def test_dry_run_prints_snapshots_weights_and_bytes_and_writes_nothing(run_dir, tmp_path: Path, run_cli) -> None:
    ckpt, steps = run_dir
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "never"
    code, stdout, err = run_cli("pma", f"{ckpt}/", "-o", out, "--method", "wma", "--last", "4", "--dry-run")
    assert code == 0, err
    lines = stdout.splitlines()
    for step, w in zip(steps[-4:], ("0.100000", "0.200000", "0.300000", "0.400000")):
        assert any(str(step) in ln and str(ckpt) in ln and w in ln for ln in lines), stdout
    for old in (d.name for d in ckpt.iterdir() if parse_step(d.name) in steps[:-4]):
        assert old not in stdout
    assert any(ln.split()[:1] == ["read"] for ln in lines) and "estimate" in stdout
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    code, stdout2, err = run_cli("pma", f"{ckpt}/", "--method", "wma", "--last", "4", "--dry-run")
    assert code == 0 and stdout2 == stdout, err  # no -o needed for a dry run


def test_pma_init_before_a_step_and_interval_in_tokens(run_dir, tmp_path: Path, run_cli) -> None:
    ckpt, steps = run_dir
    spike = steps[5] + 1  # a loss spike just after the 6th snapshot
    out = tmp_path / "init"
    code, _, err = run_cli("pma", str(ckpt / "*"), "-o", out, "--last", "3", "--before-step", spike, "--no-progress")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())["pma"]
    assert manifest["steps"] == steps[3:6]
    assert manifest["selection"] == {"last": 3, "interval_steps": None, "before_step": spike}
    _assert_matches(_load(out), _reference("sma", steps[3:6]), steps[3:6], [1 / 3] * 3)

    # 4 spaced at least 60k steps (240e9 tokens at 4e6 per step) apart, counting back from the newest
    out = tmp_path / "spaced"
    code, _, err = run_cli("pma", str(ckpt / "*"), "-o", out, "--last", "3", "--interval-tokens", "240e9",
                           "--tokens-per-step", "4e6", "--no-progress")
    assert code == 0, err
    want = [steps[-1]]
    for s in reversed(steps[:-1]):
        if want[-1] - s >= 60_000:
            want.append(s)
    want = want[::-1][-3:]
    manifest = json.loads((out / MANIFEST).read_text())["pma"]
    assert manifest["steps"] == want and manifest["selection"]["interval_steps"] == 60_000
    _assert_matches(_load(out), _reference("sma", want), want, [1 / 3] * 3)


def test_explicit_weights_with_a_pattern_take_the_newest_n(run_dir, tmp_path: Path, run_cli) -> None:
    ckpt, steps = run_dir
    out = tmp_path / "w"
    code, stdout, err = run_cli("pma", f"{ckpt}/*", "-o", out, "--weights", "1,2,5", "--no-progress")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["pma"]["steps"] == steps[-3:] and manifest["pma"]["method"] == "weights"
    assert manifest["pma"]["weights"] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    # a linear merge whose integer tensors come from the newest (they differ, so MergeKit's
    # rule would refuse it), recorded in the config copy
    assert yaml.safe_load((out / "moemerge-config.yml").read_text())["non_float"] == "last"
    _assert_matches(_load(out), _reference("linear", steps[-3:], weights=[1, 2, 5]), steps[-3:], [1 / 8, 2 / 8, 5 / 8])


def test_too_few_snapshots_fail_before_any_work(run_dir, tmp_path: Path, run_cli) -> None:
    ckpt, _ = run_dir
    out = tmp_path / "o"
    # fewer than --last is a window still filling (issue 14); fewer than --min-snapshots is
    # "nothing to do yet", exit 3 (tests/test_pma_training.py covers both)
    for args in (("--min-snapshots", "9", "--last", "10"), ("--last", "4", "--interval-steps", "200000",
                                                             "--min-snapshots", "4")):
        code, _, err = run_cli("pma", f"{ckpt}/*", "-o", out, *args)
        assert code == 3 and "nothing to do yet" in err and "still being written" in err, (args, err)
        assert not out.exists()
    for args, needles in (
        (("--min-snapshots", "11"), ("more than --last 10",)),
        (("--last", "2", "--before-step", "1000"), ("0 before step 1000",)),
        (("--interval-tokens", "1e9"), ("--tokens-per-step",)),
        (("--rename", "nonsense"), ("OLD=NEW",)),
    ):
        code, _, err = run_cli("pma", f"{ckpt}/*", "-o", out, *args)
        assert code == 1 and err.startswith("moemerge: error:") and "Traceback" not in err, (args, err)
        assert all(n in err for n in needles), (args, err)
        assert not out.exists()
    code, _, err = run_cli("pma", f"{ckpt}/*", "--last", "2")
    assert code == 1 and "-o OUT" in err


def test_averages_read_non_float_tensors_from_the_newest_only(run_dir) -> None:
    ckpt, steps = run_dir
    urls = [str(next(ckpt.glob(f"*{s}"))) for s in steps[-3:]]
    linear = [{"model": u, "parameters": {"weight": 1.0}} for u in urls]
    sma = moemerge.plan({"merge_method": "sma", "models": [{"model": u} for u in urls]})
    last = moemerge.plan({"merge_method": "linear", "models": linear, "non_float": "last"})
    for p in (sma, last):
        by = {t.name: t for t in p.tensors}
        assert by[COUNTER].method == "copy" and by[COUNTER].sources_used == (2,)
        assert by[EXTRA].sources_used == (2,) and by[EXTRA].shape == _tensors(steps[-1])[EXTRA].shape
        assert by["model.norm.weight"].sources_used == (0, 1, 2)
    # MergeKit methods keep their rule: non-float tensors must be equal (here even their shapes differ)
    with pytest.raises(moemerge.errors.MismatchError, match=EXTRA):
        moemerge.plan({"merge_method": "linear", "models": linear})
    with pytest.raises(moemerge.errors.ConfigError, match="non_float"):
        moemerge.plan({"merge_method": "linear", "models": linear, "non_float": "newest"})


def test_pattern_on_s3(run_dir, tmp_path: Path, s3_server: str, run_cli) -> None:
    import boto3
    import s3fs

    ckpt, steps = run_dir
    boto3.client("s3").create_bucket(Bucket="run42")
    fs = s3fs.S3FileSystem()
    for d in sorted(ckpt.iterdir()):
        for f in sorted(d.iterdir()):
            fs.put_file(str(f), f"run42/ckpt/{d.name}/{f.name}")
    out = tmp_path / "from-s3"
    code, stdout, err = run_cli("pma", "s3://run42/ckpt/", "-o", out, "--method", "ema", "--last", "4",
                                "--no-progress")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())["pma"]
    assert manifest["steps"] == steps[-4:] and all(u.startswith("s3://run42/ckpt/") for u in manifest["snapshots"])
    local = tmp_path / "from-disk"
    assert run_cli("pma", str(ckpt), "-o", local, "--method", "ema", "--last", "4", "--no-progress")[0] == 0
    a, b = _load(out), _load(local)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- memory does not grow with the number of snapshots -----------------------------------------


def _peaks(root: Path, shape: tuple[int, int], dtype: str, budget: str, counts: tuple[int, ...]) -> dict[int, int]:
    from test_memory import _run_child  # the child-process VmHWM probe

    for i in range(max(counts)):
        make_single_tensor_checkpoint(root / "ckpt" / f"step-{(i + 1) * 500:06d}", "weight", shape, dtype, seed=40 + i)
    peaks = {}
    for n in counts:
        out = root / f"out{n}"
        peaks[n] = _run_child("pma", str(root / "ckpt" / "step-*"), "-o", out, "--last", str(n),
                              "--memory-budget", budget, "--no-progress")
        manifest = json.loads((out / MANIFEST).read_text())
        assert len(manifest["pma"]["steps"]) == n
        shutil.rmtree(out)
    return peaks


def _assert_flat(peaks: dict[int, int], tensor_bytes: int) -> None:
    lo, hi = min(peaks.values()), max(peaks.values())
    print("peak RSS by snapshot count:", {n: f"{p / 2**20:.0f} MiB" for n, p in peaks.items()})
    assert hi <= 1.10 * lo, {n: f"{p / 2**20:.0f} MiB" for n, p in peaks.items()}
    # and far from holding one tensor per snapshot
    assert hi - lo < 2 * tensor_bytes


def test_memory_flat_in_the_number_of_snapshots_small(tmp_path: Path) -> None:
    """3 and 12 snapshots of one 16 MiB tensor under an 8 MB budget (the default suite's version;
    one tensor per snapshot held at once would add 144 MiB at 12, far above the 10%)."""
    peaks = _peaks(tmp_path, (1024, 4096), "F32", "8MB", (3, 12))
    _assert_flat(peaks, 16 * 2**20)


@pytest.mark.slow
def test_memory_flat_in_the_number_of_snapshots_256mib(tmp_path: Path) -> None:
    """3 and 12 snapshots of one 256 MiB tensor under a 128 MB budget peak within 10%."""
    peaks = _peaks(tmp_path, (8192, 16384), "BF16", "128MB", (3, 12))
    _assert_flat(peaks, 256 * 2**20)
    assert max(peaks.values()) < 1 << 30
