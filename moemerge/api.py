"""The Python API: `plan`, `run`, `inspect`, `pma` (the CLI is a thin shell over these)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from moemerge import __version__
from moemerge.config import MergeConfig, load_config, parse_config
from moemerge.engine import NullProgress, Progress, run_local
from moemerge.errors import CheckpointError, ConfigError
from moemerge.io.checkpoint import Checkpoint, TensorInfo
from moemerge.io.quant import dequantizing
from moemerge.io.journal import Journal, ResumeCheck
from moemerge.io.lease import take_lease
from moemerge.io.sidefiles import read_side_files, retag_config_dtype
from moemerge.io.space import check_space
from moemerge.io.swap import note_state
from moemerge.io.writer import CONFIG_COPY_NAME, LocalModelWriter, ModelWriter, check_output
from moemerge.methods import average_weights
from moemerge.planner import Plan, build_plan
from moemerge.planner.quant import with_quant_config
from moemerge.sizes import parse_size

__all__ = ["plan", "run", "inspect", "pma_config", "RunResult", "DEFAULT_BUDGET", "DEFAULT_SHARD_SIZE"]

DEFAULT_BUDGET = "2GB"
DEFAULT_SHARD_SIZE = "5GB"
#: The smallest budget we accept: below it, per-call overheads dominate every chunk.
MIN_BUDGET = 10**6
#: The resume journal gets an entry (an fsync of the shards, then a line per finished tensor)
#: when any of these is reached since the last: output bytes of finished tensors (2 GiB),
#: finished tensors (a small output never reaches the bytes; at most one such entry per
#: JOURNAL_MIN_SECONDS, as each costs fsyncs), seconds (`engine.cadence`).
JOURNAL_EVERY = 2 << 30
JOURNAL_EVERY_TENSORS = 64
JOURNAL_EVERY_SECONDS = 30.0
JOURNAL_MIN_SECONDS = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """What a finished run produced."""

    out: str
    plan: Plan
    seconds: float
    checksums: dict[str, str] = field(default_factory=dict)
    resumed: ResumeCheck | None = None
    """With `resume`: the earlier run's tensors kept (re-read and verified) and recomputed."""


def _as_config(config: MergeConfig | dict[str, Any] | str) -> MergeConfig:
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(str(config))


def _open_all(cfg: MergeConfig) -> list[Checkpoint]:
    """Open every checkpoint (headers only); report every unreadable one in one error.

    Quantized weights (block FP8, MXFP4, compressed-tensors / fbgemm FP8) are served
    dequantized (`io.quant`); quantized-looking tensors no layout claims are refused unless the
    YAML's `non_float` says how to copy them.
    """
    opened: list[Checkpoint] = []
    problems: list[str] = []
    for loc in cfg.model_locations():
        try:
            ck = Checkpoint.open(loc, cfg.storage_options, names=cfg.dcp)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        try:
            opened.append(dequantizing(ck, raw_ok=cfg.non_float is not None))
        except CheckpointError as e:
            ck.close()
            problems.append(str(e))
    if problems:
        for c in opened:
            c.close()
        raise CheckpointError(problems[0] if len(problems) == 1 else
                              "cannot read the inputs:\n  " + "\n  ".join(problems))
    return opened


def _plan(cfg: MergeConfig, ckpts: list[Checkpoint], *, memory_budget: str | int,
          shard_size: str | int, seed: int, chunk_rows: int | None = None,
          out_format: str = "safetensors", unit_size: str | int | None = None,
          quantize: str | None = None) -> Plan:
    from moemerge.planner.quant import plan_with_quant, resolve_output_quant

    oq = resolve_output_quant(quantize or cfg.quantize, ckpts, ckpts[0].tensors, out_format=out_format)
    budget = parse_size(memory_budget, what="--memory-budget", minimum=MIN_BUDGET)
    shard = parse_size(shard_size, what="--shard-size", minimum=1)
    units = {} if unit_size is None else {"unit_bytes": parse_size(unit_size, what="--unit-size", minimum=1)}
    side = ckpts[0].config() or {}
    hint = side.get("num_hidden_layers") if isinstance(side.get("num_hidden_layers"), int) else None
    p = plan_with_quant(build_plan(
        cfg, {c.url: c.tensors for c in ckpts}, memory_budget=budget, shard_size=shard,
        seed=seed, n_layers_hint=hint, chunk_rows=chunk_rows, out_format=out_format, quant=oq.specs, keep=oq.keep, **units,
    ), oq)
    from moemerge.io.quant import describe  # which inputs are stored quantized, and how

    said = [line for line in map(describe, ckpts) if line]
    return replace(p, notes=p.notes + tuple(said)) if said else p


