"""`bench.py --suite full`: every row of issue 15's performance table in one run, one summary table.

Runs the benchmark scripts as subprocesses (each drops the page cache before each case when
running as root, waits for a quiet machine and reports the CPU other processes used), collects
their JSON results and prints one table: each case, what it measured, its target and whether
the target is met. The cases:

- ties and linear over 3 DeepSeek-style bf16 inputs (4 GB each), `--memory-budget 512MB`, cold;
  ties' target is 2x the floor when every tensor fits the budget, else 3x (`bench.py`);
- linear and sma over 4 x 2 GB bf16 (`bench.py`'s default);
- linear and ties over a 542M-parameter dense Llama (base + 3 fine-tunes), MergeKit 0.1.5 side by
  side when its venv is found (`--mergekit`);
- start-up, `plan` and `inspect` at DeepSeek-V3 scale (`bench_plan.py`);
- `plan`'s time estimate against the measured wall (`bench_estimate.py`);
- nightly `pma update` against a full `pma` of the window (`bench_pma.py`, SMA, N = 10).

`--scale F` multiplies every input size (0.25: a quick pass in a few minutes; targets are
stated for 1). Wall times on a shared machine are noisy: compare ratios from one run.

Example:
    python scripts/bench.py --suite full                       # the issue's sizes (~20-30 min)
    python scripts/bench.py --suite full --scale 0.25 --dir /tmp/suite --keep
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["run_suite"]

HERE = Path(__file__).resolve().parent
#: The 542M-parameter dense Llama of the MergeKit comparison: bytes per bf16 input.
ANCHOR_BYTES = 1_084_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One row of the summary: a measured case against its target."""

    case: str
    measured: str
    target: str
    met: bool | None  # None: not measured (a sub-benchmark failed or was skipped)


def _size(nbytes: float) -> str:
    return f"{max(1, round(nbytes / 1e6))}MB"


#: `--wait-quiet S` for the scripts that take it (bench.py, bench_estimate.py); set by `run_suite`.
WAIT_QUIET: list[str] = []


def _script(name: str, args: list[str], log: Path) -> int:
    """Run a sibling benchmark script, its output shown and kept in `log`; its exit code."""
    quiet = WAIT_QUIET if name in ("bench.py", "bench_estimate.py") else []
    cmd = [sys.executable, str(HERE / name), *args, *quiet]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def _merge_rows(rows: list[dict[str, Any]]) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """(floor s, moemerge rows by method) of a bench.py JSON."""
    floor = next((r["floor"] for r in rows if r["case"].startswith("floor =")), None)
    return floor, {r["method"]: r for r in rows if r.get("method") and r.get("tool") == "moemerge"}


def _ratio_line(case: str, row: dict[str, Any] | None, floor: float | None, limit: float) -> Line:
    if row is None or not floor:
        return Line(case=case, measured="not measured", target=f"<= {limit:g}x floor", met=None)
    x = row["wall"] / floor
    shared = " (shared machine)" if "(shared)" in row["case"] else ""
    return Line(case=case, measured=f"{x:.2f}x floor ({row['wall']:.1f} s / {floor:.1f} s, CPU {row['cpu']:.0f} s, "
                                    f"peak RSS {row['peak_rss'] / 1e6:.0f} MB){shared}",
                target=f"<= {limit:g}x floor", met=x <= limit)


def _largest_tensor_fits(paths: list[Path], budget: int) -> bool:
    """Whether every tensor of the inputs fits the budget (as the plan chunks them: whole)."""
    from moemerge.io.checkpoint import Checkpoint

    biggest = 0
    for p in paths:
        ck = Checkpoint.open(str(p))
        biggest = max(biggest, max(t.nbytes for t in ck.tensors.values()))
    return biggest * 4 <= budget  # three inputs and the output of one tensor in memory at once


