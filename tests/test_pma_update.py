"""`moemerge pma update`: incremental PMA state against from-scratch averages and fp64 references,
what each update reads, crash safety, refusals, state on S3, and periodic recompute."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_checkpoint
from moemerge.api import pma_config, run
from moemerge.errors import ConfigError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.methods import average_weights
from moemerge.pma.state import METHOD_ARRAYS, POINTER_NAME, StateStore, array_name
from moemerge.pma.update import update
from moemerge.verify import verify

U64 = 2.0 ** -53
ALPHA = 0.3


def _snapshot(g: torch.Generator, step: int) -> dict[str, torch.Tensor]:
    """Fresh random tensors: 2-D bf16, 1-D fp32, 3-D fp16, and an int tensor that varies by step."""
    return {
        "model.embed.weight": (torch.randn(23, 16, generator=g) * 0.5).bfloat16(),
        "model.norm.weight": 1 + 0.1 * torch.randn(37, generator=g),
        "model.layers.0.experts.w1": (torch.randn(3, 5, 8, generator=g) * 0.3).half(),
        "model.layers.0.step_counter": torch.arange(6, dtype=torch.int64) + step,
    }


class Run:
    """A training run writing one snapshot per night under `root/ckpt`."""

    def __init__(self, root: Path, seed: int | None = None) -> None:
        self.root = root
        self.seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        self.g = torch.Generator().manual_seed(self.seed)
        self.snaps: dict[int, dict[str, torch.Tensor]] = {}
        self.pattern = str(root / "ckpt" / "step-*")

    def url(self, step: int) -> str:
        return str(self.root / "ckpt" / f"step-{step:08d}")

    def night(self, step: int, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.snaps[step] = tensors if tensors is not None else _snapshot(self.g, step)
        write_checkpoint(self.url(step), self.snaps[step], shards=2)


def _load(out: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a finished output (safetensors or Zarr), read through Checkpoint."""
    from moemerge.io.dtypes import to_torch

    ck = Checkpoint.open(str(out))
    try:
        res = {}
        for name, t in ck.tensors.items():
            buf = bytearray(t.nbytes)
            ck.read_rows(name, 0, t.rows, memoryview(buf))
            res[name] = torch.frombuffer(buf, dtype=to_torch(t.dtype)).reshape(t.shape).clone() if t.nbytes else \
                torch.empty(t.shape, dtype=to_torch(t.dtype))
        return res
    finally:
        ck.close()


def _state_sums(state: str | Path) -> tuple[dict[str, torch.Tensor], object]:
    """The current state's running sums (fp64, flat per tensor) and its metadata."""
    cur = StateStore(str(state)).current()
    assert cur is not None
    try:
        sums = {}
        for name, t in cur.sums.tensors.items():
            buf = bytearray(t.nbytes)
            cur.sums.read_rows(name, 0, t.rows, memoryview(buf))
            sums[name] = torch.frombuffer(buf, dtype=torch.float64).clone()
        return sums, cur.meta
    finally:
        cur.close()


#: dtype -> (significant bits, exponent of the smallest normal as torch.frexp gives it)
_BITS = {torch.bfloat16: (8, -125), torch.float16: (11, -13), torch.float32: (24, -125)}


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |x| (fp64): 2^(e - p) for |x| in [2^(e-1), 2^e)."""
    p, emin = _BITS[dtype]
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.clamp(e, min=emin) - p)


def _exact_sums(method: str, window: list[dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    xs = [w[name].double().reshape(-1) for w in window]
    if method == "ema":
        ws = average_weights("ema", len(xs), ALPHA)
        return {"E": sum(w * x for w, x in zip(ws, xs))}
    s = sum(xs)
    return {"S": s, "W": sum((i + 1) * x for i, x in enumerate(xs))} if method == "wma" else {"S": s}


def _drift_bound(method: str, n: int, k: int, amax: torch.Tensor) -> dict[str, torch.Tensor]:
    """README "fp64 state: drift bound", plus the fp64 reference's own rounding (n u A terms)."""
    ref = 2 * n * (n + 1) * U64 * amax
    if method == "ema":
        return {"E": (3 / ALPHA + 2 * n) * U64 * amax}
    return {"S": (n + 1) * (n + 2 * k) * U64 * amax + ref,
            "W": (n + 1) * (n + 2 * k) * (n + k + 1) * U64 * amax + n * ref}


