"""Benchmark merges against the disk's floor: wall time vs. read-once + write-once, and peak RSS.

Makes N synthetic MoE checkpoints (fine-tunes of one base, Mixtral layout), measures the raw
floor on the same disk (every input byte read once with 64 MiB sequential reads, then an output
of the merge's size written with 64 MiB writes and fsync), then runs each method as a
`moemerge` subprocess and reports its wall time and peak RSS (the child's own VmHWM, printed
at exit; not `ru_maxrss`, which inherits this script's high-water mark at exec). The page cache is dropped before the floor and before every case when running
as root (`echo 3 > /proc/sys/vm/drop_caches`); the table says whether it was (cold) or not (warm).

Targets (issue): wall <= 1.3 x floor; peak RSS < budget + 400 MB.

Statistics methods (ties, dare_ties, slerp, model_stock, sce, ...) get the first input as
base_model and, unless `--params` says otherwise, density 0.5, select_topk 0.5 and t 0.5; each
is also reported as time per GB of input as a multiple of linear's. Where MergeKit is installed
(`--mergekit`, default: /tmp/mkvenv/bin/mergekit-yaml if present) every `run` method is also
merged by `mergekit-yaml` on the same inputs and YAML in the same run, and a side-by-side table
prints both wall times and both peak RSS. MergeKit 0.1.5 knows the dense Llama layout
(`--family dense`), not this package's per-expert Mixtral names.

Example:
    python scripts/bench.py                                  # 4 inputs x 2 GB bf16, budget 2GB
    python scripts/bench.py --inputs 3 --size-per-input 256MB --budget 256MB --methods linear,sma,ema
    python scripts/bench.py --inputs 3 --size-per-input 1GB --budget 1GB --family dense --layers 8 \
        --methods linear,ties,dare_ties,slerp,model_stock,sce      # + MergeKit side by side
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemerge.sizes import format_size, parse_size  # noqa: E402

__all__ = ["main"]

#: Bytes per read/write call of the floor measurement.
IO_BLOCK = 64 << 20
#: Methods that run through `moemerge pma --method X`; every other one through `moemerge run`.
PMA_METHODS = ("sma", "wma", "ema")
#: The spec file that lets `--keep` + a later run reuse the inputs it made.
SPEC_FILE = "bench-inputs.json"
#: Parameters of the statistics methods unless `--params` sets them (each method takes its own).
DEFAULT_PARAMS: dict[str, Any] = {"density": 0.5, "select_topk": 0.5, "t": 0.5}
#: Where the MergeKit venv of scripts/mergekit_golden.py puts `mergekit-yaml`.
MERGEKIT_DEFAULT = Path("/tmp/mkvenv/bin/mergekit-yaml")
#: MergeKit's flags: CPU, its lazy loader, no progress bars, tokenizer or model card (not merge work), seeded.
MERGEKIT_FLAGS = ("--lazy-unpickle", "--quiet", "--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0")
_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "f16": "F16", "fp16": "F16", "float16": "F16",
           "f32": "F32", "fp32": "F32", "float32": "F32"}


@dataclass(slots=True, kw_only=True)
class Row:
    """One line of the result table."""

    case: str
    cache: str
    gb_read: float
    wall: float
    gb_written: float = 0.0
    floor: float | None = None
    peak_rss: int | None = None
    budget: int | None = None
    inner: float | None = None
    """Seconds the merge reported itself (without interpreter start and imports)."""
    cpu: float | None = None
    """CPU seconds of the merge process (user + system)."""
    other_cpu: float | None = None
    """CPU seconds other processes used meanwhile: the machine was shared when this is large."""
    method: str | None = None
    """The merge method of a merge row (None for floor rows)."""
    tool: str = "moemerge"
    """Which program merged: moemerge or mergekit."""


# -- cache -----------------------------------------------------------------------------------


def drop_caches() -> bool:
    """sync, then drop the page cache; False when not allowed (not root, or a container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- a shared machine -----------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU seconds this machine's processes and kernel have run (all cores, from /proc/stat).

    Idle, iowait and steal (time the hypervisor gave to other guests) are excluded: steal is
    contention too, but from outside, and nothing here can wait it out.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, *, share: float = 0.1, window: float = 2.0) -> float:
    """Wait (up to `limit` s) until other processes use under `share` of the CPUs; return the wait.

    Other people's jobs on a small machine swamp the numbers (torch's OpenMP threads spin on
    barriers when cores are oversubscribed), so cases start on a quiet machine when possible.
    """
    t0 = time.monotonic()
    cores = os.cpu_count() or 1
    while True:
        b0 = busy_seconds()
        time.sleep(window)
        if (busy_seconds() - b0) / (window * cores) < share or time.monotonic() - t0 > limit:
            return time.monotonic() - t0


