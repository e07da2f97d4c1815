"""Check `moemerge plan`'s time estimate (moemerge/planner/estimate.py) against measured runs.

Makes N synthetic fine-tunes (scripts/bench.py's input maker) at two sizes, measures this
disk's read and write rates on them (bench.py's floor: every input read once, an output of the
merge's size written with fsync), then for every method family merges them as a `moemerge`
subprocess (`--repeat` times, the fastest kept: the machine may be shared) and compares the
wall time with the plan's estimate at the measured rates. Prints a table: method, size, the
estimate's I/O, compute and total, the measured wall, their ratio, and the estimated and
measured CPU seconds of the run (with the CPU other processes used meanwhile: on a shared
machine the wall grows but the CPU seconds stay, so they are what the constants are set by).

`--quant` adds block-FP8 inputs (bench_quant.py's maker): linear over them written bf16 and
written FP8 again, which prices dequantizing and requantizing.

Example:
    python scripts/bench_estimate.py                                 # 3 x {128MB, 512MB}
    python scripts/bench_estimate.py --sizes 256MB,1GB --budget 256MB --methods ties,slerp --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moemerge

import bench  # noqa: E402
from moemerge.sizes import format_size, parse_size  # noqa: E402

__all__ = ["main"]

#: One or two methods of every cost family (planner/estimate.py FAMILIES).
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "sce", "slerp",
                   "nuslerp", "model_stock", "multislerp", "karcher", "arcee_fusion", "ramplus_tl")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=3, help="input checkpoints (default 3: a base and 2 fine-tunes)")
    p.add_argument("--sizes", default="128MB,512MB", help="bytes per input, comma-separated (default 128MB,512MB)")
    p.add_argument("--budget", default="256MB",
                   help="--memory-budget of the merges (default 256MB: the larger inputs' big tensors stream)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    p.add_argument("--family", default="dense", help="synthetic layout (default dense)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quant", action="store_true", help="also linear over block-FP8 inputs (bf16 and FP8 out)")
    p.add_argument("--repeat", type=int, default=2, help="runs per case, the fastest kept (default 2)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each floor and run (root only; slows other users)")
    p.add_argument("--wait-quiet", type=float, default=60,
                   help="before each run wait up to this many seconds for other processes to go idle (default 60)")
    p.add_argument("--dir", default=None, help="where inputs and outputs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the inputs for a later run with the same --dir")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def _floor(paths: list[Path], write_bytes: int, work: Path, cold: bool) -> tuple[float, float]:
    """(read, write) bytes per second of this disk, measured on the inputs (best of two)."""
    reads, writes = [], []
    for _ in range(2):
        if cold:
            bench.drop_caches()
        secs, nbytes = bench.floor_read(paths, True)
        reads.append(nbytes / secs)
        writes.append(write_bytes / bench.floor_write(work / "floor-write.bin", write_bytes))
    return max(reads), max(writes)


def _measure(cmd: list[str], out: Path, repeat: int, cold: bool, quiet: float) -> tuple[float, float, float]:
    """(wall s, CPU s, other processes' CPU s) of the fastest of `repeat` runs."""
    best: tuple[float, float, float] | None = None
    for _ in range(repeat):
        bench.wait_quiet(quiet)
        shutil.rmtree(out, ignore_errors=True)
        if cold:
            bench.drop_caches()
        wall, _, _, _, cpu, other = bench.run_case(cmd)
        shutil.rmtree(out, ignore_errors=True)
        if best is None or wall < best[0]:
            best = (wall, cpu, other)
    assert best is not None
    return best


Case = tuple[str, list[Path], list[str], dict[str, Any]]


def _cases(args: argparse.Namespace, work: Path, size: int, methods: list[str]) -> list[Case]:
    """(label, inputs, command, config) of every case at one size."""
    fields = dict(family=args.family, dtype="BF16", layers=args.layers, shard_size=1 << 30)
    paths, _, _ = bench.make_inputs(work / f"inputs-{size}", args.inputs, size, fields)
    out: list[Case] = []
    for m in methods:
        cmd, doc = bench._command(m, paths, work / "out", work, args.budget, dict(bench.DEFAULT_PARAMS))
        out.append((m, paths, cmd, doc))
    if args.quant:
        import json

        from bench_quant import make_fp8_inputs

        fp8, _, _ = make_fp8_inputs(work / f"fp8-{size}", args.inputs, size, args.layers, 4)
        doc = {"merge_method": "linear",
               "models": [{"model": str(p), "parameters": {"weight": 1.0 / len(fp8)}} for p in fp8]}
        cfg = work / "fp8.yml"
        cfg.write_text(json.dumps(doc))
        for q in ("none", "like-input"):
            cmd = [*bench._MOEMERGE, "run", str(cfg), str(work / "out"), "--memory-budget", args.budget,
                   "--no-progress", "--quantize", q]
            out.append((f"linear fp8->{'bf16' if q == 'none' else 'fp8'}", fp8, cmd, {**doc, "_quantize": q}))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from moemerge.api import plan

    sizes = [parse_size(s, what="--sizes") for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budget = parse_size(args.budget, what="--budget")
    made = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="moemerge-estimate-", dir="/tmp")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, ...]] = []
    try:
        for size in sizes:
            cases = _cases(args, work, size, methods)
            for label, paths, cmd, doc in cases:
                q = doc.pop("_quantize", None)
                p = plan({k: v for k, v in doc.items()}, memory_budget=budget, **({"quantize": q} if q else {}))
                read_rate, write_rate = _floor(paths, p.bytes_written, work, args.cold)
                est = p.estimate(disk_speed=read_rate, write_speed=write_rate)
                wall, cpu, other = _measure(cmd, work / "out", args.repeat, args.cold, args.wait_quiet)
                row = (label, format_size(size), est.family, f"{p.bytes_read / 1e9:.2f}", str(p.passes),
                       f"{est.io_s:.1f}", f"{est.compute_s:.1f}", f"{est.total_s:.1f}", f"{wall:.1f}",
                       f"{est.total_s / wall:.2f}", f"{est.cpu_s:.1f}", f"{cpu:.1f}", f"{est.cpu_s / cpu:.2f}",
                       f"{other:.1f}",
                       f"{read_rate / 1e9:.1f}/{write_rate / 1e9:.1f}")
                rows.append(row)
                print("  ".join(row), flush=True)
    finally:
        shutil.rmtree(work / "out", ignore_errors=True)
        if not args.keep:
            for d in work.glob("inputs-*"):
                shutil.rmtree(d, ignore_errors=True)
            for d in work.glob("fp8-*"):
                shutil.rmtree(d, ignore_errors=True)
            if made:
                shutil.rmtree(work, ignore_errors=True)
    head = ("method", "size/input", "family", "GB read", "passes", "est I/O s", "est compute s", "estimate s",
            "measured s", "est/measured", "est CPU s", "CPU s", "est/CPU", "other CPU s", "read/write GB/s")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print()
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\n{args.inputs} inputs, --memory-budget {args.budget}, {os.cpu_count()} cores, "
          f"{'cold' if args.cold else 'warm'} page cache; estimate at the measured read/write rates; "
          "CPU s: the merge process's user+system; other CPU s: other processes meanwhile (shared machine).")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([dict(zip(head, r)) for r in rows], indent=1))
    off = [r for r in rows if not 0.7 <= float(r[9]) <= 1.3]  # wall: the target
    for r in off:
        print(f"OUTSIDE 30%: {r[0]} at {r[1]}: estimate {r[7]} s, measured {r[8]} s")
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
