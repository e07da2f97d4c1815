"""Nightly PMA cost: a full window recompute versus an incremental `pma update`.

Makes N + 1 synthetic snapshots of one training run (`step-00001000` ...; Mixtral layout,
fine-tunes of one base so that they look like neighbouring checkpoints), then per method runs
as `moemerge` subprocesses:

- `pma` over the last N of the first N snapshots (the non-incremental average, fp32),
- `pma update` with no state (builds the fp64 state from the same window: a full recompute),
- `pma update` after snapshot N + 1 appears (the nightly incremental update),

and reports wall time (process start to exit) and the time the command reports itself, bytes
read and written by the process (its `/proc/self/io` rchar and wchar, counted from just before
the command, after imports) and its peak RSS. The page cache is
dropped before each case when running as root, so the reads come from the disk.

`--repeat R` runs the full window and the nightly update R times each, alternating (each
nightly run starts from a copy of the built state), and prints a second table: per method the
median wall of each, the update's ratio to the full recompute (median of the per-pair ratios:
on a shared machine compare ratios from the same run, not absolute times), the same for the
time the commands report ("merge s", start-up excluded), bytes read and written, and peak RSS
against `--budget`.

Example:
    python scripts/bench_pma.py                                   # N = 10, 11 x 256 MB bf16
    python scripts/bench_pma.py --size 512MB --methods sma --keep --work /tmp/pma-bench
    python scripts/bench_pma.py --size 64MB --methods sma --repeat 3       # the ratio table
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import drop_caches  # noqa: E402

from moemerge.sizes import format_size, parse_size  # noqa: E402

__all__ = ["main"]

#: `moemerge ARGS` with the process's own I/O counted from after the imports, then its peak RSS.
_WRAPPER = """
import sys
import torch, zarr, moemerge.api, moemerge.pma.update  # imports are not the merge's I/O
from moemerge.cli import main
def io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (ln.split(": ") for ln in f)}
before = io()
code = main(sys.argv[1:])
after = io()
print("BENCH_RCHAR=%d BENCH_WCHAR=%d" % (after["rchar"] - before["rchar"], after["wchar"] - before["wchar"]))
with open("/proc/self/status") as f:
    print("BENCH_PEAK_RSS=" + next(ln.split()[1] for ln in f if ln.startswith("VmHWM:")), flush=True)