# -- inputs ----------------------------------------------------------------------------------


def _make_one(path: str, seed: int, base_seed: int, target: int, fields: dict[str, Any]) -> str:
    import torch

    torch.set_num_threads(1)  # one process per core instead
    from moemerge.synthetic import make_checkpoint

    make_checkpoint(path, seed=seed, base_seed=base_seed, target_bytes=target, overwrite=True, **fields)
    return path


def make_inputs(root: Path, n: int, size: int, fields: dict[str, Any]) -> tuple[list[Path], float, bool]:
    """N fine-tunes of one base (seeds as `make_family`); reused when `root` holds the same spec."""
    spec = {"n": n, "size": size, **fields}
    spec_path = root / SPEC_FILE
    paths = [root / f"model_{i}" for i in range(n)]
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec and all(
        any(p.glob("*.safetensors")) for p in paths
    ):
        return paths, 0.0, True
    root.mkdir(parents=True, exist_ok=True)
    spec_path.unlink(missing_ok=True)
    t0 = time.monotonic()
    workers = max(1, min(n, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futs = [pool.submit(_make_one, str(p), 1 + i, 0, size, fields) for i, p in enumerate(paths)]
        for f in futs:
            f.result()
    spec_path.write_text(json.dumps(spec))
    return paths, time.monotonic() - t0, False


def _weight_files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in sorted(p.glob("*.safetensors"))]


# -- floor -----------------------------------------------------------------------------------


def _read_file(path: Path, buf: Any, direct: bool = False) -> int:
    mv = memoryview(buf)
    total = 0
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        while True:
            n = os.preadv(fd, [mv], total)
            total += n
            if n < len(mv):
                return total
    finally:
        os.close(fd)


def _io_buffer(direct: bool) -> Any:
    """An IO_BLOCK buffer; page-aligned (an anonymous map) for O_DIRECT."""
    return mmap.mmap(-1, IO_BLOCK) if direct else bytearray(IO_BLOCK)


def floor_read(paths: list[Path], parallel: bool, direct: bool = False) -> tuple[float, int]:
    """Read every weight file once: one stream (file after file) or one stream per input;
    through the page cache, or (`direct`) around it with O_DIRECT, as moemerge reads."""
    t0 = time.monotonic()
    if not parallel:
        buf = _io_buffer(direct)
        total = sum(_read_file(f, buf, direct) for f in _weight_files(paths))
    else:
        def one_input(p: Path) -> int:
            buf = _io_buffer(direct)
            return sum(_read_file(f, buf, direct) for f in _weight_files([p]))

        with ThreadPoolExecutor(len(paths)) as pool:
            total = sum(pool.map(one_input, paths))
    return time.monotonic() - t0, total


def floor_write(path: Path, nbytes: int, direct: bool = False) -> float:
    """Write `nbytes` (non-zero data) with 64 MiB writes, then fsync; the file is removed.
    `direct`: with O_DIRECT (the last partial block buffered), as moemerge writes."""
    block = _io_buffer(True)
    block[:] = bytes(range(256)) * (IO_BLOCK // 256)
    mv = memoryview(block)
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    dfd = os.open(path, os.O_WRONLY | os.O_DIRECT) if direct else fd
    try:
        done = 0
        while done < nbytes:
            n = min(nbytes - done, IO_BLOCK)
            whole = n // 4096 * 4096 if direct else n
            if whole:
                done += os.pwrite(dfd, mv[:whole], done)
            if whole < n:
                done += os.pwrite(fd, mv[:n - whole], done)
        os.fsync(fd)
    finally:
        if dfd != fd:
            os.close(dfd)
        os.close(fd)
    took = time.monotonic() - t0
    mv.release()
    path.unlink()
    return took


def best_floor(paths: list[Path], write_bytes: int, scratch: Path) -> tuple[float, float, str]:
    """The fastest way this disk moves the bytes, measured now: (read s, write s, how), the
    read cold (page cache dropped first, where allowed) over one stream and over one per
    input, buffered and direct; the write of `write_bytes` buffered and direct."""
    reads = {}
    for direct in (False, True):
        for par in (False, True):
            drop_caches()
            reads[(direct, par)] = floor_read(paths, par, direct)[0]
    (rd, rp), read = min(reads.items(), key=lambda kv: kv[1])
    writes = {direct: floor_write(scratch, write_bytes, direct) for direct in (False, True)} if write_bytes else {False: 0.0}
    wd, write = min(writes.items(), key=lambda kv: kv[1])
    how = (f"read {'direct' if rd else 'buffered'}, {len(paths) if rp else 1} stream(s); "
           f"write {'direct' if wd else 'buffered'}")
    return read, write, how


# -- cases -----------------------------------------------------------------------------------


def _config(method: str, paths: list[Path], params: dict[str, Any]) -> dict[str, Any]:
    from moemerge.methods import get_method

    m = get_method(method)
    if m.max_inputs is not None:  # e.g. slerp: the base and one other model
        paths = paths[:m.max_inputs + (1 if m.base != "none" else 0)]
    weight = {"weight": 1.0 / len(paths)} if m.spec("weight") else {}
    models: list[dict[str, Any]] = [{"model": str(p), **({"parameters": dict(weight)} if weight else {})}
                                    for p in paths]
    doc: dict[str, Any] = {"merge_method": method, "models": models}
    if m.base != "none":  # the first input is the base; the others are merged against it
        doc["base_model"] = str(paths[0])
        models[0] = {"model": str(paths[0])}
    known = {k: v for k, v in params.items() if m.spec(k) is not None}  # --params serve every method
    if known:
        doc["parameters"] = known
    return doc


def _command(method: str, paths: list[Path], out: Path, work: Path, budget: str,
             params: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The moemerge command line for a case, and the equivalent config (to plan its bytes)."""
    import yaml

    from moemerge.api import pma_config

    common = ["--memory-budget", budget, "--no-progress"]
    if method in PMA_METHODS:
        doc, _ = pma_config([str(p) for p in paths], method=method)
        return [*_MOEMERGE, "pma", *map(str, paths), "-o", str(out),
                "--method", method, *common], doc
    doc = _config(method, paths, params)
    cfg = work / f"{method}.yml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return [*_MOEMERGE, "run", str(cfg), str(out), *common], doc


def find_mergekit(arg: str | None) -> Path | None:
    """`mergekit-yaml` from --mergekit (a path, or 'none'), else the default venv's if present."""
    if arg is not None and arg.lower() == "none":
        return None
    path = Path(arg) if arg else MERGEKIT_DEFAULT
    if not path.is_file():
        if arg:
            raise SystemExit(f"bench: --mergekit {arg}: no such file (give the venv's bin/mergekit-yaml, or 'none')")
        return None
    return path


def _mergekit_command(mergekit: Path, cfg: Path, out: Path) -> list[str]:
    """`mergekit-yaml CFG OUT` run by the venv's Python under the peak-RSS wrapper."""
    python = mergekit.parent / "python"
    return [str(python), "-c", _MERGEKIT_WRAPPER, str(cfg), str(out), *MERGEKIT_FLAGS]


#: `moemerge ARGS`, then the process's own peak RSS. Not ru_maxrss: after fork/vfork + exec
#: Linux carries the parent's high-water mark into the child's (this script's ~400 MB would
#: show up as the merge's); VmHWM is the child's own address space's.
_WRAPPER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})  # this checkout's moemerge
from moemerge.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("MOEMERGE_PEAK_RSS=" + next(ln.split()[1] for ln in f if ln.startswith("VmHWM:")), flush=True)
sys.exit(code)
"""
_MOEMERGE = [sys.executable, "-c", _WRAPPER]
#: `--methods stats`: linear (the single-pass reference) and the selection methods, whose
#: fused kernels (methods/_fused.py) the issue measures against the floor.
STATS_SUITE = ("linear", "ties", "dare_ties", "della", "sce", "breadcrumbs")
#: MergeKit's `mergekit-yaml` entry point, then the process's own peak RSS (at exit: click exits
#: through SystemExit).
_MERGEKIT_WRAPPER = """
import atexit, sys
def _peak():
    with open("/proc/self/status") as f:
        print("MOEMERGE_PEAK_RSS=" + next(ln.split()[1] for ln in f if ln.startswith("VmHWM:")), flush=True)
atexit.register(_peak)
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def run_case(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str, float | None, float, float]:
    """Run `cmd`; return wall s, the child's peak RSS (bytes), its output, the seconds it reported,
    its CPU s, and the CPU s other processes used meanwhile."""
    b0 = busy_seconds()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)  # CPU times of that child alone
    wall = time.monotonic() - t0
    cpu = usage.ru_utime + usage.ru_stime
    other = max(0.0, busy_seconds() - b0 - cpu)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    text = "".join(out)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[3:])} failed ({proc.returncode}):\n{text}")
    m = re.search(r" in ([0-9.]+)s", text)
    peak = re.search(r"^MOEMERGE_PEAK_RSS=(\d+)$", text, re.M)
    if peak is None:
        raise SystemExit(f"bench: {' '.join(cmd[3:])} did not report its peak RSS:\n{text}")
    return wall, int(peak.group(1)) * 1024, text, float(m.group(1)) if m else None, cpu, other