def _deepseek(work: Path, scale: float, log: Callable[[str], Path]) -> list[Line]:
    size, budget = _size(4e9 * scale), "512MB"
    out = work / "deepseek.json"
    _script("bench.py", ["--inputs", "3", "--size-per-input", size, "--budget", budget, "--family", "deepseek",
                         "--methods", "ties,linear", "--mergekit", "none", "--dir", str(work / "deepseek"), "--keep",
                         "--json", str(out)], log("deepseek"))
    floor, by = _merge_rows(_rows(out))
    inputs = sorted((work / "deepseek" / "inputs").glob("model_*"))  # bench.make_inputs' names
    fits = _largest_tensor_fits(inputs, 512 << 20) if inputs else False
    return [
        _ratio_line(f"ties, 3 x {size} DeepSeek-style bf16, 512MB budget, cold"
                    + (" (every tensor fits)" if fits else " (tensors over the budget)"),
                    by.get("ties"), floor, 2.0 if fits else 3.0),
        _ratio_line(f"linear, same inputs", by.get("linear"), floor, 1.15),
    ]


def _default(work: Path, scale: float, log: Callable[[str], Path]) -> list[Line]:
    size = _size(2e9 * scale)
    out = work / "default.json"
    _script("bench.py", ["--inputs", "4", "--size-per-input", size, "--budget", "2GB", "--methods", "linear,sma",
                         "--mergekit", "none", "--dir", str(work / "default"), "--keep", "--json", str(out)],
            log("default"))
    floor, by = _merge_rows(_rows(out))
    return [_ratio_line(f"{m}, 4 x {size} bf16 (`bench.py`)", by.get(m), floor, 1.15) for m in ("linear", "sma")]


def _mergekit(work: Path, scale: float, mergekit: str | None, log: Callable[[str], Path]) -> list[Line]:
    size = _size(ANCHOR_BYTES * scale)
    out = work / "mergekit.json"
    _script("bench.py", ["--inputs", "4", "--size-per-input", size, "--budget", "2GB", "--family", "dense",
                         "--layers", "8", "--methods", "linear,ties", "--dir", str(work / "anchor"), "--keep",
                         "--json", str(out), *(["--mergekit", mergekit] if mergekit else [])], log("mergekit"))
    rows = _rows(out)
    lines = []
    for method, want in (("linear", 5.0), ("ties", 10.0)):
        ours = next((r for r in rows if r.get("method") == method and r.get("tool") == "moemerge"), None)
        theirs = next((r for r in rows if r.get("method") == method and r.get("tool") == "mergekit"), None)
        case = f"vs MergeKit 0.1.5, {method}, 542M-param Llama x {scale:g}, base + 3"
        if ours is None or theirs is None:
            lines.append(Line(case=case, measured="not measured (no MergeKit venv?)", target=f">= {want:g}x faster",
                              met=None))
            continue
        x = theirs["wall"] / ours["wall"]
        rss_ok = ours["peak_rss"] <= theirs["peak_rss"]
        lines.append(Line(case=case, measured=f"{x:.2f}x faster ({ours['wall']:.1f} s vs {theirs['wall']:.1f} s); peak RSS "
                                              f"{ours['peak_rss'] / 1e6:.0f} MB vs {theirs['peak_rss'] / 1e6:.0f} MB",
                          target=f">= {want:g}x faster, RSS <= MergeKit's", met=x >= want and rss_ok))
    return lines


def _plan(work: Path, log: Callable[[str], Path]) -> list[Line]:
    out = work / "plan.json"
    _script("bench_plan.py", ["--dir", str(work / "plan"), "--keep", "--json", str(out)], log("plan"))
    lines = []
    for r in _rows(out):
        mb = f", <= {r['max_mb']:g} MB" if r.get("max_mb") else ""
        lines.append(Line(case=f"`{r['case']}` (DeepSeek-V3 layout, 91,991 tensors)" if "plan" in r["case"]
                          or "inspect" in r["case"] else f"`moemerge {r['case']}`",
                          measured=f"{r['wall']:.2f} s, {r['peak_mb']:.0f} MB",
                          target=f"<= {r['max_seconds']:g} s{mb}",
                          met=r["wall"] <= r["max_seconds"] and (not r.get("max_mb") or r["peak_mb"] <= r["max_mb"])))
    return lines