def plan(config: MergeConfig | dict[str, Any] | str, *, memory_budget: str | int = DEFAULT_BUDGET,
         shard_size: str | int = DEFAULT_SHARD_SIZE, seed: int = 0, chunk_rows: int | None = None,
         unit_size: str | int | None = None, out_format: str = "safetensors", quantize: str | None = None) -> Plan:
    """Validate a config against its checkpoints' headers and return the plan (no data read).

    `quantize` (`none`, `like-input`, `fp8-block`, `mxfp4`) overrides the config's `quantize:`."""
    cfg = _as_config(config)
    ckpts = _open_all(cfg)
    try:
        return _plan(cfg, ckpts, memory_budget=memory_budget, shard_size=shard_size, seed=seed,
                     chunk_rows=chunk_rows, unit_size=unit_size, out_format=out_format, quantize=quantize)
    finally:
        for c in ckpts:
            c.close()


def open_writer(out: str, p: Plan, *, overwrite: bool, storage_options: dict[str, Any] | None = None,
                attributes: dict[str, Any] | None = None) -> ModelWriter:
    """The writer for `out` in the plan's format, on local disk or object storage.

    `attributes` (JSON-able) are recorded in formats that keep metadata (Zarr root attributes).
    """
    if p.out_format == "zarr":
        from moemerge.io.zarr_writer import ZarrModelWriter

        arrays = p.zarr_arrays()
        attrs = {"moemerge_version": __version__, "method": p.method, "sources": list(p.sources),
                 "config_hash": p.config_hash, **(attributes or {})}
        return ZarrModelWriter(out, arrays, attributes=attrs, overwrite=overwrite,
                               storage_options=storage_options)
    from moemerge.io.storage import is_local, resolve

    if not is_local(resolve(out, storage_options)[0]):
        from moemerge.io.s3_writer import RemoteModelWriter

        return RemoteModelWriter(out, p.shards, p.placements(), overwrite=overwrite,
                                 storage_options=storage_options)
    return LocalModelWriter(out, p.shards, p.placements(), overwrite=overwrite)


def _main_dtype(p: Plan) -> str:
    by_bytes: Counter[str] = Counter()
    for t in p.tensors:
        if t.method != "copy" and t.quant is None:  # quantized ones are merged in F32, stored as parts
            by_bytes[t.out_dtype] += t.numel
    return by_bytes.most_common(1)[0][0] if by_bytes else "F32"