sys.exit(code)
"""


def _make(path: str, seed: int, size: int, dtype: str) -> str:
    import torch

    torch.set_num_threads(1)
    from moemerge.synthetic import make_checkpoint

    make_checkpoint(path, seed=seed, base_seed=0, target_bytes=size, dtype=dtype, overwrite=True,
                    delta_scale=0.01)
    return path


def make_snapshots(ckpt: Path, n: int, size: int, dtype: str) -> list[Path]:
    """n snapshots `step-00001000` .. (reused when already there)."""
    paths = [ckpt / f"step-{1000 * (i + 1):08d}" for i in range(n)]
    todo = [p for p in paths if not (p / "config.json").exists()]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_make, [str(p) for p in todo], [paths.index(p) + 1 for p in todo],
                      [size] * len(todo), [dtype] * len(todo)))
    return paths


def floor(reads: list[Path], write_bytes: int, scratch: Path) -> float:
    """Seconds to read every file under `reads` and write `write_bytes` (page cache, no fsync,
    as the commands write), cold like the cases: the I/O a command cannot go below."""
    drop_caches()
    buf = bytearray(16 << 20)
    t0 = time.monotonic()
    for root in reads:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(scratch, "wb", buffering=0) as fh:
        left = write_bytes
        while left > 0:
            left -= fh.write(memoryview(buf)[:min(left, len(buf))])
    took = time.monotonic() - t0
    scratch.unlink()
    return took


def _size_of(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def run_case(args: list[str]) -> dict[str, float]:
    """Run `moemerge ARGS`; wall s, bytes read/written, peak RSS, and its own report line."""
    cold = drop_caches()
    if cold:  # re-read Python, torch and moemerge: the case times the update, not imports
        subprocess.run([sys.executable, "-c", "import torch, zarr, moemerge.api, moemerge.pma.update"], check=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True)
    wall = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"bench_pma: moemerge {' '.join(args)} failed:\n{text}")
    io = re.search(r"BENCH_RCHAR=(\d+) BENCH_WCHAR=(\d+)", text)
    rss = re.search(r"BENCH_PEAK_RSS=(\d+)", text)
    assert io and rss, text
    inner = re.search(r" in ([0-9.]+)s", text)
    return {"wall": wall, "inner": float(inner.group(1)) if inner else float("nan"),
            "read": int(io.group(1)), "written": int(io.group(2)),
            "rss": int(rss.group(1)) * 1024, "cold": float(cold), "text": text}  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--last", type=int, default=10, help="window N (default 10, the paper's)")
    ap.add_argument("--size", default="256MB", help="bytes per snapshot (default 256MB)")
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    ap.add_argument("--budget", default="1GB", help="--memory-budget of every case (default 1GB)")
    ap.add_argument("--methods", default="sma,wma,ema")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the snapshots for the next run")
    ap.add_argument("--repeat", type=int, default=1, help="full / nightly pairs per method (default 1)")
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="moemerge-bench-pma-"))
    work.mkdir(parents=True, exist_ok=True)
    size = parse_size(a.size, what="--size")
    n = a.last
    try:
        ckpt = work / "ckpt"
        t0 = time.monotonic()
        snaps = make_snapshots(ckpt, n + 1, size, a.dtype)
        real = sum(f.stat().st_size for f in snaps[0].glob("*.safetensors"))
        print(f"{n + 1} snapshots of {format_size(real)} {a.dtype} in {time.monotonic() - t0:.0f}s; "
              f"window N = {n}; budget {a.budget}; {os.cpu_count()} cores", flush=True)
        newest = snaps.pop()
        hidden = ckpt.parent / "not-yet"  # the night's new snapshot appears only for the update
        hidden.mkdir(exist_ok=True)
        shutil.move(str(newest), hidden / newest.name)
        pattern = str(ckpt / "step-*")
        common = ["--memory-budget", a.budget, "--no-progress"]
        rows = []
        pairs: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}
        for method in a.methods.split(","):
            state, out = work / f"state-{method}", work / f"out-{method}"
            for p in (state, out, work / "full"):
                shutil.rmtree(p, ignore_errors=True)
            full = run_case(["pma", pattern, "-o", str(work / "full"), "--method", method, "--last", str(n),
                             "--overwrite", *common])
            build = run_case(["pma", "update", str(state), pattern, "-o", str(out), "--method", method,
                              "--last", str(n), *common])
            built = work / f"state-{method}.built"
            shutil.rmtree(built, ignore_errors=True)
            shutil.copytree(state, built)
            pairs[method] = []
            for i in range(a.repeat):
                if i:  # the same night again: from the built state, against a fresh full run
                    full_i = run_case(["pma", pattern, "-o", str(work / "full"), "--method", method, "--last",
                                       str(n), "--overwrite", *common])
                    shutil.rmtree(state)
                    shutil.copytree(built, state)
                shutil.move(str(hidden / newest.name), newest)
                try:
                    inc_i = run_case(["pma", "update", str(state), pattern, "-o", str(out), *common])
                finally:
                    shutil.move(str(newest), hidden / newest.name)
                pairs[method].append((full if i == 0 else full_i, inc_i))
                # the floors of the same run: the full recompute reads the window and writes the
                # output; the update reads the new and the leaving snapshot and the state, and
                # writes the state and the output
                out_bytes = _size_of(work / "full")
                window = sorted(ckpt.glob("step-*"))[-n:]
                full_i_floor = floor(window, out_bytes, work / "floor.bin")
                shutil.move(str(hidden / newest.name), newest)
                try:
                    inc_floor = floor([newest, window[0], built], _size_of(state) + out_bytes, work / "floor.bin")
                finally:
                    shutil.move(str(newest), hidden / newest.name)
                pairs[method][-1][0]["floor"], pairs[method][-1][1]["floor"] = full_i_floor, inc_floor
                print(f"  {method} pair {i + 1}: full {pairs[method][-1][0]['wall']:.1f}s, "
                      f"nightly {inc_i['wall']:.1f}s", flush=True)
            inc = pairs[method][0][1]
            shutil.rmtree(built, ignore_errors=True)
            state_bytes = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
            for case, r in ((f"{method}: full window (`pma`, N={n})", full),
                            (f"{method}: first `pma update` (builds the state)", build),
                            (f"{method}: nightly `pma update` (+1 snapshot)", inc)):
                rows.append((case, r, state_bytes))
                print(f"  {case}: {r['wall']:.1f}s read {format_size(r['read'])}", flush=True)
        print()
        print("| case | read | written | wall s | merge s | peak RSS | cache |")
        print("|---|---|---|---|---|---|---|")
        for case, r, _ in rows:
            print(f"| {case} | {format_size(r['read'])} | {format_size(r['written'])} | {r['wall']:.1f} | "
                  f"{r['inner']:.1f} | "
                  f"{format_size(r['rss'])} | {'cold' if r['cold'] else 'warm'} |")
        budget = parse_size(a.budget, what="--budget")
        print()
        print(f"nightly `pma update` against a full `pma` of the window ({a.repeat} pair(s) each; "
              f"medians; ratio = update / full, per pair)")
        print()
        print("| method | full wall s | update wall s | ratio | full merge s | update merge s | merge ratio | "
              "floor full / update s | merge / floor full, update | "
              "full read / written | update read / written | peak RSS full / update (budget) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for method, ps in pairs.items():
            med = statistics.median
            fw, uw = med(f["wall"] for f, _ in ps), med(u["wall"] for _, u in ps)
            ratio = med(u["wall"] / f["wall"] for f, u in ps)
            fm, um = med(f["inner"] for f, _ in ps), med(u["inner"] for _, u in ps)
            mratio = med(u["inner"] / f["inner"] for f, u in ps)
            f0, u0 = ps[0]
            ff, uf = med(f["floor"] for f, _ in ps), med(u["floor"] for _, u in ps)
            fx, ux = med(f["inner"] / f["floor"] for f, _ in ps), med(u["inner"] / u["floor"] for _, u in ps)
            print(f"| {method} | {fw:.1f} | {uw:.1f} | {ratio:.2f} | {fm:.1f} | {um:.1f} | {mratio:.2f} | "
                  f"{ff:.1f} / {uf:.1f} | {fx:.2f}, {ux:.2f} | "
                  f"{format_size(f0['read'])} / {format_size(f0['written'])} | "
                  f"{format_size(u0['read'])} / {format_size(u0['written'])} | "
                  f"{format_size(max(f['rss'] for f, _ in ps))} / {format_size(max(u['rss'] for _, u in ps))} "
                  f"({format_size(budget)}) |")
        print()
        print("state size on disk: " + ", ".join(
            f"{m}: {format_size(sum(f.stat().st_size for f in (work / f'state-{m}').rglob('*') if f.is_file()))}"
            for m in a.methods.split(",")))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            hidden = work / "not-yet"
            for p in hidden.glob("step-*") if hidden.exists() else []:
                shutil.move(str(p), work / "ckpt" / p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