# -- report ----------------------------------------------------------------------------------


def _contended(r: Row, cores: int, limit: float) -> bool:
    """Other processes used more than `limit` of the machine's CPU during the measurement."""
    return bool(r.other_cpu and r.wall and r.other_cpu / (r.wall * cores) > limit)


def _table(rows: list[Row], floor: float) -> str:
    head = ("case", "cache", "GB read", "wall s", "GB/s", "x floor", "peak RSS", "budget", "RSS-budget",
            "merge s", "CPU s", "other CPU s")
    lines = [head]
    for r in rows:
        rate = r.gb_read / r.wall if r.gb_read and r.wall else (r.gb_written / r.wall if r.wall else 0)
        lines.append((
            r.case, r.cache, f"{r.gb_read:.2f}" if r.gb_read else "-", f"{r.wall:.2f}", f"{rate:.2f}",
            f"{r.wall / floor:.2f}" if r.floor is not None else "-",
            format_size(r.peak_rss) if r.peak_rss is not None else "-",
            format_size(r.budget) if r.budget is not None else "-",
            format_size(r.peak_rss - r.budget) if r.peak_rss is not None and r.budget is not None else "-",
            f"{r.inner:.2f}" if r.inner is not None else "-",
            f"{r.cpu:.1f}" if r.cpu is not None else "-",
            f"{r.other_cpu:.1f}" if r.other_cpu is not None else "-",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(line, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), sep, *map(fmt, lines[1:])])


