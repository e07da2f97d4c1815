"""A plan's wall-time estimate: I/O (bytes read, every statistics pass's re-read included, and
bytes written, at a disk rate) against compute (measured CPU cost per element per input per
pass of each method family, over the threads the engine computes on), plus start-up.

The engine (engine/pipeline.py) reads the next chunk on prefetch threads and writes the last
one on a writer thread while the calling thread computes, so a run takes about the longer of
the two, not their sum: wall ~ start-up + max(I/O, compute). The constants were measured with
scripts/bench_estimate.py on a 2-core x86 cloud machine (README "Benchmarks"); compute scales
with the cores the method uses (elementwise methods compute on one thread, the others on all,
at `PARALLEL_EFFICIENCY` per extra core: measured on 2 cores, assumed beyond).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moemerge.planner.plan import Plan, TensorPlan

__all__ = ["DEFAULT_DISK_SPEED", "Costs", "FAMILIES", "METHOD_COSTS", "Estimate", "estimate", "family_of"]

#: Bytes per second read and written when the user gives no `--disk-speed`: what sequential
#: 64 MiB reads reached on a plain cloud disk here (scripts/bench.py's floor); a guide only.
DEFAULT_DISK_SPEED = 1e9
#: Seconds from `moemerge run` to the first read: interpreter, torch, headers and the plan
#: (measured on small inputs, 2026-12-02: a whole linear merge of three 8 KB checkpoints took
#: 1.07 s wall, 1.0 s CPU; a 92k-tensor plan adds a few seconds).
STARTUP_S = 1.1
#: CPU seconds of that start-up (the rest is waiting on files).
STARTUP_CPU_S = 1.0
#: Loading numba's cached kernels adds this much (wall, CPU) when the run uses them: the fused
#: selection kernels (selection, sce; methods/_fused.py) and FP8 dequantizing (io/quant).
NUMBA_STARTUP_S = (0.4, 0.4)
#: Share of each core past the first that a parallel method's compute gains: torch's and
#: numba's threads reached 1.75 cores of 2 here (the read, write and hash threads take the rest).
PARALLEL_EFFICIENCY = 0.75


@dataclass(frozen=True, slots=True, kw_only=True)
class Costs:
    """CPU nanoseconds of a method, per element of one input (the base counts as one), on
    one core of the reference machine. Elementwise methods compute on one thread (the engine
    runs them single-threaded: they are memory-bound); the others on every core (torch
    threads, numba's parallel kernels)."""

    apply_ns: float
    """The merge itself (conversion to float32 included)."""
    pass_ns: float = 0.0
    """Each statistics pass (histograms, dot products), on top of the apply."""
    stream_ns: float = 0.0
    """Further cost of each pass over a tensor streamed in several chunks: a tensor read once
    keeps its inputs converted for every pass, a streamed one converts them on every read."""


#: Method family -> costs, from the CPU seconds of scripts/bench_estimate.py runs (2 cores,
#: bf16 inputs, float32 compute; README "Benchmarks"). Families group methods whose kernels
#: cost alike per element; `METHOD_COSTS` holds the members measured clearly apart.
FAMILIES: dict[str, Costs] = {
    "elementwise": Costs(apply_ns=1.5),
    "selection": Costs(apply_ns=4.8, pass_ns=0.3),  # the fused numba kernels (methods/_fused.py)
    "sce": Costs(apply_ns=8.5, pass_ns=0.3),
    "geometric": Costs(apply_ns=4.5, pass_ns=1.0),
    "fusion": Costs(apply_ns=10.0, pass_ns=3.0, stream_ns=4.7),
}
#: Methods measured clearly apart from their family, with their own costs.
METHOD_COSTS: dict[str, Costs] = {
    "task_arithmetic": Costs(apply_ns=2.5),  # task vectors against the base, then the sum
    "nearswap": Costs(apply_ns=4.0),  # per-element weights from the distance to the base
    # DELLA's per-row rank sampling draws and sorts: ~3x ties per element
    "della": Costs(apply_ns=25.0, pass_ns=1.0),
    "della_linear": Costs(apply_ns=25.0, pass_ns=1.0),
    # two selections per input (the gamma largest dropped, the density kept): ~1.5x ties
    "breadcrumbs": Costs(apply_ns=6.0, pass_ns=0.3),
    "breadcrumbs_ties": Costs(apply_ns=6.0, pass_ns=0.3),
    "model_stock": Costs(apply_ns=3.5, pass_ns=1.0),
    "ram": Costs(apply_ns=5.5),  # elementwise: on one thread
    "ramplus_tl": Costs(apply_ns=8.0, pass_ns=1.0),
}
#: Families whose kernels are numba's (their start-up loads its cache).
NUMBA_FAMILIES = frozenset({"selection", "sce"})

_FAMILY_OF: dict[str, str] = {
    **dict.fromkeys(("linear", "task_arithmetic", "nearswap", "passthrough", "sma", "wma", "ema", "minus-sqrt"),
                    "elementwise"),
    **dict.fromkeys(("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                     "della_linear"), "selection"),
    "sce": "sce",
    **dict.fromkeys(("slerp", "nuslerp", "model_stock", "multislerp", "karcher"), "geometric"),
    **dict.fromkeys(("arcee_fusion", "ram", "ramplus_tl"), "fusion"),
}

#: CPU ns per element to dequantize a quantized input (io.quant; on the read threads, in
#: parallel with the compute) and to requantize a quantized output (engine/requant.py).
DEQUANT_NS = 0.5
REQUANT_NS = 0.5
#: CPU ns per element and input of a weighted sum taken from block-FP8 codes in one loop
#: (engine/fused_fp8.py: decode, scale, sum, round), in place of dequantizing and the apply;
#: bench_estimate --quant, 3 x 512 MB, 2026-12-02.
FUSED_FP8_NS = 1.0
#: CPU ns per byte the pipeline spends whatever the method: the copy of each read into the
#: read buffer and the sha256 of each written byte (threads beside the compute).
READ_COPY_NS = 0.1
HASH_NS = 0.5
#: float64 compute (an F64 input or output) costs about this many times float32's.
F64_FACTOR = 2.0


def family_of(method: str, elementwise: bool) -> str:
    """The cost family of a registered method; an unknown one by its shape (elementwise or not)."""
    return _FAMILY_OF.get(method, "elementwise" if elementwise else "geometric")


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    """What a plan's run should take, and what that assumes."""

    method: str
    family: str
    read_bytes: int
    write_bytes: int
    disk_speed: float
    """Bytes per second assumed for reads."""
    write_speed: float
    """Bytes per second assumed for writes (the disk speed unless given apart)."""
    cores: int
    threads: int
    """Threads the method computes on."""
    io_s: float
    compute_s: float
    startup_s: float
    cpu_s: float
    """CPU seconds the run should take in all (start-up's included): what
    scripts/bench_estimate.py checks the constants against on a shared machine."""
    total_s: float
    """start-up + max(I/O, compute): the pipeline overlaps them."""
    bound: str
    """`I/O` or `compute`: which of the two the estimate says limits the run."""

    def as_dict(self) -> dict[str, object]:
        return {"total_s": round(self.total_s, 1), "io_s": round(self.io_s, 1),
                "compute_s": round(self.compute_s, 1), "startup_s": round(self.startup_s, 1),
                "cpu_s": round(self.cpu_s, 1), "bound": self.bound,
                "disk_speed_bytes_per_s": self.disk_speed, "write_speed_bytes_per_s": self.write_speed,
                "cores": self.cores, "threads": self.threads,
                "family": self.family, "read_bytes": self.read_bytes, "write_bytes": self.write_bytes}


def usable_cores() -> int:
    """The cores this process may run on (what torch and numba size their thread pools by)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _tensor_ns(t: TensorPlan, costs: Costs, n_passes: int, weighted_sum: bool = False) -> tuple[float, float]:
    """(compute-thread CPU ns, read-thread CPU ns) of one merged tensor: the method and any
    requantizing run where the chunk is computed, dequantizing where it is read (a weighted
    sum of block-FP8 inputs: both in one loop, `FUSED_FP8_NS`)."""
    n_in = len(t.sources_used)
    if weighted_sum and t.in_codecs and all(c == "fp8-block" for c in t.in_codecs):
        return t.numel * n_in * FUSED_FP8_NS + (t.numel * REQUANT_NS if t.quant is not None else 0.0), 0.0
    per_pass = costs.pass_ns + (costs.stream_ns if t.rows > t.rows_per_chunk else 0.0)
    work = t.numel * n_in * (costs.apply_ns + per_pass * n_passes)
    if t.compute_dtype == "F64":
        work *= F64_FACTOR
    if t.quant is not None:
        work += t.numel * REQUANT_NS
    return work, t.numel * DEQUANT_NS * sum(1 for c in t.in_codecs if c is not None)


def estimate(plan: Plan, *, disk_speed: float | None = None, write_speed: float | None = None,
             cores: int | None = None) -> Estimate:
    """The wall-time estimate of running `plan` locally (see the module docstring).

    `disk_speed`: bytes per second for reads and writes (default `DEFAULT_DISK_SPEED`);
    `write_speed`: for writes when they differ (scripts/bench_estimate.py measures both);
    `cores`: the cores to compute on (default: this machine's).
    """
    from moemerge.methods import get_method

    speed = DEFAULT_DISK_SPEED if disk_speed is None else float(disk_speed)
    wspeed = speed if write_speed is None else float(write_speed)
    if speed <= 0 or wspeed <= 0:
        raise ValueError(f"disk speed must be positive, got {speed} (read), {wspeed} (write)")
    ncores = usable_cores() if cores is None else max(1, cores)
    method = get_method(plan.method)
    family = family_of(plan.method, method.elementwise)
    costs = METHOD_COSTS.get(plan.method, FAMILIES[family])
    parallel = not method.elementwise
    threads = ncores if parallel else 1
    work_ns = quant_ns = 0.0
    numba = family in NUMBA_FAMILIES
    passes_of: dict[tuple[int, tuple[int, ...]], int] = {}  # as the planner: few distinct (params, shape)
    from moemerge.methods._fused import WEIGHTED_SUMS

    weighted_sum = plan.method in WEIGHTED_SUMS
    for t in plan.tensors:
        if t.method == "copy":
            continue
        key = (id(t.params), t.shape)
        n = passes_of.get(key)
        if n is None:
            n = passes_of[key] = len(method.passes(t.params, t.shape))
        w, q = _tensor_ns(t, costs, n, weighted_sum)
        numba = numba or q > 0 or (weighted_sum and bool(t.in_codecs))  # the fused loop is numba's too
        work_ns += w
        quant_ns += q
    # the pipeline's own CPU (read copies, output hashing) runs on other threads: it shares
    # the cores with a parallel method, and has a core of its own beside a one-thread one
    pipe_ns = plan.bytes_read * READ_COPY_NS + plan.bytes_written * HASH_NS
    if parallel:
        compute_s = (work_ns + quant_ns + pipe_ns) / (1 + PARALLEL_EFFICIENCY * (ncores - 1)) / 1e9
    else:
        compute_s = max(work_ns, (quant_ns + pipe_ns) / max(1, ncores - 1)) / 1e9
    io_s = plan.bytes_read / speed + plan.bytes_written / wspeed
    startup, startup_cpu = STARTUP_S, STARTUP_CPU_S
    if numba:
        startup, startup_cpu = startup + NUMBA_STARTUP_S[0], startup_cpu + NUMBA_STARTUP_S[1]
    return Estimate(method=plan.method, family=family, read_bytes=plan.bytes_read, write_bytes=plan.bytes_written,
                    disk_speed=speed, write_speed=wspeed, cores=ncores, threads=threads, io_s=io_s,
                    compute_s=compute_s, startup_s=startup, cpu_s=startup_cpu + (work_ns + quant_ns + pipe_ns) / 1e9,
                    total_s=startup + max(io_s, compute_s), bound="I/O" if io_s >= compute_s else "compute")