def _weights_ref(method: str, window: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    ws = average_weights(method, len(window), ALPHA)
    return sum(w * x[name].double() for w, x in zip(ws, window))


# -- incremental equals from-scratch ----------------------------------------------------------------

@pytest.mark.parametrize("method,out_format", [("sma", "safetensors"), ("wma", "zarr"), ("ema", "safetensors")])
def test_fifteen_nightly_updates_equal_from_scratch_and_float64(tmp_path: Path, method: str, out_format: str) -> None:
    run_ = Run(tmp_path)
    n = 5
    state, out = tmp_path / "state", tmp_path / f"pma.{out_format}"
    steps = [1000 * (i + 1) for i in range(n + 15)]
    for s in steps[:n]:
        run_.night(s)
    rng = random.Random(run_.seed)
    kw = dict(method=method, last=n, alpha=ALPHA if method == "ema" else None, out_format=out_format,
              memory_budget="1MB")
    res = update(str(state), run_.pattern, str(out), chunk_rows=rng.choice([1, 2, 3, 7]), **kw)
    assert res.action == "built" and res.steps == tuple(steps[:n])
    for night, s in enumerate(steps[n:], 1):
        run_.night(s)
        # the chunking may change between nights (a new --memory-budget): the state rechunks
        res = update(str(state), run_.pattern, str(out), chunk_rows=rng.choice([1, 2, 3, 7, None]), **kw)
        assert res.action == "updated", (night, res.message)
        assert res.added == (s,)
        assert res.removed == (() if method == "ema" else (steps[night - 1],))
    window_steps = steps if method == "ema" else steps[-n:]
    window = [run_.snaps[s] for s in window_steps]
    assert res.steps == tuple(window_steps)
    got = _load(out)
    assert verify(str(out)) == len(got)

    # 1. the same window from scratch by the same fp64 code (a fresh state): bit-identical output
    fresh = update(str(tmp_path / "fresh-state"), run_.pattern, str(tmp_path / f"fresh.{out_format}"),
                   method=method, last=None if method == "ema" else n,
                   alpha=ALPHA if method == "ema" else None, out_format=out_format)
    assert fresh.steps == res.steps
    scratch = _load(tmp_path / f"fresh.{out_format}")
    # 2. `moemerge pma` (api.run, fp32 accumulation) over the same window
    doc, _ = pma_config([run_.url(s) for s in window_steps], method=method, alpha=ALPHA)
    run(doc, str(tmp_path / "pma-run"))
    direct = _load(tmp_path / "pma-run")
    newest = run_.snaps[window_steps[-1]]
    for name, x in newest.items():
        assert got[name].dtype == x.dtype and got[name].shape == x.shape, name
        if not x.is_floating_point():  # copied from the newest snapshot
            assert torch.equal(got[name], x), name
            continue
        assert torch.equal(got[name], scratch[name]), f"{name}: incremental != from scratch (seed {run_.seed})"
        ref = _weights_ref(method, window, name)
        amax = torch.stack([w[name].double().abs() for w in window]).amax(0)
        # fp64 -> fp32 -> out dtype rounding (torch converts through fp32), plus the fp64 error
        tol = 0.5 * _ulp(ref, x.dtype) + 0.5 * _ulp(ref, torch.float32) + 1e-12 * amax
        err = (got[name].double() - ref).abs()
        assert bool((err <= tol).all()), f"{name}: max err {err.max():.3g} vs float64 (seed {run_.seed})"
        # api.run accumulates in fp32 (one product and sum per snapshot): it may round the other way
        fp32 = len(window) * 2 * 2.0 ** -24 * sum(w * s[name].double().abs() for w, s in
                                                  zip(average_weights(method, len(window), ALPHA), window))
        diff = (got[name].double() - direct[name].double()).abs()
        assert bool((diff <= _ulp(ref, x.dtype) + fp32 + _ulp(ref, torch.float32)).all()), name
    man = json.loads((out / "moemerge-manifest.json").read_bytes())
    assert man["pma"]["steps"] == list(window_steps)
    assert man["pma"]["weights"] == pytest.approx(average_weights(method, len(window), ALPHA))

    # the fp64 state itself is within the documented drift bound of the exact sums
    sums, meta = _state_sums(state)
    k = meta.updates_since_recompute
    assert k == 15
    every = list(run_.snaps.values())  # everything that entered the sums since the last exact build
    for name, x in newest.items():
        if not x.is_floating_point():
            continue
        exact = _exact_sums(method, window, name)
        amax = torch.stack([w[name].double().abs().reshape(-1) for w in every]).amax(0)
        bound = _drift_bound(method, n if method != "ema" else len(window), k, amax)
        for kind in METHOD_ARRAYS[method]:
            err = (sums[array_name(kind, name)] - exact[kind]).abs()
            assert bool((err <= bound[kind]).all()), f"{kind}:{name} drift {err.max():.3g}"


# -- what an update reads ---------------------------------------------------------------------------

def test_update_reads_only_the_new_and_the_leaving_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_ = Run(tmp_path)
    for s in (100, 200, 300, 400, 500):
        run_.night(s)
    state, out = str(tmp_path / "state"), str(tmp_path / "out")
    update(state, run_.pattern, out, method="wma", last=5, chunk_rows=4)
    run_.night(600)
    read: dict[str, int] = {}
    original = storage._LocalSource.read_into

    def counting(self, offset, view):  # a ByteSource that counts what it really reads
        read[self.name] = read.get(self.name, 0) + len(view)
        return original(self, offset, view)

    monkeypatch.setattr(storage._LocalSource, "read_into", counting)
    res = update(state, run_.pattern, out, chunk_rows=4)
    by_dir: dict[str, int] = {}
    for path, n in read.items():
        by_dir[os.path.dirname(path)] = by_dir.get(os.path.dirname(path), 0) + n
    assert set(by_dir) == {run_.url(600), run_.url(100)}, sorted(by_dir)
    for step in (600, 100):
        files = sum(p.stat().st_size for p in Path(run_.url(step)).glob("*.safetensors"))
        data = sum(x.numel() * x.element_size() for x in run_.snaps[step].values())
        # headers plus the float tensors' bytes, each read once (the int tensor of the leaving
        # snapshot is not read; the newest's is copied)
        assert data - 6 * 8 <= by_dir[run_.url(step)] <= files
    floats = sum(x.numel() for x in run_.snaps[600].values() if x.is_floating_point())
    assert res.state_bytes_read == floats * 8 * 2  # S and W, once each
    assert res.snapshots_read == (run_.url(600), run_.url(100))


# -- crash safety -----------------------------------------------------------------------------------

def test_update_killed_mid_write_leaves_previous_state_and_rerun_completes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    big = lambda: {"w": torch.randn(3000, 512, generator=g), "b": torch.randn(512, generator=g)}  # noqa: E731
    run_ = Run(tmp_path)
    for s in (10, 20, 30):
        run_.night(s, big())
    state, out = tmp_path / "state", tmp_path / "out"
    update(str(state), run_.pattern, str(out), method="sma", last=3)
    before, meta_before = _state_sums(state)
    run_.night(40, big())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "moemerge", "pma", "update", str(state), run_.pattern,
                             "-o", str(out), "--memory-budget", "1MB", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        new = next(state.glob("v000002-*"), None)  # versions have unique names: v000002-<random>
        chunks = new / "S%3Aw" / "c" if new is not None else None
        if chunks is not None and chunks.is_dir() and len(os.listdir(chunks)) >= 3:  # being written
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"update finished before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert new is not None and new.is_dir()  # half-written, not pointed to
    after, meta_after = _state_sums(state)  # the previous state, whole
    assert meta_after == meta_before
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # the previous night's output stays whole until the new one is swapped in (issue 11 row 6)
    from moemerge.verify import verify

    assert verify(str(out)) == 2 and not (tmp_path / "out.moemerge-new" / "moemerge-manifest.json").exists()
    res = update(str(state), run_.pattern, str(out))
    assert res.action == "updated" and res.steps == (20, 30, 40)
    names = sorted(p.name for p in state.iterdir())  # the leftover and the dead job's lock gone
    assert names[0] == POINTER_NAME and len(names) == 2 and names[1].startswith("v000002-"), names
    assert names[1] != new.name
    got = _load(out)
    for name in ("w", "b"):
        ref = sum(run_.snaps[s][name].double() for s in (20, 30, 40)) / 3
        assert bool(((got[name].double() - ref).abs() <= 0.5 * _ulp(ref, torch.float32) + 1e-12).all())


# -- no-op, refusals -------------------------------------------------------------------------------

def test_rerun_with_nothing_new_is_a_noop_and_rewrites_only_an_unfinished_output(tmp_path: Path, run_cli) -> None:
    run_ = Run(tmp_path)
    for s in (1, 2, 3):
        run_.night(s)
    state, out = tmp_path / "state", tmp_path / "out"
    assert update(str(state), run_.pattern, str(out), last=2).action == "built"
    man = out / "moemerge-manifest.json"
    stamp = man.stat().st_mtime_ns, man.read_bytes()
    code, stdout, err = run_cli("pma", "update", state, run_.pattern, "-o", out, "--no-progress")
    assert code == 0, err
    assert "nothing new after step 3" in stdout
    assert (man.stat().st_mtime_ns, man.read_bytes()) == stamp
    names = sorted(p.name for p in state.iterdir())
    assert names[0] == POINTER_NAME and len(names) == 2 and names[1].startswith("v000001-"), names
    # an output that is not finished (killed between the state switch and its manifest) is rewritten
    man.unlink()
    (out / ".moemerge-incomplete").touch()  # as a writer leaves it until its manifest is written
    res = update(str(state), run_.pattern, str(out))
    assert res.action == "output" and res.bytes_read < 200 and res.version == 1
    assert verify(str(out)) == 4


def test_refuses_an_older_snapshot_other_settings_and_recompute_for_ema(tmp_path: Path, run_cli) -> None:
    run_ = Run(tmp_path)
    for s in (100, 200, 400):
        run_.night(s)
    state, out = str(tmp_path / "state"), str(tmp_path / "out")
    update(state, run_.pattern, out, method="ema", alpha=0.25, last=2)  # steps 200, 400
    run_.night(300)  # appears late, between steps the state covers
    with pytest.raises(ConfigError, match=r"step-00000300 \(step 300\) is older than the state's last step 400"):
        update(state, run_.pattern, out)
    Path(run_.url(300), "model.safetensors.index.json").unlink()  # now half-written: skipped
    code, _, err = run_cli("pma", "update", state, run_.pattern, "-o", out, "--method", "sma")
    assert code == 1
    assert "built with --method ema --alpha 0.25 --last 2, this update asks for --method sma --last 2" in err
    assert "start a new state" in err
    with pytest.raises(ConfigError, match="--alpha 0.25 .* asks for --method ema --alpha 0.2 "):
        update(state, run_.pattern, out, alpha=0.2)
    with pytest.raises(ConfigError, match="--recompute-every does not apply to --method ema"):
        update(state, run_.pattern, out, recompute_every=3)
    other = tmp_path / "not-a-state"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not-a-state: is not empty and holds no PMA state"):
        update(str(other), run_.pattern, out)
    assert StateStore(state).current().meta.version == 1  # nothing above wrote a byte


# -- state on object storage -------------------------------------------------------------------------

def test_state_on_s3(tmp_path: Path, s3_server: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("pma-bucket")
    run_ = Run(tmp_path)
    for s in (1, 2, 3):
        run_.night(s)
    state, out = "s3://pma-bucket/run42/state", "s3://pma-bucket/run42/latest"
    # the first version raw, the later ones lz4-compressed: an update reads either
    assert update(state, run_.pattern, out, method="wma", last=3, chunk_rows=5,
                  compress_state=False).action == "built"
    for s in (4, 5):
        run_.night(s)
        assert update(state, run_.pattern, out, chunk_rows=5).action == "updated"
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("pma-bucket/run42/state"))  # no lease left
    assert names[0] == POINTER_NAME and len(names) == 2 and names[1].startswith("v000003-"), names
    local = tmp_path / "latest"
    fs.get("pma-bucket/run42/latest", str(local), recursive=True)
    got = _load(local)
    window = [run_.snaps[3], run_.snaps[4], run_.snaps[5]]
    for name, x in run_.snaps[5].items():
        if x.is_floating_point():
            ref = _weights_ref("wma", window, name)
            tol = 0.5 * _ulp(ref, x.dtype) + 0.5 * _ulp(ref, torch.float32) + 1e-12
            assert bool(((got[name].double() - ref).abs() <= tol).all()), name
        else:
            assert torch.equal(got[name], x)
    assert update(state, run_.pattern, out).action == "noop"


# -- drift and periodic recompute --------------------------------------------------------------------

def test_recompute_every_resets_drift(tmp_path: Path) -> None:
    """A snapshot with huge values (a loss spike) passing through the window leaves the fp64
    window sum with a rounding residue after it leaves; --recompute-every K removes it."""
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    run_ = Run(tmp_path)
    snap = lambda scale=1.0: {"w": torch.randn(40, 8, generator=g) * scale}  # noqa: E731
    run_.night(1, snap())
    run_.night(2, snap(1e20))
    run_.night(3, snap())
    a, b = (str(tmp_path / "state-a"), str(tmp_path / "out-a")), (str(tmp_path / "state-b"), str(tmp_path / "out-b"))
    for st, out in (a, b):
        update(st, run_.pattern, out, method="sma", last=3, recompute_every=3 if st == b[0] else None)
    actions = []
    for s in (4, 5, 6):  # the spike leaves at step 5; B recomputes at its third update (step 6)
        run_.night(s, snap())
        update(a[0], run_.pattern, a[1])
        actions.append(update(b[0], run_.pattern, b[1], recompute_every=3).action)
    assert actions == ["updated", "updated", "recomputed"]
    exact = sum(run_.snaps[s]["w"].double() for s in (4, 5, 6)).reshape(-1)
    drifted, meta_a = _state_sums(a[0])
    clean, meta_b = _state_sums(b[0])
    assert meta_b.updates_since_recompute == 0 and meta_a.updates_since_recompute == 3
    assert torch.equal(clean["S:w"], exact)  # exactly the sum (values of one scale add exactly)
    err = (drifted["S:w"] - exact).abs()
    assert err.max() > 1e-3  # the residue is real ...
    amax = torch.stack([run_.snaps[s]["w"].double().abs().reshape(-1) for s in range(1, 7)]).amax(0)
    assert bool((err <= _drift_bound("sma", 3, 3, amax)["S"]).all())  # ... and within the bound
    fresh = tmp_path / "fresh"
    update(str(tmp_path / "fresh-state"), run_.pattern, str(fresh), method="sma", last=3)
    assert torch.equal(_load(b[1])["w"], _load(fresh)["w"])
    assert not torch.equal(_load(a[1])["w"], _load(fresh)["w"])


# -- the state's storage (pma.state_codec, pma.state_io) ---------------------------------------------

def test_state_codec_round_trips_every_bit_pattern() -> None:
    import numpy as np

    from moemerge.errors import CheckpointError
    from moemerge.pma import state_codec as codec

    rng = np.random.default_rng(random.SystemRandom().randrange(2**31))
    n = codec.BLOCK * 2 + 12345  # blocks of every kind, and a short last one
    # neighbouring snapshots of one run: a weight and small steps from it
    base = rng.standard_normal(n) * 0.02
    bf16 = torch.from_numpy(base * (1 + 0.01 * rng.standard_normal((10, n)))).bfloat16().double()
    cases = {
        "sum of bf16": bf16.sum(0).numpy(),            # 24-bit blocks
        "wma of bf16": (bf16 * torch.arange(1, 11, dtype=torch.float64)[:, None]).sum(0).numpy(),
        "fp32 values": rng.standard_normal(n).astype(np.float32).astype(np.float64),
        "full fp64": rng.standard_normal(n),           # every value an exception: fallback
        "empty": np.zeros(0),
        "zeros (a short chunk's padding)": np.zeros(n),
    }
    cases["zeros and a -0.0"] = np.zeros(n)
    cases["zeros and a -0.0"][n // 2] = -0.0
    odd = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    specials = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1e39, -1e300, 1e-40, 5e-324, 2.0 ** -149,
                         np.float32(3.0) + 2.0 ** -40, np.finfo(np.float32).max])
    odd[rng.choice(n, specials.size, replace=False)] = specials
    odd[7] = np.frombuffer(np.uint64(0x7FF8DEAD00000001).tobytes(), dtype=np.float64)[0]  # a NaN payload
    cases["specials"] = odd
    for what, x in cases.items():
        for fallback in ("lz4", "raw"):
            data = codec.encode(x, fallback)
            assert codec.decode(data).view(np.uint64).tobytes() == x.view(np.uint64).tobytes(), (what, fallback)
            assert b"".join(bytes(p) for p in codec.encode_parts(x, fallback)) == data
        if what == "sum of bf16":
            assert len(data) < 3.1 * x.size  # about 3 bytes a value (8 raw)
        if what.startswith("zeros ("):
            assert len(data) < 100  # block headers only
    good = codec.encode(cases["sum of bf16"])
    for bad, why in ((good[:-5], "block lengths"), (good + b"\0", "trailing bytes"), (b"XXXX" + good[4:], "header"),
                     (good[:10], "bytes"), (good[:16 + 10], "truncated")):
        with pytest.raises(CheckpointError, match=f"cannot be decoded .*{why}"):
            codec.decode(bad)