def _input_bytes(doc: dict[str, Any]) -> int:
    """Bytes of the weight files of every model a config merges (base included, once each)."""
    models = {str(m["model"]) for m in doc.get("models", [])}
    if doc.get("base_model"):
        models.add(str(doc["base_model"]))
    return sum(f.stat().st_size for f in _weight_files([Path(m) for m in sorted(models)]))


def _per_gb(r: Row, gb: float) -> float | None:
    """Seconds per GB of input: the merge's own time when it reported one, else wall time."""
    secs = r.inner if r.inner is not None else r.wall
    return secs / gb if gb else None


def _side_by_side(rows: list[Row], input_gb: dict[str, float]) -> str:
    """method | moemerge s | x linear | peak RSS | mergekit s | x linear | mergekit peak RSS.

    x linear: time per GB of input (the models' weight files: slerp merges two of them) as a
    multiple of linear's (same tool, same run). moemerge s
    is the merge as moemerge reports it (wall in brackets: + interpreter start and imports);
    mergekit s is wall time (it reports no merge time of its own).
    """
    merges = [r for r in rows if r.method is not None and r.method not in PMA_METHODS]
    if not any(r.tool == "mergekit" for r in merges) and not any(r.method == "linear" for r in merges):
        return ""
    by = {(r.tool, r.method): r for r in merges}

    def ratio(r: Row | None) -> str:
        lin = by.get((r.tool, "linear")) if r is not None else None
        if r is None or lin is None or r.method is None:
            return "-"
        a, b = _per_gb(r, input_gb.get(r.method, 0.0)), _per_gb(lin, input_gb.get("linear", 0.0))
        return f"{a / b:.1f}x" if a and b else "-"

    head = ("method", "GB input", "moemerge s", "x linear", "peak RSS", "mergekit s", "x linear", "mergekit peak RSS",
            "mergekit/moemerge wall")
    lines = [head]
    for method in dict.fromkeys(r.method for r in merges):
        ours, mk = by.get(("moemerge", method)), by.get(("mergekit", method))
        lines.append((
            method + (" (shared)" if ours is not None and ours.case.endswith("(shared)") else ""),
            f"{input_gb.get(method, 0.0):.2f}",
            f"{ours.inner if ours.inner is not None else ours.wall:.1f} ({ours.wall:.1f})" if ours else "-",
            ratio(ours),
            format_size(ours.peak_rss) if ours and ours.peak_rss is not None else "-",
            f"{mk.wall:.1f}" if mk else "-", ratio(mk),
            format_size(mk.peak_rss) if mk and mk.peak_rss is not None else "-",
            f"{mk.wall / ours.wall:.1f}x" if mk and ours else "-",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=4, help="number of input checkpoints (default 4)")
    p.add_argument("--size-per-input", default="2GB", help="bytes per input checkpoint (default 2GB)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), f16 or f32")
    p.add_argument("--dir", default=None, help="where inputs and outputs go (default: a new temp dir)")
    p.add_argument("--budget", default="2GB", help="--memory-budget of the merges (default 2GB)")
    p.add_argument("--methods", default="linear,sma",
                   help="comma-separated; sma/wma/ema run as `moemerge pma`, others as `moemerge run`; "
                        "`stats` stands for linear and the selection methods "
                        f"({','.join(STATS_SUITE)}) (default linear,sma)")
    p.add_argument("--params", default="",
                   help="global parameters for `run` methods, e.g. density=0.5,lambda=1 (each method "
                        "gets those it takes)")
    p.add_argument("--family", default="mixtral", help="synthetic layout (default mixtral)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--input-shard-size", default="1GB", help="shard size of the inputs (default 1GB)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measurements per case; the fastest is reported (default 1)")
    p.add_argument("--retries", type=int, default=3,
                   help="extra measurements allowed when other processes used the CPU meanwhile (default 3)")
    p.add_argument("--max-other-cpu", type=float, default=0.1,
                   help="share of all cores other processes may use during a measurement before it "
                        "counts as shared and is retried (default 0.1)")
    p.add_argument("--keep", action="store_true",
                   help="keep the inputs (a later run with the same --dir and sizes reuses them)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the merge processes, e.g. OMP_NUM_THREADS=1 (repeatable)")
    p.add_argument("--mergekit", default=None, metavar="PATH",
                   help="MergeKit's mergekit-yaml (in its own venv) to run on the same inputs side by side; "
                        f"'none' to skip (default: {MERGEKIT_DEFAULT} if it exists)")
    p.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                   help="also run every case with this environment added, against the same floor (e.g. "
                        "MOEMERGE_NO_NUMBA=1: the torch path next to the compiled one); repeatable")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quant", action="store_true",
                   help="block-FP8 DeepSeek-style inputs instead: linear and ties, bf16 and like-input (FP8) "
                        "output, each against its floor (scripts/bench_quant.py)")
    p.add_argument("--suite", choices=["full"], default=None,
                   help="run every row of issue 15's table (scripts/bench_suite.py) and print one summary; "
                        "takes --scale, --only, --dir, --keep, --mergekit and --wait-quiet; other flags are ignored")
    p.add_argument("--scale", type=float, default=1.0, help="--suite: multiply every input size (default 1)")
    p.add_argument("--only", default=None,
                   help="--suite: comma-separated parts (deepseek, default, mergekit, plan, estimate, pma)")
    p.add_argument("--wait-quiet", type=float, default=300,
                   help="before each measurement wait up to this many seconds for other processes to "
                        "go idle (default 300; 0: do not wait)")
    return p


