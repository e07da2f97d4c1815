"""`bench.py --quant`: merges of block-FP8 DeepSeek-style checkpoints against the disk's floor.

Makes N fine-tunes of one synthetic DeepSeek base in bf16 (twice the asked size) and converts
each to 128 x 128 block FP8 with `moemerge run --quantize fp8-block` (so an input of SIZE is
SIZE of FP8 codes and scales). Then runs linear and ties over them, writing bf16
(`--quantize none`) and FP8 again (`--quantize like-input`: dequantize on read, requantize
with fresh scales on write), each against its own floor: every input byte read once (cold)
plus an output of that case's size written once (bf16 out is about twice the FP8 bytes), each
the fastest of buffered and O_DIRECT transfers (`bench.best_floor`).

Example:
    python scripts/bench.py --quant --inputs 3 --size-per-input 2GB --budget 2GB
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from moemerge.sizes import format_size

__all__ = ["run_quant", "make_fp8_inputs"]

#: (method, --quantize) cases, in the order they run.
CASES = (("linear", "none"), ("linear", "like-input"), ("ties", "none"), ("ties", "like-input"))


def make_fp8_inputs(root: Path, n: int, size: int, layers: int, experts: int) -> tuple[list[Path], float, bool]:
    """N block-FP8 DeepSeek-style checkpoints of about `size` bytes each (reused when `root`
    holds the same spec)."""
    import bench  # the sibling script: its synthetic-input maker

    spec = {"fp8": True, "n": n, "size": size, "layers": layers, "experts": experts}
    spec_path = root / "bench-fp8-inputs.json"
    paths = [root / f"fp8_{i}" for i in range(n)]
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec and all(
            any(p.glob("*.safetensors")) for p in paths):
        return paths, 0.0, True
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    spec_path.unlink(missing_ok=True)
    bf16, _, _ = bench.make_inputs(root / "bf16", n, 2 * size, dict(family="deepseek", dtype="BF16", layers=layers,
                                                                    experts=experts, shard_size=1 << 30))
    for src, dst in zip(bf16, paths):
        shutil.rmtree(dst, ignore_errors=True)
        cfg = root / "convert.yml"
        cfg.write_text(json.dumps({"merge_method": "linear", "models": [{"model": str(src),
                                                                         "parameters": {"weight": 1.0}}]}))
        subprocess.run([sys.executable, "-m", "moemerge", "run", str(cfg), str(dst), "--quantize", "fp8-block",
                        "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(root / "bf16", ignore_errors=True)
    spec_path.write_text(json.dumps(spec))
    return paths, time.monotonic() - t0, False


def _doc(method: str, paths: list[Path]) -> dict[str, Any]:
    models: list[dict[str, Any]] = [{"model": str(p), "parameters": {"weight": 1.0 / len(paths)}} for p in paths]
    doc: dict[str, Any] = {"merge_method": method, "models": models}
    if method == "ties":
        doc["base_model"] = str(paths[0])
        doc["models"] = [{"model": str(paths[0])}] + models[1:]
        doc["parameters"] = {"density": 0.5}
    return doc


def run_quant(args: Any, work: Path, budget: int, child_env: dict[str, str]) -> int:
    """The `--quant` benchmark (see the module docstring); prints the tables, returns 0."""
    import bench
    import yaml

    from moemerge.api import plan
    from moemerge.sizes import parse_size

    size = parse_size(args.size_per_input, what="--size-per-input")
    paths, made_s, reused = make_fp8_inputs(work / "inputs" / "fp8", args.inputs, size, args.layers, args.experts)
    total_in = sum(f.stat().st_size for f in bench._weight_files(paths))
    print(f"inputs: {args.inputs} block-FP8 DeepSeek-style, {format_size(total_in)} "
          + ("reused" if reused else f"made in {made_s:.1f}s"), flush=True)
    cases = []
    for method, quant in CASES:
        doc = _doc(method, paths)
        cfg = work / f"q-{method}-{quant}.yml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        p = plan(doc, memory_budget=budget, quantize=quant)
        out = work / f"out-q-{method}-{quant}"
        cmd = [*bench._MOEMERGE, "run", str(cfg), str(out), "--memory-budget", args.budget, "--no-progress",
               "--quantize", quant]
        cases.append((method, quant, cmd, out, p))
    floors = {}
    for quant in ("none", "like-input"):
        nbytes = next(c[4].bytes_written for c in cases if c[1] == quant)
        read, write, how = bench.best_floor(paths, nbytes, work / "floor-write.bin")
        floors[quant] = read + write
        print(f"floor ({quant} out, {format_size(nbytes)} written): {floors[quant]:.2f}s "
              f"(read {read:.2f}s + write {write:.2f}s; fastest: {how})", flush=True)
    rows = []
    for method, quant, cmd, out, p in cases:
        shutil.rmtree(out, ignore_errors=True)
        bench.wait_quiet(args.wait_quiet)
        cold = bench.drop_caches()
        wall, rss, _, inner, cpu, other = bench.run_case(cmd, child_env)
        shutil.rmtree(out, ignore_errors=True)
        rows.append((method, quant, "cold" if cold else "warm", p.bytes_written / 1e9, wall, wall / floors[quant],
                     rss, cpu, other))
        print(f"  {method} -> {quant}: {wall:.2f}s = {wall / floors[quant]:.2f}x floor, peak RSS "
              f"{format_size(rss)}, CPU {cpu:.1f}s, other processes' CPU {other:.1f}s", flush=True)
    print()
    print("| method | output | cache | GB written | wall s | floor s | x floor | peak RSS | CPU s | other CPU s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, quant, cache, gbw, wall, x, rss, cpu, other in rows:
        out_name = "bf16 (`--quantize none`)" if quant == "none" else "FP8 (`like-input`)"
        print(f"| {method} | {out_name} | {cache} | {gbw:.2f} | {wall:.1f} | {floors[quant]:.1f} | {x:.2f} | "
              f"{format_size(rss)} | {cpu:.0f} | {other:.0f} |")
    for method, quant, _, _, _, x, *_ in rows:
        if method == "linear" and x > 1.3:
            print(f"MISSED TARGET: {method} -> {quant}: {x:.2f}x floor > 1.3")
    return 0