def run(
    config: MergeConfig | dict[str, Any] | str,
    out: str,
    *,
    memory_budget: str | int = DEFAULT_BUDGET,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool | Progress | NullProgress = False,
    manifest_extra: dict[str, Any] | None = None,
    chunk_rows: int | None = None,
    out_format: str = "safetensors",
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    unit_size: str | int | None = None,
    resume: bool = False,
    dashboard: str | None = None,
    quantize: str | None = None,
) -> RunResult:
    """Merge per `config` into the model directory `out`; returns when the output is committed.

    Everything is validated before the first output byte; on any error no index and no
    manifest are written, so the partial output never looks finished. `chunk_rows` caps rows
    per chunk (for tests and tuning; the output is the same for any value).

    Runs in this process by default; on Dask with `workers` (a LocalCluster of that many
    processes), `scheduler` (the address of a running cluster) or `client` (a
    `distributed.Client`), with the same output. `unit_size` sets the input bytes per Dask task
    (default about 256 MB). The LocalCluster of `workers` listens on 127.0.0.1, its dashboard
    too; `dashboard` gives another HOST:PORT for the dashboard, or `off`.

    `quantize` (`none`, `like-input`, `fp8-block`, `mxfp4`; default the config's `quantize:`,
    else `like-input` when every input is quantized alike) writes weights requantized with
    fresh scales, chunk by chunk (`planner.quant`).

    With `resume`, an unfinished output of the same plan (same config, inputs and settings)
    keeps the tensors an earlier, crashed or killed run had finished (its journal lists them,
    each written only after the tensor's bytes were on disk) and computes only the rest.
    Local-filesystem safetensors outputs keep a journal.
    """
    t0 = time.monotonic()
    cfg = _as_config(config)
    if workers is not None and scheduler:
        raise ConfigError("give --workers (start a local Dask cluster) or --scheduler (join one), not both")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if device != "cpu":
        import torch

        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise ConfigError(f"--device {device}: not a device name; use cpu or cuda") from e
        if kind != "cuda":
            raise ConfigError(f"--device {device}: not supported; use cpu or cuda")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    check_output(out, overwrite=overwrite, inputs=cfg.model_locations(), storage_options=cfg.storage_options)
    # one writer at a time: a second job stops here, having changed nothing (io.lease)
    lease = take_lease(out, cfg.storage_options, kind="output",
                       what="moemerge pma" if "pma" in (manifest_extra or {}) else "moemerge run")
    try:  # again under the lock: a job that held it may have just committed
        check_output(out, overwrite=overwrite, inputs=cfg.model_locations(), storage_options=cfg.storage_options)
        ckpts = _open_all(cfg)
    except BaseException:
        lease.release()
        raise
    cluster = None
    try:
        the_plan = _plan(cfg, ckpts, memory_budget=memory_budget, shard_size=shard_size, seed=seed,
                         chunk_rows=chunk_rows, out_format=out_format, unit_size=unit_size, quantize=quantize)
        if client is None and (workers or scheduler):  # reach the cluster before any output exists
            from moemerge.engine.cluster import start_client

            client, cluster = start_client(workers=workers, scheduler=scheduler, memory_budget=the_plan.memory_budget,
                                           dashboard=dashboard)
        side = read_side_files(the_plan.side_source or ckpts[0].url, cfg.storage_options, model=True, tokenizer=False)
        tok = read_side_files(the_plan.tokenizer_source or ckpts[0].url, cfg.storage_options, model=False, tokenizer=True)
        source = {k: v for k, v in cfg.source.items() if k != "storage_options"}
        writer = open_writer(out, the_plan, overwrite=overwrite, storage_options=cfg.storage_options,
                             attributes={"config": source})
        journal = _journal(the_plan, writer, seed=seed, resume=resume, out=out, ckpts=ckpts)
        check_space(writer, the_plan.bytes_written + sum(len(v) for v in (*side.values(), *tok.values())))
        writer.prepare()
        try:
            prog = progress if not isinstance(progress, bool) else (Progress() if progress else NullProgress())
            done: dict[str, str] = {}
            on_written = None
            resumed: ResumeCheck | None = None
            if journal is not None:
                resumed = _recheck(journal, writer, prog) if resume else None  # before trusting `done`
                journal.begin()
                done, on_written = journal.done, _durable(writer, journal)
            if client is not None:
                digests = _run_on_dask(the_plan, cfg, writer, out, client=client, own_cluster=cluster is not None,
                                       progress=prog, device=device, skip=done, on_written=on_written)
            else:
                digests = run_local(the_plan, ckpts, writer, progress=prog, device=device, in_cast=cfg.dtype,
                                    skip=done, on_written=on_written, written_every=_cadence())
            digests = {**done, **digests}
            main_dtype = _main_dtype(the_plan)
            if "config.json" in side:
                side["config.json"] = with_quant_config(retag_config_dtype(side["config.json"], main_dtype),
                                                        the_plan.extra.get("quantization_config"))
            files = {**side, **tok}
            files[CONFIG_COPY_NAME] = yaml.safe_dump(source, sort_keys=False).encode()
            index = {
                "metadata": {"total_size": the_plan.bytes_written, "moemerge_version": __version__},
                "weight_map": {n: f for t in the_plan.tensors for n, f, _, _ in t.stored()},
            }
            manifest = {
                "moemerge_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "method": the_plan.method,
                "config_hash": the_plan.config_hash,
                "config": source,
                "inputs": list(the_plan.sources),
                "seed": seed,
                "dtype": main_dtype,
                "files": {s.file: s.size for s in the_plan.shards},
                "tensors": {
                    n: {"file": f, "dtype": d, "shape": list(shape), "sha256": digests[n]}
                    for t in the_plan.tensors for n, f, d, shape in t.stored()
                },
                **(manifest_extra or {}),
            }
            lease.check()  # taken over meanwhile (we were presumed dead): fail rather than commit
            writer.finish(side_files=files, index=index, manifest=manifest)
            if journal is not None:
                journal.remove()  # committed: nothing left to resume
        except BaseException as e:
            writer.close()
            note_state(e, writer)  # what is on disk now, for the CLI's one line
            raise
    finally:
        for c in ckpts:
            c.close()
        if cluster is not None:  # the LocalCluster we started for `workers`
            client.close()
            cluster.close()
        lease.release()
    return RunResult(out=out, plan=the_plan, seconds=time.monotonic() - t0, checksums=digests, resumed=resumed)


def _journal(p: Plan, writer: ModelWriter, *, seed: int, resume: bool, out: str,
             ckpts: list[Checkpoint]) -> Journal | None:
    """The resume journal of a local safetensors output, read but not yet written (None
    elsewhere: --resume is refused there). It records the inputs' identity; `resume` refuses
    a journal of other inputs."""
    if not isinstance(writer, LocalModelWriter):
        if resume:
            raise ConfigError(f"--resume: {out} is not a safetensors output on a local or shared filesystem; "
                              "resuming works only there (rerun without --resume)")
        return None
    plan_id = hashlib.sha256(f"{p.output_id()}:{seed}:{__version__}".encode()).hexdigest()
    from moemerge.io.identity import input_identity

    return Journal.load(writer.path, plan_id, resume=resume, inputs=input_identity(ckpts))