def _params(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = float(v) if v.strip().lstrip("-").replace(".", "", 1).isdigit() else v.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    from moemerge.errors import MoemergeError

    try:
        return _main(argv)
    except MoemergeError as e:
        raise SystemExit(f"bench: {e}") from None


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.suite:
        from bench_suite import run_suite

        return run_suite(scale=args.scale, work_dir=args.dir, keep=args.keep, mergekit=args.mergekit,
                         only=args.only, wait_quiet=args.wait_quiet)
    dtype = _DTYPES.get(args.dtype.lower())
    if dtype is None:
        raise SystemExit(f"bench: --dtype {args.dtype}: use bf16, f16 or f32")
    size = parse_size(args.size_per_input, what="--size-per-input")
    budget = parse_size(args.budget, what="--budget")
    methods = [m for part in args.methods.split(",") if part.strip()
               for m in (STATS_SUITE if part.strip() == "stats" else (part.strip(),))]
    params = {**DEFAULT_PARAMS, **_params(args.params)}
    mergekit = find_mergekit(args.mergekit)
    child_env = dict(kv.split("=", 1) for kv in args.env)
    made_dir = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="moemerge-bench-", dir="/tmp")).resolve()
    inputs_root = work / "inputs"
    fields = dict(family=args.family, dtype=dtype, layers=args.layers, experts=args.experts,
                  shard_size=parse_size(args.input_shard_size, what="--input-shard-size"))
    try:
        print(f"bench: {args.inputs} x {format_size(size)} {dtype} ({args.family}, {args.layers} layers, "
              f"{args.experts} experts) in {work}", flush=True)
        if args.quant:
            from bench_quant import run_quant

            return run_quant(args, work, budget, child_env)
        paths, made_s, reused = make_inputs(inputs_root, args.inputs, size, fields)
        total_in = sum(f.stat().st_size for f in _weight_files(paths))
        print(f"inputs: {format_size(total_in)} " + ("reused" if reused else f"made in {made_s:.1f}s "
              f"({total_in / made_s / 1e9:.2f} GB/s)"), flush=True)

        from moemerge.api import plan

        cases = []
        for method in methods:
            out = work / f"out-{method}"
            cmd, doc = _command(method, paths, out, work, args.budget, params)
            p = plan(doc, memory_budget=budget)
            cases.append((method, cmd, out, p.bytes_read, p.bytes_written, _input_bytes(doc)))
        write_bytes = max(c[4] for c in cases)
        input_gb = {c[0]: c[5] / 1e9 for c in cases}
        if mergekit is not None:
            print(f"mergekit: {mergekit} (same YAML and inputs, {' '.join(MERGEKIT_FLAGS)})", flush=True)

        rows: list[Row] = []
        cores = os.cpu_count() or 1

        def best_of(label: str, attempt: Any) -> Row:
            """Run `attempt()` -> Row `repeat` times (plus retries while the machine is shared);
            keep the fastest uncontended row, else the least contended one."""
            got: list[Row] = []
            for i in range(args.repeat + args.retries):
                clean = [r for r in got if not _contended(r, cores, args.max_other_cpu)]
                if len(clean) >= args.repeat:
                    break
                wait_quiet(args.wait_quiet)
                r = attempt()
                got.append(r)
                shared = _contended(r, cores, args.max_other_cpu)
                print(f"  {label}: {r.wall:.2f}s" + (f", peak RSS {format_size(r.peak_rss)}, CPU {r.cpu:.1f}s"
                      if r.peak_rss is not None else "") + f", other processes' CPU {r.other_cpu:.1f}s"
                      + (" (shared machine: retrying)" if shared and i + 1 < args.repeat + args.retries else ""),
                      flush=True)
            clean = [r for r in got if not _contended(r, cores, args.max_other_cpu)]
            if clean:
                return min(clean, key=lambda r: r.wall)
            r = min(got, key=lambda r: r.other_cpu or 0.0)
            r.case += " (shared)"
            return r

        def floor_row(case: str, fn: Any, *a: Any, cold_read: bool) -> Row:
            cold = drop_caches() if cold_read else False
            b0, c0 = busy_seconds(), time.process_time()
            secs, nbytes = fn(*a)
            other = max(0.0, busy_seconds() - b0 - (time.process_time() - c0))
            if cold_read:
                return Row(case=case, cache="cold" if cold else "warm", gb_read=nbytes / 1e9, wall=secs,
                           other_cpu=other)
            return Row(case=case, cache="-", gb_read=0, gb_written=nbytes / 1e9, wall=secs, other_cpu=other)

        # the floor is the fastest way to move the bytes: buffered and O_DIRECT (as moemerge
        # moves big ranges, io/direct.py), one stream and one per input
        read_rows = []
        for direct in (False, True):
            how = " direct" if direct else ""
            read_rows.append(best_of(f"floor read{how}, 1 stream", lambda direct=direct, how=how: floor_row(
                f"floor: read{how}, 1 stream", floor_read, paths, False, direct, cold_read=True)))
            read_rows.append(best_of(f"floor read{how}, {len(paths)} streams", lambda direct=direct, how=how: floor_row(
                f"floor: read{how}, {len(paths)} streams", floor_read, paths, True, direct, cold_read=True)))
        write_rows = [best_of(f"floor write{how}", lambda direct=direct, how=how: floor_row(
            f"floor: write{how}+fsync", lambda: (floor_write(work / "floor-write.bin", write_bytes, direct), write_bytes),
            cold_read=False)) for direct, how in ((False, ""), (True, " direct"))]
        rows += read_rows + write_rows
        read_best = min(read_rows, key=lambda r: r.wall)
        wr = min(write_rows, key=lambda r: r.wall)
        floor = read_best.wall + wr.wall
        rows.append(Row(case="floor = best read + write", cache=read_best.cache, gb_read=read_best.gb_read,
                        wall=floor, floor=floor))
        print(f"floor: read {read_best.wall:.2f}s + write {wr.wall:.2f}s = {floor:.2f}s", flush=True)

        # each case as given, then (--baseline-env) again with those variables: both against one floor
        variants = [(child_env, args.env)] + ([({**child_env, **dict(kv.split("=", 1) for kv in args.baseline_env)},
                                                args.env + args.baseline_env)] if args.baseline_env else [])
        for (method, cmd, out, b_read, b_written, _), (case_env, env_args) in (
                (c, v) for c in cases for v in variants):
            label = f"{method} ({'pma' if method in PMA_METHODS else 'run'})" + (
                f" [{' '.join(env_args)}]" if env_args else "")

            def attempt(cmd: list[str] = cmd, out: Path = out, label: str = label, tool: str = "moemerge",
                        warm: list[str] = [sys.executable, "-c", "import torch, moemerge.cli, moemerge.api"],
                        b_read: int = b_read, b_written: int = b_written, method: str = method,
                        case_env: dict[str, str] = case_env) -> Row:
                shutil.rmtree(out, ignore_errors=True)
                cold = drop_caches()
                subprocess.run(warm, check=True)  # imports come from the page cache, inputs do not
                wall, rss, _, inner, cpu, other = run_case(cmd, case_env)
                shutil.rmtree(out, ignore_errors=True)
                return Row(case=label, cache="cold" if cold else "warm", gb_read=b_read / 1e9,
                           gb_written=b_written / 1e9, wall=wall, floor=floor, peak_rss=rss, budget=budget,
                           inner=inner if tool == "moemerge" else None, cpu=cpu, other_cpu=other,
                           method=method, tool=tool)

            rows.append(best_of(label, attempt))
            if mergekit is not None and method not in PMA_METHODS:
                mk_out = work / f"mk-out-{method}"
                mk_label = f"{method} (mergekit)"
                rows.append(best_of(mk_label, lambda: attempt(
                    cmd=_mergekit_command(mergekit, work / f"{method}.yml", mk_out), out=mk_out, label=mk_label,
                    tool="mergekit", warm=[str(mergekit.parent / "python"), "-c", "import mergekit.merge"])))

        print()
        print(_table(rows, floor))
        print("\nwall: subprocess start to exit (interpreter and imports warm in the page cache; "
              "the inputs cold when cache=cold); merge s: what moemerge reported itself; other CPU s: "
              "CPU time other processes used meanwhile (a shared machine skews the numbers; "
              "'(shared)' marks a case that stayed above --max-other-cpu in every attempt). "
              "Targets: x floor <= 1.3, RSS-budget < 400 MB.")
        side = _side_by_side(rows, input_gb)
        if side:
            print("\n" + side)
        for r in rows:
            if r.peak_rss is None or r.tool != "moemerge":
                continue
            missed = ([f"{r.wall / floor:.2f}x floor > 1.3"] if r.wall / floor > 1.3 else []) + (
                [f"RSS-budget {format_size(r.peak_rss - budget)} > 400 MB"] if r.peak_rss - budget > 400e6 else [])
            if missed:
                print(f"MISSED TARGET: {r.case}: {'; '.join(missed)}")
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    finally:
        for c in (work / f"{pre}out-{m}" for m in methods for pre in ("", "mk-")):
            shutil.rmtree(c, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(inputs_root, ignore_errors=True)
            for f in work.glob("*.yml"):
                f.unlink()
            if made_dir:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
