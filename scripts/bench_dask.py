"""Scaling benchmark: the same merge with the local executor, then on Dask with 1 and 2 workers.

Makes (or reuses, with --dir and --keep) N synthetic Mixtral-style inputs, measures the raw read
floor in the same run, then runs `moemerge run` for each method and executor as a subprocess
and prints one table: wall time, as a multiple of the floor and of the local executor's, the
task count and input bytes per task, and the peak RSS of the client and of the largest worker
(sampled from the process tree every 50 ms). The page cache is dropped before each case when
running as root.

Example:
    python scripts/bench_dask.py --inputs 3 --size-per-input 1GB --methods linear,ties
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import _config, _weight_files, drop_caches, floor_read, make_inputs, wait_quiet  # noqa: E402

from moemerge.sizes import format_size, parse_size  # noqa: E402

__all__ = ["main"]


def _run(cmd: list[str]) -> tuple[float, int, int]:
    """Run `cmd`; return (wall s, peak RSS of the top process, peak RSS of any one descendant)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    top = psutil.Process(proc.pid)
    peak_top = peak_worker = 0
    while proc.poll() is None:
        try:
            peak_top = max(peak_top, top.memory_info().rss)
            for child in top.children(recursive=True):
                try:
                    peak_worker = max(peak_worker, child.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.monotonic() - t0
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"bench_dask: {' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return wall, peak_top, peak_worker


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=3)
    ap.add_argument("--size-per-input", default="1GB")
    ap.add_argument("--budget", default="512MB", help="--memory-budget (per worker on Dask)")
    ap.add_argument("--unit-size", default=None, help="--unit-size of the Dask runs (default: moemerge's)")
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--workers", default="1,2", help="worker counts to run on Dask")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="moemerge-bench-dask-", dir="/tmp")).resolve()
    size = parse_size(args.size_per_input, what="--size-per-input")
    fields: dict[str, Any] = dict(family="mixtral", dtype="BF16", layers=4, experts=8, shard_size=1 << 30)
    try:
        paths, _, _ = make_inputs(work / "inputs", args.inputs, size, fields)
        cold = drop_caches()
        floor_s, nbytes = floor_read(paths, parallel=True)
        print(f"inputs: {args.inputs} x {format_size(size)}; read floor {floor_s:.2f}s "
              f"({nbytes / floor_s / 1e9:.2f} GB/s, {'cold' if cold else 'warm'} cache)", flush=True)
        from moemerge.api import plan
        from moemerge.engine.graph import build_graph

        rows = []
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            import yaml

            doc = _config(method, paths, {})
            cfg = work / f"{method}.yml"
            cfg.write_text(yaml.safe_dump(doc))
            p = plan(doc, memory_budget=args.budget, **({"unit_size": args.unit_size} if args.unit_size else {}))
            tasks = build_graph(p)
            local_wall = None
            for workers in [0, *[int(w) for w in args.workers.split(",")]]:
                out = work / f"out-{method}-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = ["moemerge", "run", str(cfg), str(out), "--memory-budget", args.budget, "--no-progress"]
                if workers:
                    cmd += ["--workers", str(workers)] + (["--unit-size", args.unit_size] if args.unit_size else [])
                wait_quiet(120)
                drop_caches()
                wall, peak_top, peak_worker = _run(cmd)
                local_wall = local_wall or wall
                label = "local" if not workers else f"dask, {workers} worker(s)"
                rows.append((method, label, wall, wall / floor_s, wall / local_wall,
                             len(tasks) if workers else 0, sum(t.in_bytes for t in tasks) // max(1, len(tasks)),
                             peak_top, peak_worker))
                print(f"  {method} {label}: {wall:.2f}s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        print()
        print("| method | executor | wall s | x read floor | x local | tasks | input per task | peak RSS client | peak RSS worker |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m, label, wall, xf, xl, nt, per, pt, pw in rows:
            print(f"| {m} | {label} | {wall:.2f} | {xf:.2f} | {xl:.2f} | {nt or '-'} | "
                  f"{format_size(per) if nt else '-'} | {format_size(pt)} | {format_size(pw) if nt else '-'} |")
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
