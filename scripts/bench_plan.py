"""Benchmark start-up and planning at DeepSeek-V3 scale: `--version`, `--help`, `plan`,
`inspect` and `inspect --json` against issue 15's targets.

Writes three headers-only checkpoints in DeepSeek-V3's published layout (163 shards, 91,991
tensors, block FP8 with `weight_scale_inv` pairs; `moemerge.synthetic_headers`: real headers,
data regions left as holes, a few MB of disk each), then runs each case as a `moemerge`
subprocess and reports its wall time, its CPU time and its own peak RSS (VmHWM at exit, not
`ru_maxrss`, which keeps this script's high-water mark across exec). Each case runs `--repeat`
times; the table shows the fastest wall and the largest peak. Output goes to /dev/null (a
terminal would time the terminal).

Targets (issue 15): --version / --help <= 0.3 s; plan and inspect <= 5 s and <= 300 MB.

Example:
    python scripts/bench_plan.py                      # in a temporary directory, removed after
    python scripts/bench_plan.py --dir /data/ds3 --keep --repeat 3
    python scripts/bench_plan.py --layers 8           # a smaller layout (9,417 tensors)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemerge.synthetic_headers import write_headers_only  # noqa: E402

__all__ = ["main"]

#: `python -m moemerge ARGS`, then the process's own peak RSS in kB on stderr (at exit).
_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        os.write(2, ("\\nBENCH_PEAK_KB=" + next(ln.split()[1] for ln in f if ln.startswith("VmHWM:")) + "\\n").encode())
atexit.register(_peak)
sys.argv = ["moemerge", *sys.argv[1:]]
runpy.run_module("moemerge", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One measured command and its targets."""

    name: str
    args: list[str]
    max_seconds: float
    max_mb: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    case: Case
    wall: float
    cpu: float
    peak_mb: float


def _run(case: Case, repeat: int, root: Path) -> Result:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    walls, cpus, peaks = [], [], []
    for _ in range(repeat):
        with open(os.devnull, "w") as sink:
            t0 = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *case.args], stdout=sink,
                                    stderr=subprocess.PIPE, text=True, env=env)
            err = proc.stderr.read() if proc.stderr else ""
            _, status, usage = os.wait4(proc.pid, 0)
            walls.append(time.monotonic() - t0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"bench_plan: moemerge {' '.join(case.args)} failed ({code}):\n{err[-3000:]}")
        kb = [ln for ln in err.splitlines() if ln.startswith("BENCH_PEAK_KB=")]
        peaks.append(int(kb[-1].split("=")[1]) / 1024 if kb else float("nan"))
        cpus.append(usage.ru_utime + usage.ru_stime)
    best = walls.index(min(walls))
    return Result(case=case, wall=walls[best], cpu=cpus[best], peak_mb=max(peaks))


def _table(results: list[Result]) -> str:
    rows = [("case", "wall s", "cpu s", "peak MB", "target", "ok")]
    for r in results:
        target = f"<= {r.case.max_seconds:g} s" + (f", <= {r.case.max_mb:g} MB" if r.case.max_mb else "")
        ok = r.wall <= r.case.max_seconds and (r.case.max_mb is None or r.peak_mb <= r.case.max_mb)
        rows.append((r.case.name, f"{r.wall:.2f}", f"{r.cpu:.2f}", f"{r.peak_mb:.0f}", target, "yes" if ok else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (and reuse them when present)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default DeepSeek-V3's 61)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case (fastest wall, largest peak)")
    p.add_argument("--distinct-headers", action="store_true",
                   help="give each input its own header metadata, so no two shard headers are byte-identical "
                        "(default: identical, as fine-tunes saved alike are; their records are then shared)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        t0 = time.monotonic()
        n = 0
        for name in ("base", "a", "b"):
            d = work / name
            if not (args.keep and (d / "config.json").exists()):
                if d.exists():
                    shutil.rmtree(d)
                n = write_headers_only(d, layers=args.layers,
                                       metadata={"input": name} if args.distinct_headers else None)
            else:
                import json

                n = len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
        shards = len(list((work / "a").glob("*.safetensors")))
        print(f"3 checkpoints of {n:,} tensors in {shards} shards (headers only"
              f"{', each input its own' if args.distinct_headers else ', identical across inputs'}) in "
              f"{time.monotonic() - t0:.1f}s: {work}")
        linear = work / "linear.yml"
        linear.write_text(f"merge_method: linear\nmodels:\n  - model: {work / 'a'}\n    parameters: {{weight: 0.5}}\n"
                          f"  - model: {work / 'b'}\n    parameters: {{weight: 0.5}}\n")
        ties = work / "ties.yml"
        ties.write_text(f"merge_method: ties\nbase_model: {work / 'base'}\nmodels:\n"
                        + "".join(f"  - model: {work / m}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                                  for m in ("a", "b")))
        cases = [
            Case(name="--version", args=["--version"], max_seconds=0.3),
            Case(name="--help", args=["--help"], max_seconds=0.3),
            Case(name="run --help", args=["run", "--help"], max_seconds=0.3),
            Case(name="plan, linear, 2 inputs", args=["plan", str(linear)], max_seconds=5, max_mb=300),
            Case(name="plan, ties, base + 2 inputs", args=["plan", str(ties)], max_seconds=5, max_mb=300),
            Case(name="plan --json, ties", args=["plan", "--json", str(ties)], max_seconds=5, max_mb=300),
            Case(name="inspect", args=["inspect", str(work / "a")], max_seconds=5, max_mb=300),
            Case(name="inspect --json", args=["inspect", "--json", str(work / "a")], max_seconds=5, max_mb=300),
        ]
        results = [_run(c, max(1, args.repeat), root) for c in cases]
        print(_table(results))
        if args.json:
            import json

            args.json.write_text(json.dumps([{"case": r.case.name, "wall": r.wall, "cpu": r.cpu, "peak_mb": r.peak_mb,
                                              "max_seconds": r.case.max_seconds, "max_mb": r.case.max_mb}
                                             for r in results], indent=1))
        return 0 if all(r.wall <= r.case.max_seconds and (r.case.max_mb is None or r.peak_mb <= r.case.max_mb)
                        for r in results) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
