"""Start-up and planning stay light (issue 15): `--version`, `--help` and every subcommand's
`--help` import none of the heavy libraries; `plan`, `inspect` and `verify` read headers
without torch, dask, zarr or numba; planning memory grows slowly enough with the tensor count
that a 671B DeepSeek-V3 layout (91,991 tensors, three inputs) plans under 300 MB.

Each case runs `python -m moemerge` in a fresh interpreter under a wrapper that reports which
modules were imported and the peak RSS. Bounds only: no wall times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from moemerge.synthetic_headers import write_headers_only
from tests.conftest import write_checkpoint, write_yaml

ROOT = Path(__file__).resolve().parent.parent

#: What no header-only command may import (tests/test_layering.py keeps the layers; this the cost).
HEAVY = ("torch", "dask", "distributed", "zarr", "s3fs", "numba", "transformers", "tokenizers",
         "huggingface_hub", "safetensors")
#: What `--version` and `--help` need none of either.
HELP_HEAVY = HEAVY + ("numpy", "rich", "fsspec", "yaml")

_WRAPPER = """
import json, runpy, sys
sys.argv = ["moemerge", *sys.argv[1:]]
def peak_kb():  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:  # not Linux: the memory test skips
        return None
code = 0
try:
    runpy.run_module("moemerge", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stdout.flush()
sys.stderr.write("\\nSTARTUP " + json.dumps({
    "code": code, "modules": sorted(m for m in sys.modules if "." not in m),
    "maxrss_kb": peak_kb()}) + "\\n")
"""


def _moemerge(*args: str | Path) -> dict[str, Any]:
    """Run `moemerge ARGS` in a fresh interpreter; its exit code, top-level modules and peak RSS."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("STARTUP ")]
    assert marker, f"moemerge {' '.join(map(str, args))} did not finish:\n{proc.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(marker[-1][len("STARTUP "):])
    report["stdout"], report["stderr"] = proc.stdout, proc.stderr
    return report


def _assert_light(report: dict[str, Any], heavy: tuple[str, ...], what: str) -> None:
    assert report["code"] == 0, f"{what}: exit {report['code']}\n{report['stderr'][-3000:]}"
    loaded = sorted(set(heavy) & set(report["modules"]))
    assert not loaded, (f"{what} imported {', '.join(loaded)}; import it inside the function that uses it "
                        "(torch: `from moemerge._lazy import torch`)")


def _subcommands() -> list[str]:
    from moemerge.cli import _parser

    action = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(action.choices)  # type: ignore[attr-defined]


@pytest.mark.parametrize("args", [("--version",), ("--help",)] + [(c, "--help") for c in _subcommands()],
                         ids=lambda a: " ".join(a))
def test_version_and_help_import_no_heavy_library(args: tuple[str, ...]) -> None:
    report = _moemerge(*args)
    _assert_light(report, HELP_HEAVY, f"moemerge {' '.join(args)}")
    assert report["stdout"].strip()


@pytest.fixture(scope="module")
def fp8_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three headers-only DeepSeek-V3-layout checkpoints (block FP8 pairs, MoE experts), small."""
    root = tmp_path_factory.mktemp("headers")
    for name in ("base", "a", "b"):
        write_headers_only(root / name, layers=4, experts=8, shards=3)
    return root / "base", root / "a", root / "b"


@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "model_stock"])
def test_plan_reads_headers_without_torch(fp8_inputs: tuple[Path, Path, Path], tmp_path: Path, method: str) -> None:
    base, a, b = fp8_inputs
    params = {"linear": {"weight": 0.5}, "ties": {"weight": 0.5, "density": 0.4}, "slerp": {},
              "model_stock": {}}[method]
    models = [a] if method == "slerp" else [a, b]  # slerp: base and one model
    doc: dict[str, Any] = {"merge_method": method, "models": [{"model": str(m), "parameters": params} for m in models]}
    if method != "linear":
        doc["base_model"] = str(base)
    if method == "slerp":
        doc["parameters"] = {"t": 0.3}
    cfg = write_yaml(tmp_path / "merge.yml", doc)
    for extra in ((), ("--json",)):
        report = _moemerge("plan", cfg, *extra)
        _assert_light(report, HEAVY, f"moemerge plan ({method}) {' '.join(extra)}")
        assert method in report["stdout"]


def test_inspect_reads_headers_without_torch(fp8_inputs: tuple[Path, Path, Path]) -> None:
    _, a, _ = fp8_inputs
    table = _moemerge("inspect", a)
    _assert_light(table, HEAVY, "moemerge inspect")
    listed = _moemerge("inspect", "--json", a)
    _assert_light(listed, HEAVY, "moemerge inspect --json")
    rows = json.loads(listed["stdout"])
    assert len(rows) == json.loads((a / "model.safetensors.index.json").read_text())["weight_map"].__len__()
    assert f"{len(rows):,} tensors" in table["stdout"]


def test_verify_reads_the_output_without_torch(tmp_path: Path, run_cli: Any) -> None:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tensors = [{"w": torch.randn(8, 16, generator=gen).bfloat16(), "n": torch.randn(16, generator=gen)}
               for _ in range(2)]
    paths = [write_checkpoint(tmp_path / f"m{i}", t) for i, t in enumerate(tensors)]
    cfg = write_yaml(tmp_path / "merge.yml", {"merge_method": "linear", "models": [
        {"model": str(p), "parameters": {"weight": 1.0}} for p in paths]})
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 0, err
    report = _moemerge("verify", tmp_path / "out")
    _assert_light(report, HEAVY, "moemerge verify")
    assert "2 tensors match the manifest" in report["stdout"]


def test_planning_memory_grows_slowly_enough_for_deepseek_v3(tmp_path: Path) -> None:
    """Peak RSS of `plan` (ties, base + two inputs) at about 3k and 9k tensors, extrapolated
    to DeepSeek-V3's 91,991 tensors, stays under 300 MB (issue 15's target)."""
    points = []
    for layers in (4, 8):
        root = tmp_path / f"L{layers}"
        n = 0
        for name in ("base", "a", "b"):
            n = write_headers_only(root / name, layers=layers, shards=20)
        cfg = write_yaml(root / "ties.yml", {
            "merge_method": "ties", "base_model": str(root / "base"),
            "models": [{"model": str(root / m), "parameters": {"weight": 0.5, "density": 0.5}} for m in ("a", "b")]})
        report = _moemerge("plan", cfg)
        _assert_light(report, HEAVY, "moemerge plan")
        if report["maxrss_kb"] is None:
            pytest.skip("needs /proc/self/status (Linux) for the process's own peak RSS")
        points.append((n, report["maxrss_kb"] * 1024))
    (n0, rss0), (n1, rss1) = points
    per_tensor = (rss1 - rss0) / (n1 - n0)
    at_full = rss1 + per_tensor * (91_991 - n1)
    print(f"plan: {rss0 / 1e6:.0f} MB at {n0} tensors, {rss1 / 1e6:.0f} MB at {n1}; {at_full / 1e6:.0f} MB at 91,991")
    assert at_full <= 300e6, (f"plan peaks at {rss0 / 1e6:.0f} MB for {n0} tensors and {rss1 / 1e6:.0f} MB for "
                              f"{n1}: {per_tensor:,.0f} bytes per tensor, {at_full / 1e6:.0f} MB at 91,991")