def _recheck(journal: Journal, writer: LocalModelWriter, prog: Progress | NullProgress) -> ResumeCheck:
    """`--resume`: keep only the journaled tensors whose bytes on disk still hash right."""
    sizes = {name: pl.nbytes for name, pl in writer.placements.items()}
    prog.start(sum(sizes.get(n, 0) for n in journal.done), "resume: re-reading the kept tensors")
    try:  # 4 threads x 4 MB blocks: small beside any memory budget
        check = journal.check_kept(lambda n: writer.read_back(n, block=4 << 20), sizes, on_bytes=prog.advance)
    finally:
        prog.stop()
    prog.note(check.message)
    return check


def _cadence() -> Any:
    from moemerge.engine.cadence import Cadence

    return Cadence(nbytes=JOURNAL_EVERY, tensors=JOURNAL_EVERY_TENSORS, seconds=JOURNAL_EVERY_SECONDS,
                   min_seconds=JOURNAL_MIN_SECONDS)


def _durable(writer: ModelWriter, journal: Journal) -> Any:
    """`on_written` for the engines: flush the shards, then journal what they hold."""
    def record(digests: dict[str, str]) -> None:
        writer.flush()  # type: ignore[attr-defined]
        journal.record(digests)

    return record


def _run_on_dask(p: Plan, cfg: MergeConfig, writer: ModelWriter, out: str, *, client: Any, own_cluster: bool,
                 progress: Progress | NullProgress, device: str, skip: dict[str, str],
                 on_written: Any) -> dict[str, str]:
    """Run the plan's tasks on the Dask cluster behind `client`; checksums back."""
    import functools

    from moemerge.engine.cluster import OutputTarget, run_dask
    from moemerge.io.storage import is_local, resolve

    out = getattr(writer, "target", out)  # overwriting: the new output is built beside the old
    fs, path = resolve(out, cfg.storage_options)
    local = is_local(fs)
    kind = "zarr" if p.out_format == "zarr" else ("local" if local else "remote")
    target = OutputTarget(kind=kind, url=os.path.abspath(path) if local else out,
                          storage_options=cfg.storage_options or None,
                          flush_each_task=not own_cluster)  # others' workers may be other machines
    digests = run_dask(p, client, opener=functools.partial(_open_all, cfg), target=target,
                       progress=progress, device=device, in_cast=cfg.dtype, skip=skip,
                       on_written=on_written, written_every=_cadence())
    if kind == "remote":
        writer.adopt([s.file for s in p.shards])  # type: ignore[attr-defined]
    return digests


def inspect(location: str, storage_options: dict[str, Any] | None = None) -> list[TensorInfo]:
    """Every tensor of a checkpoint (name, dtype, shape, bytes, file), in file order."""
    ck = Checkpoint.open(location, storage_options)
    try:
        return sorted(ck.tensors.values(), key=lambda t: (t.file, t.start))
    finally:
        ck.close()


def pma_config(
    snapshots: list[str], *, method: str = "sma", alpha: float = 0.2,
    weights: list[float] | None = None, dtype: str | None = None, dcp: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[float]]:
    """A merge config averaging `snapshots` (oldest first), and the weight of each snapshot.

    Non-float tensors come from the newest snapshot (`non_float: last`, implied by sma / wma /
    ema); `dcp` ({prefix, rename}) maps DCP training-checkpoint names to HF names.
    """
    if len(snapshots) < 1:
        raise ConfigError("pma: give at least one snapshot")
    if weights is not None:
        if len(weights) != len(snapshots):
            raise ConfigError(f"--weights: {len(weights)} weight(s) for {len(snapshots)} snapshot(s)")
        if not all(w == w and abs(w) != float("inf") for w in weights):  # NaN != NaN
            raise ConfigError(f"--weights: {weights} has a non-finite entry; give finite numbers")
        if abs(sum(weights)) < 1e-12:
            raise ConfigError(f"--weights: {weights} sum to 0; they are normalized, so give a non-zero sum")
        total = sum(weights)
        doc: dict[str, Any] = {
            "merge_method": "linear",
            "models": [{"model": s, "parameters": {"weight": w}} for s, w in zip(snapshots, weights)],
            "parameters": {"normalize": True},
            "non_float": "last",
        }
        eff = [w / total for w in weights]
    else:
        if method not in ("sma", "wma", "ema"):
            raise ConfigError(f"--method: unknown average {method!r}; use sma, wma or ema")
        if method == "ema" and not 0 < alpha <= 1:
            raise ConfigError(f"--alpha: must be in (0, 1], got {alpha}")
        doc = {"merge_method": method, "models": [{"model": s} for s in snapshots]}
        if method == "ema":
            doc["parameters"] = {"alpha": alpha}
        eff = average_weights(method, len(snapshots), alpha)
    if dtype:
        doc["out_dtype"] = dtype
    if dcp:
        doc["dcp"] = dcp
    return doc, eff


