"""`moemerge plan`'s time estimate (planner/estimate.py): I/O from the plan's bytes (every
streamed statistics pass re-reads), compute from per-element costs, and the flags and JSON
that show them. The model's arithmetic is checked; wall time never is."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from moemerge.api import plan
from moemerge.planner import estimate as est
from tests.quant_fixtures import block_fp8_model

SHAPE = (64, 256)


def _models(ckpt_factory, n: int, seed: int = 0) -> list[Path]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*SHAPE, generator=gen)
    return [ckpt_factory(f"m{i}", {"w": (base + 0.1 * torch.randn(*SHAPE, generator=gen)).to(torch.bfloat16),
                                   "norm": torch.rand(SHAPE[1], generator=gen).to(torch.bfloat16)})
            for i in range(n)]


def _cfg(tmp_path: Path, method: str, paths: list[Path], name: str = "c.yml") -> Path:
    doc: dict = {"merge_method": method, "models": [{"model": str(p), "parameters": {"weight": 0.5}}
                                                    for p in paths[1:]]}
    doc["base_model"] = str(paths[0])
    if method in ("ties", "dare_ties"):
        doc["parameters"] = {"density": 0.5}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _work_ns(p, costs: est.Costs, passes: int) -> float:
    """The model's method CPU ns, computed here from the plan's tensors independently."""
    return sum(t.numel * len(t.sources_used) * (costs.apply_ns + costs.pass_ns * passes)
               for t in p.tensors if t.method != "copy")


def test_compute_grows_with_statistics_passes(tmp_path: Path, ckpt_factory) -> None:
    paths = _models(ckpt_factory, 3)
    lin = plan(str(_cfg(tmp_path, "task_arithmetic", paths, "a.yml")))
    ties = plan(str(_cfg(tmp_path, "ties", paths, "b.yml")))
    e_lin, e_ties = lin.estimate(cores=2), ties.estimate(cores=2)
    assert e_lin.family == "elementwise" and e_ties.family == "selection"
    sel = est.FAMILIES["selection"]
    from moemerge.methods import get_method

    t = ties.tensors[0]
    n_pass = len(get_method("ties").passes(t.params, t.shape))
    assert n_pass >= 2
    pipe = ties.bytes_read * est.READ_COPY_NS + ties.bytes_written * est.HASH_NS
    speedup = 1 + est.PARALLEL_EFFICIENCY  # two cores
    want = (_work_ns(ties, sel, n_pass) + pipe) / speedup / 1e9
    assert e_ties.compute_s == pytest.approx(want, rel=1e-9)
    # the passes are what makes it cost more than without them
    no_pass = (_work_ns(ties, sel, 0) + pipe) / speedup / 1e9
    assert e_ties.compute_s > no_pass
    assert e_ties.total_s == pytest.approx(e_ties.startup_s + max(e_ties.io_s, e_ties.compute_s))


@pytest.mark.parametrize("compiled", [True, False])
def test_streamed_passes_reread_and_cost_io(tmp_path: Path, ckpt_factory, monkeypatch: pytest.MonkeyPatch,
                                            compiled: bool) -> None:
    """Under a budget too small for a tensor, statistics passes read it again: every pass on
    the torch path, twice in all with the compiled loops. The plan's bytes read are what a run
    reads (counted), and the I/O estimate follows them."""
    import moemerge
    from moemerge.io import storage
    from moemerge.synthetic import make_single_tensor_checkpoint

    if not compiled:
        monkeypatch.setenv("MOEMERGE_NO_NUMBA", "1")
    paths = [make_single_tensor_checkpoint(tmp_path / f"s{i}", "w", (2048, 1024), "BF16", seed=i) for i in range(3)]
    cfg = _cfg(tmp_path, "ties", paths)
    whole = plan(str(cfg), memory_budget="1GB")
    streamed = plan(str(cfg), memory_budget="8MB")
    assert len(streamed.tensors[0].chunks) > 1 and len(whole.tensors[0].chunks) == 1
    assert streamed.compiled_sizing == compiled
    in_bytes = 3 * 2048 * 1024 * 2
    assert whole.bytes_read == in_bytes
    assert streamed.bytes_read == in_bytes * (2 if compiled else 1 + streamed.passes)
    read: list[int] = []
    real = storage._LocalSource.read_into

    def counting(self: storage._LocalSource, offset: int, out: memoryview) -> None:
        if self.name.endswith(".safetensors") and offset > 8:  # not the header (its length, then its JSON)
            read.append(len(out))
        real(self, offset, out)

    monkeypatch.setattr(storage._LocalSource, "read_into", counting)
    moemerge.run(str(cfg), str(tmp_path / "out"), memory_budget="8MB")
    assert sum(read) == streamed.bytes_read
    a, b = whole.estimate(disk_speed=1e9), streamed.estimate(disk_speed=1e9)
    assert a.io_s == pytest.approx((in_bytes + whole.bytes_written) / 1e9)
    assert b.io_s == pytest.approx((streamed.bytes_read + streamed.bytes_written) / 1e9)
    assert b.io_s > a.io_s and b.total_s >= a.total_s


def test_compute_grows_with_inputs(tmp_path: Path, ckpt_factory) -> None:
    paths = _models(ckpt_factory, 5)
    few = plan(str(_cfg(tmp_path, "ties", paths[:3], "a.yml"))).estimate(cores=2)
    many = plan(str(_cfg(tmp_path, "ties", paths, "b.yml"))).estimate(cores=2)
    assert many.compute_s > few.compute_s * 1.4  # 5 inputs against 3: the work is per input
    assert many.read_bytes == pytest.approx(few.read_bytes * 5 / 3)


def test_cores_divide_parallel_methods_only(tmp_path: Path, ckpt_factory) -> None:
    paths = _models(ckpt_factory, 3)
    ties = plan(str(_cfg(tmp_path, "ties", paths, "a.yml")))
    eff = est.PARALLEL_EFFICIENCY
    two, four = ties.estimate(cores=2).compute_s, ties.estimate(cores=4).compute_s
    assert four == pytest.approx(two * (1 + eff) / (1 + 3 * eff))
    assert ties.estimate(cores=4).compute_s < ties.estimate(cores=2).compute_s
    lin = plan(str(_cfg(tmp_path, "task_arithmetic", paths, "b.yml")))
    assert lin.estimate(cores=4).threads == 1
    assert lin.estimate(cores=4).compute_s == pytest.approx(
        _work_ns(lin, est.METHOD_COSTS["task_arithmetic"], 0) / 1e9)


def test_disk_speed_changes_io_only(tmp_path: Path, ckpt_factory) -> None:
    p = plan(str(_cfg(tmp_path, "ties", _models(ckpt_factory, 3))))
    fast, slow = p.estimate(), p.estimate(disk_speed=500e6)
    assert fast.disk_speed == est.DEFAULT_DISK_SPEED
    assert slow.io_s == pytest.approx(2 * fast.io_s)
    assert slow.compute_s == fast.compute_s
    with pytest.raises(ValueError, match="positive"):
        p.estimate(disk_speed=0)


def test_plan_json_and_table_show_the_estimate(tmp_path: Path, ckpt_factory, run_cli) -> None:
    cfg = _cfg(tmp_path, "ties", _models(ckpt_factory, 3))
    code, out, err = run_cli("plan", str(cfg), "--json", "--disk-speed", "500MB")
    assert code == 0, err
    e = json.loads(out)["estimate"]
    for key in ("total_s", "io_s", "compute_s", "startup_s", "bound", "disk_speed_bytes_per_s",
                "write_speed_bytes_per_s", "cores", "threads", "family", "read_bytes", "write_bytes"):
        assert key in e, key
    assert e["disk_speed_bytes_per_s"] == 500e6 and e["family"] == "selection"
    code, out, err = run_cli("plan", str(cfg), "--disk-speed", "2GB/s")
    assert code == 0, err
    assert "I/O" in out and "compute" in out and "2.00 GB/s" in out, out
    code, out, err = run_cli("plan", str(cfg), "--disk-speed", "fast")
    assert code != 0 and "--disk-speed" in err


def test_quantized_input_costs_dequantize(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    a, _ = block_fp8_model(tmp_path / "a", gen)
    b, _ = block_fp8_model(tmp_path / "b", gen)
    cfg = tmp_path / "q.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    fused = plan(str(cfg), quantize="none")
    # a weighted sum (linear) decodes, scales and sums block FP8 in one loop: FUSED_FP8_NS per
    # element and input in place of the apply and the dequantizing (engine/fused_fp8.py)
    quantized = [t for t in fused.tensors if t.in_codecs]
    assert quantized and all(c == "fp8-block" for t in quantized for c in t.in_codecs)
    bare = dataclasses.replace(fused, tensors=tuple(dataclasses.replace(t, in_codecs=()) for t in fused.tensors))
    elems = sum(t.numel * len(t.sources_used) for t in quantized)
    assert fused.estimate().cpu_s - bare.estimate().cpu_s == pytest.approx(
        elems * (est.FUSED_FP8_NS - est.FAMILIES["elementwise"].apply_ns) / 1e9 + est.NUMBA_STARTUP_S[1])
    # another elementwise method (the same costs, not a weighted sum) dequantizes on read
    p = dataclasses.replace(fused, method="passthrough")
    plain = dataclasses.replace(p, tensors=tuple(dataclasses.replace(t, in_codecs=()) for t in p.tensors))
    deq_elems = sum(t.numel * len(t.in_codecs) for t in quantized)
    # dequantizing runs beside the one compute thread of an elementwise method (cores - 1 of them)
    got = p.estimate(cores=3).compute_s
    pipe_ns = p.bytes_read * est.READ_COPY_NS + p.bytes_written * est.HASH_NS
    want = max(_work_ns(p, est.FAMILIES["elementwise"], 0), (deq_elems * est.DEQUANT_NS + pipe_ns) / 2) / 1e9
    assert got == pytest.approx(want)
    assert got >= plain.estimate(cores=3).compute_s
    # in CPU seconds the dequantizing is added whole, and numba's kernels load at start-up
    assert p.estimate().cpu_s - plain.estimate().cpu_s == pytest.approx(
        deq_elems * est.DEQUANT_NS / 1e9 + est.NUMBA_STARTUP_S[1])
    requant = dataclasses.replace(plan(str(cfg), quantize="like-input"), method="passthrough")
    requantized = [t for t in requant.tensors if t.quant is not None]
    assert requantized
    unquant = dataclasses.replace(requant, tensors=tuple(dataclasses.replace(t, quant=None) for t in requant.tensors))
    assert requant.estimate().cpu_s - unquant.estimate().cpu_s == pytest.approx(
        sum(t.numel for t in requantized) * est.REQUANT_NS / 1e9)


def test_streamed_passes_convert_again(tmp_path: Path) -> None:
    """A method whose passes reuse converted inputs in memory (arcee_fusion) pays `stream_ns`
    per pass per element when the tensor streams; the CPU estimate adds exactly that and the
    re-reads' copies."""
    from moemerge.synthetic import make_single_tensor_checkpoint

    paths = [make_single_tensor_checkpoint(tmp_path / f"s{i}", "w", (2048, 1024), "BF16", seed=i) for i in range(2)]
    cfg = tmp_path / "a.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "arcee_fusion", "base_model": str(paths[0]),
                                   "models": [{"model": str(paths[1])}]}))
    whole, streamed = plan(str(cfg), memory_budget="1GB"), plan(str(cfg), memory_budget="8MB")
    t = streamed.tensors[0]
    assert t.rows > t.rows_per_chunk and whole.tensors[0].rows == whole.tensors[0].rows_per_chunk
    from moemerge.methods import get_method

    n_pass = len(get_method("arcee_fusion").passes(t.params, t.shape))
    costs = est.FAMILIES["fusion"]
    assert costs.stream_ns > 0
    extra = (t.numel * 2 * costs.stream_ns * n_pass + (streamed.bytes_read - whole.bytes_read) * est.READ_COPY_NS) / 1e9
    assert streamed.estimate().cpu_s - whole.estimate().cpu_s == pytest.approx(extra)