def test_fast_state_chunks_agree_with_zarr_and_fail_when_damaged(tmp_path: Path) -> None:
    from moemerge.errors import CheckpointError
    from moemerge.pma.state_io import FastStateReader

    run_ = Run(tmp_path)
    for s in (1, 2, 3):
        run_.night(s)
    state, out = tmp_path / "state", tmp_path / "out"
    update(str(state), run_.pattern, str(out), method="wma", last=3, chunk_rows=5)  # short last chunks
    run_.night(4)
    assert update(str(state), run_.pattern, str(out), chunk_rows=5).action == "updated"
    cur = StateStore(str(state)).current()
    assert cur is not None and json.loads((state / POINTER_NAME).read_text())["format"] == 2
    try:
        fast = FastStateReader(cur.sums)
        for name, t in cur.sums.tensors.items():
            ref = bytearray(t.nbytes)
            cur.sums.read_rows(name, 0, t.rows, memoryview(ref))  # through zarr
            got = bytearray(t.nbytes)
            assert fast.read_rows(name, 0, t.rows, memoryview(got)) and got == ref, name
            for r0 in range(0, t.rows, 5):  # chunk by chunk, as the pipeline reads them
                r1 = min(t.rows, r0 + 5)
                part = bytearray((r1 - r0) * t.row_bytes)
                assert fast.read_rows(name, r0, r1, memoryview(part))
                assert part == ref[r0 * t.row_bytes:r1 * t.row_bytes], (name, r0)
        assert not fast.read_rows("S:model.embed.weight", 1, 3, memoryview(bytearray(64 * 8)))  # not whole: zarr
    finally:
        cur.close()
    version = state / cur.name
    chunk = version / "W%3Amodel.embed.weight" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 1
    chunk.write_bytes(bytes(raw))
    run_.night(5)
    with pytest.raises(CheckpointError, match=r"W%3Amodel.embed.weight: chunk 1\.0 does not match the checksum"):
        update(str(state), run_.pattern, str(out), chunk_rows=5)
    chunk.unlink()
    with pytest.raises(CheckpointError, match=r"W%3Amodel.embed.weight: chunk 1\.0 is missing"):
        update(str(state), run_.pattern, str(out), chunk_rows=5)
    assert StateStore(str(state)).current().meta.version == 2  # the damaged state was not replaced


def test_format_1_state_is_read_and_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state written by an older moemerge (format 1: blosc-lz4 sums) is continued as it was."""
    from zarr.codecs import BloscCodec

    import moemerge.pma.state as state_mod

    run_ = Run(tmp_path)
    for s in (1, 2, 3):
        run_.night(s)
    state, out = tmp_path / "state", tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(state_mod, "STATE_FORMAT", 1)
        m.setattr(state_mod, "_compressors",
                  lambda method: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=8)])
        update(str(state), run_.pattern, str(out), method="sma", last=3, chunk_rows=4)
    assert json.loads((state / POINTER_NAME).read_text())["format"] == 1
    run_.night(4)
    assert update(str(state), run_.pattern, str(out), chunk_rows=4).action == "updated"
    assert json.loads((state / POINTER_NAME).read_text())["format"] == 2
    update(str(tmp_path / "fresh-state"), run_.pattern, str(tmp_path / "fresh"), method="sma", last=3)
    got, fresh = _load(out), _load(tmp_path / "fresh")
    assert got.keys() == fresh.keys() and all(torch.equal(got[k], fresh[k]) for k in got)