def _estimate(work: Path, scale: float, log: Callable[[str], Path]) -> list[Line]:
    out = work / "estimate.json"
    _script("bench_estimate.py", ["--sizes", _size(512e6 * scale), "--budget", "512MB", "--cold", "--repeat", "1",
                                  "--dir", str(work / "estimate"), "--keep", "--json", str(out)], log("estimate"))
    rows = _rows(out)
    if not rows:
        return [Line(case="`plan`'s time estimate", measured="not measured", target="within 30%", met=None)]
    ratios = [float(r["est/measured"]) for r in rows]
    worst = max(rows, key=lambda r: abs(float(r["est/measured"]) - 1))
    return [Line(case=f"`plan`'s time estimate, {len(rows)} methods x {_size(512e6 * scale)}",
                 measured=f"estimate/measured {min(ratios):.2f}-{max(ratios):.2f} (worst: {worst['method']})",
                 target="within 30% (0.7-1.3)", met=all(0.7 <= x <= 1.3 for x in ratios))]


def _pma(work: Path, scale: float, log: Callable[[str], Path]) -> list[Line]:
    size = _size(256e6 * scale)
    path = log("pma")
    _script("bench_pma.py", ["--size", size, "--methods", "sma", "--repeat", "2", "--work", str(work / "pma"),
                             "--keep"], path)
    # the ratio table's row: | sma | full wall | update wall | ratio | ...
    m = re.search(r"^\| sma \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", path.read_text(), re.M)
    case = f"nightly `pma update` vs full `pma`, SMA N = 10, 11 x {size}"
    if not m:
        return [Line(case=case, measured="not measured", target="<= 0.5x", met=None)]
    full, upd, ratio = (float(g) for g in m.groups())
    return [Line(case=case, measured=f"{ratio:.2f}x ({upd:.1f} s vs {full:.1f} s)", target="<= 0.5x",
                 met=ratio <= 0.5)]


def _table(lines: list[Line]) -> str:
    out = ["| case | measured | target | met |", "|---|---|---|---|"]
    for ln in lines:
        met = "-" if ln.met is None else ("yes" if ln.met else "**no**")
        out.append(f"| {ln.case} | {ln.measured} | {ln.target} | {met} |")
    return "\n".join(out)


def run_suite(*, scale: float = 1.0, work_dir: str | None = None, keep: bool = False,
              mergekit: str | None = None, only: str | None = None, wait_quiet: float | None = None) -> int:
    """Run every case (or those named in `only`, comma-separated: deepseek, default, mergekit,
    plan, estimate, pma), print the summary table; 0 when every measured target is met.
    `wait_quiet`: the scripts' own --wait-quiet (None: theirs)."""
    WAIT_QUIET[:] = [] if wait_quiet is None else ["--wait-quiet", str(wait_quiet)]
    work = Path(work_dir or tempfile.mkdtemp(prefix="moemerge-suite-", dir="/tmp")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def log(name: str) -> Path:
        return logs / f"{name}.log"

    parts: dict[str, Callable[[], list[Line]]] = {
        "plan": lambda: _plan(work, log),
        "default": lambda: _default(work, scale, log),
        "deepseek": lambda: _deepseek(work, scale, log),
        "mergekit": lambda: _mergekit(work, scale, mergekit, log),
        "estimate": lambda: _estimate(work, scale, log),
        "pma": lambda: _pma(work, scale, log),
    }
    chosen = [p.strip() for p in only.split(",")] if only else list(parts)
    unknown = [p for p in chosen if p not in parts]
    if unknown:
        raise SystemExit(f"bench --suite: unknown part(s) {unknown}; choose from {sorted(parts)}")
    lines: list[Line] = []
    try:
        for name in chosen:
            lines += parts[name]()
    finally:
        print("\n## Issue 15 suite" + (f" (sizes x {scale:g})" if scale != 1 else "") + "\n")
        print(_table(lines))
        print(f"\nlogs of each part: {logs}")
        if not keep:
            import shutil

            for d in ("deepseek", "default", "anchor", "plan", "estimate", "pma"):
                shutil.rmtree(work / d, ignore_errors=True)
    return 0 if all(ln.met is not False for ln in lines) else 1
