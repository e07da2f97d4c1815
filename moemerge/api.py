"""The Python API, which the CLI is a thin shell over: `plan` and `run` a merge, `inspect` a
checkpoint, `pma_config` / `pma_job` / `pma_update` for averages over a training run, and
`plan_split` (how a plan splits into Dask tasks). Defaults live in `moemerge.settings`."""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import yaml

from moemerge._gc import gc_paused
from moemerge.config import MergeConfig, load_config, parse_config
from moemerge.engine import NullProgress, Progress, run_local
from moemerge.engine.device import TWIN, check_device_memory, device_bytes
from moemerge.errors import CheckpointError, ConfigError, PlanError
from moemerge.io.checkpoint import Checkpoint, TensorInfo, shared_records
from moemerge.io.quant import dequantizing
from moemerge.io.journal import Journal, ResumeCheck
from moemerge.io.lease import Lease, take_lease
from moemerge.io.sidefiles import read_side_files
from moemerge.io.space import check_space
from moemerge.io.swap import note_state
from moemerge.io.output import OutputTarget, open_writer as io_open_writer, output_target
from moemerge.io.writer import LocalModelWriter, ModelWriter, SupportsAdopt, SupportsFlush, check_output
from moemerge.methods import average_weights
from moemerge.planner import Plan, build_plan
from moemerge.planner.quant import check_streamable
from moemerge.settings import (DEFAULT_ALPHA, DEFAULT_BUDGET, DEFAULT_DEVICE, DEFAULT_PMA_METHOD, DEFAULT_SHARD_SIZE,
                               JOURNAL_EVERY, JOURNAL_EVERY_SECONDS, JOURNAL_EVERY_TENSORS, JOURNAL_MIN_SECONDS,
                               MIN_BUDGET, PMA_METHODS)
from moemerge.settings import VERSION as __version__
from moemerge.sizes import parse_size

if TYPE_CHECKING:
    from moemerge.pma.choose import Chosen
    from moemerge.pma.update import UpdateResult

__all__ = ["plan", "run", "inspect", "pma_config", "pma_job", "pma_update", "plan_split", "parse_weights",
           "pma_dcp", "RunResult", "PmaJob", "DEFAULT_BUDGET", "DEFAULT_SHARD_SIZE", "device_bytes"]

# The defaults and limits live in `moemerge.settings`; the journal cadence is read from this
# module's names at run time (tests shorten it by setting `moemerge.api.JOURNAL_EVERY`).


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


@gc_paused  # headers of 92k tensors: collections would walk every object (moemerge._gc)
@shared_records()  # inputs with byte-identical shard headers share one set of records
def _open_all(cfg: MergeConfig, hub_pins: dict[tuple[str, str, str], str] | None = None) -> list[Checkpoint]:
    """Open every checkpoint (headers only); report every unreadable one in one error.

    Quantized weights (block FP8, MXFP4, compressed-tensors / fbgemm FP8) are served
    dequantized (`io.quant`); quantized-looking tensors no layout claims are refused unless the
    YAML's `non_float` says how to copy them. `hub_pins`: the commits the client resolved
    Hub branches to (a Dask worker reads those, not where a branch points now).
    """
    from moemerge.io.hub import begin_run

    begin_run(hub_pins)  # Hub branches are pinned afresh: each to one commit for the whole run
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
    from moemerge.tokenizers_merge import with_vocabulary  # embeddings re-indexed to a built vocabulary

    try:
        return with_vocabulary(cfg, opened)
    except BaseException:
        for c in opened:
            c.close()
        raise


def input_files(config: MergeConfig) -> dict[str, dict[str, Any]]:
    """What every input file of `config` is now (`io.identity`: size, change stamps, header
    hash per file; headers only): recorded with an output to tell later whether it is stale."""
    from moemerge.io.identity import input_identity

    ckpts = _open_all(config)
    try:
        return input_identity(ckpts)
    finally:
        for c in ckpts:
            c.close()


@gc_paused
def use_hub_cache(path: str | None) -> None:
    """Download Hub models' files into `path` (huggingface_hub's cache layout; `--hub-cache`)
    instead of reading them in place by range requests; None: read in place (the default)."""
    from moemerge.io.hub import set_cache_dir

    set_cache_dir(path)


def _plan(cfg: MergeConfig, ckpts: list[Checkpoint], *, memory_budget: str | int,
          shard_size: str | int, seed: int, chunk_rows: int | None = None,
          out_format: str = "safetensors", unit_size: str | int | None = None,
          quantize: str | None = None, allow_crimes: bool = False, compiled: bool = False) -> Plan:
    from moemerge.planner.architecture import mixed_architectures
    from moemerge.planner.quant import plan_with_quant, resolve_output_quant

    mixed = None if allow_crimes else mixed_architectures([(c.url, c.config()) for c in ckpts])
    if mixed:
        raise PlanError(mixed)

    oq = resolve_output_quant(quantize or cfg.quantize, ckpts, ckpts[0].tensors, out_format=out_format)
    budget = parse_size(memory_budget, what="--memory-budget", minimum=MIN_BUDGET)
    shard = parse_size(shard_size, what="--shard-size", minimum=1)
    units = {} if unit_size is None else {"unit_bytes": parse_size(unit_size, what="--unit-size", minimum=1)}
    side = ckpts[0].config() or {}
    if cfg.slices:  # named `modules:` find their parts from config.json (planner/modules.py)
        from moemerge.planner.modules import with_module_layout

        cfg = with_module_layout(cfg, side)
    hint = side.get("num_hidden_layers") if isinstance(side.get("num_hidden_layers"), int) else None
    p: Plan = plan_with_quant(build_plan(
        cfg, {c.url: c.tensors for c in ckpts}, memory_budget=budget, shard_size=shard,
        seed=seed, n_layers_hint=hint, chunk_rows=chunk_rows, out_format=out_format, quant=oq.specs, keep=oq.keep,
        compiled=compiled, **units,
    ), oq)
    from moemerge.tokenizers_merge import plan_with_vocabulary

    p = plan_with_vocabulary(p, ckpts, side)  # config.json's vocab_size, when a vocabulary was built
    if cfg.slices:  # the output's layer count and per-layer config.json lists (planner/slices.py)
        from moemerge.planner.slices import slice_config_updates

        cats = {c.url: c.tensors for c in ckpts}
        p = replace(p, config_updates=p.config_updates + slice_config_updates(cfg, cats, side))
    from moemerge.io.quant import describe  # which inputs are stored quantized, and how

    said = [line for line in map(describe, ckpts) if line]
    return replace(p, notes=p.notes + tuple(said)) if said else p


def _kernels_expected(device: str = "cpu", *, distributed: bool = False) -> bool:
    """Whether the methods' compiled loops are expected to run (numba installed and not switched
    off, a CPU device, this process): plans then size chunks for them (`Plan.compiled_sizing`).
    Only looks for numba; `run` loads the loops before any work (`_plan_for_kernels`)."""
    import importlib.util

    return (not distributed and device == "cpu" and os.environ.get("MOEMERGE_NO_NUMBA", "") in ("", "0")
            and importlib.util.find_spec("numba") is not None)


def _plan_for_kernels(p: Plan, replan: Callable[[], Plan]) -> Plan:
    """`p`, or where it counted on the compiled loops and they do not load here, `replan()`
    (sized for the torch path): decided before any output exists."""
    if not p.compiled_sizing:
        return p
    from moemerge.methods import _fused

    return p if _fused.available() else replan()


def plan(config: MergeConfig | dict[str, Any] | str, *, memory_budget: str | int = DEFAULT_BUDGET,
         shard_size: str | int = DEFAULT_SHARD_SIZE, seed: int = 0, chunk_rows: int | None = None,
         unit_size: str | int | None = None, out_format: str = "safetensors", quantize: str | None = None,
         allow_crimes: bool = False) -> Plan:
    """Validate a config against its checkpoints' headers and return the plan (no data read).

    `quantize` (`none`, `like-input`, `fp8-block`, `mxfp4`) overrides the config's `quantize:`;
    `allow_crimes` lets inputs of different architectures through (MergeKit's `--allow-crimes`)."""
    cfg = _as_config(config)
    ckpts = _open_all(cfg)
    try:
        return _plan(cfg, ckpts, memory_budget=memory_budget, shard_size=shard_size, seed=seed,
                     chunk_rows=chunk_rows, unit_size=unit_size, out_format=out_format, quantize=quantize,
                     allow_crimes=allow_crimes, compiled=_kernels_expected())
    finally:
        for c in ckpts:
            c.close()


def open_writer(out: str, p: Plan, *, overwrite: bool, storage_options: dict[str, Any] | None = None,
                attributes: dict[str, Any] | None = None) -> ModelWriter:
    """The writer for `out` in the plan's format (`moemerge.io.output.open_writer`)."""
    return io_open_writer(output_target(out, p.out_format, storage_options), p, overwrite=overwrite,
                          attributes=attributes)


def run(
    config: MergeConfig | dict[str, Any] | str,
    out: str,
    *,
    memory_budget: str | int = DEFAULT_BUDGET,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    device: str = DEFAULT_DEVICE,
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
    copy_tokenizer: bool = True,
    model_card: bool = False,
    num_threads: int | None = None,
    allow_crimes: bool = False,
) -> RunResult:
    """Merge per `config` into the model directory `out`; returns when the output is committed.

    MergeKit's options: `copy_tokenizer` copies the tokenizer source's tokenizer files (default,
    as MergeKit); `model_card` writes README.md (Hub front matter, method, models, the config)
    and `mergekit_config.yml` (`moemerge run` does by default, as mergekit-yaml); `num_threads`
    sets torch's CPU threads (mergekit-yaml `-j`); `allow_crimes` merges inputs whose config.json
    names different architectures (refused otherwise, as MergeKit does).

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
    _check_run_options(workers=workers, scheduler=scheduler, device=device)
    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError(f"--num-threads: expected a positive number of threads, got {num_threads}")
        import torch

        torch.set_num_threads(num_threads)
    lease, ckpts = _lock_and_open(cfg, out, overwrite=overwrite,
                                  what="moemerge pma" if "pma" in (manifest_extra or {}) else "moemerge run")
    cluster = None
    try:
        planned = functools.partial(_plan, cfg, ckpts, memory_budget=memory_budget, shard_size=shard_size, seed=seed,
                                    chunk_rows=chunk_rows, out_format=out_format, unit_size=unit_size,
                                    quantize=quantize, allow_crimes=allow_crimes)
        distributed = client is not None or bool(workers) or bool(scheduler)
        the_plan = _plan_for_kernels(planned(compiled=_kernels_expected(device, distributed=distributed)),
                                     lambda: planned(compiled=False))
        check_device_memory(the_plan, device)  # too little device memory: refused before any output
        from moemerge._startup import load_torch_quietly

        if client is None and not workers and not scheduler:  # the first reads start while torch loads
            from moemerge.engine.prefetch import prefetch_first_reads

            prefetch_first_reads(the_plan, ckpts)
        load_torch_quietly()  # nothing when loaded already
        if client is None and (workers or scheduler):  # reach the cluster before any output exists
            from moemerge.engine.cluster import start_client

            client, cluster = start_client(workers=workers, scheduler=scheduler, memory_budget=the_plan.memory_budget,
                                           dashboard=dashboard)
        output = _prepare_output(the_plan, cfg, ckpts, out, overwrite=overwrite, seed=seed, resume=resume,
                                 copy_tokenizer=copy_tokenizer, model_card=model_card)
        try:
            prog = progress if not isinstance(progress, bool) else (Progress() if progress else NullProgress())
            digests, resumed = _compute(the_plan, cfg, ckpts, output, client=client, own_cluster=cluster is not None,
                                        progress=prog, device=device, resume=resume)
            _commit(the_plan, output, digests, seed=seed, manifest_extra=manifest_extra, checks=(lease.check,))
        except BaseException as e:
            output.writer.close()
            note_state(e, output.writer)  # what is on disk now, for the CLI's one line
            raise
    finally:
        for c in ckpts:
            c.close()
        if cluster is not None:  # the LocalCluster we started for `workers`
            client.close()
            cluster.close()
        lease.release()
    return RunResult(out=out, plan=the_plan, seconds=time.monotonic() - t0, checksums=digests, resumed=resumed)


def _check_run_options(*, workers: int | None, scheduler: str | None, device: str) -> None:
    """`run`'s execution options, checked before anything is opened."""
    if workers is not None and scheduler:
        raise ConfigError("give --workers (start a local Dask cluster) or --scheduler (join one), not both")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if device not in ("cpu", TWIN):  # TWIN: the device path run on the CPU (tests; engine/device.py)
        import torch

        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise ConfigError(f"--device {device}: not a device name; use cpu or cuda") from e
        if kind != "cuda":
            raise ConfigError(f"--device {device}: not supported; use cpu or cuda")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")


def _lock_and_open(cfg: MergeConfig, out: str, *, overwrite: bool, what: str) -> tuple[Lease, list[Checkpoint]]:
    """Check that `out` may be written, take its lease (one writer at a time: a second job
    stops here, having changed nothing; io.lease), check again under it, then open the inputs."""
    check_output(out, overwrite=overwrite, inputs=cfg.model_locations(), storage_options=cfg.storage_options)
    lease = take_lease(out, cfg.storage_options, kind="output", what=what)
    try:  # again under the lock: a job that held it may have just committed
        check_output(out, overwrite=overwrite, inputs=cfg.model_locations(), storage_options=cfg.storage_options)
        return lease, _open_all(cfg)
    except BaseException:
        lease.release()
        raise


@dataclass(frozen=True, slots=True, kw_only=True)
class _Output:
    """An output laid out and ready for tensors: its writer, journal and the files copied beside."""

    target: OutputTarget
    writer: ModelWriter
    journal: Journal | None
    """The resume journal (local safetensors outputs only)."""
    side_files: dict[str, bytes]
    """config.json and tokenizer files, as read from their sources."""
    source: dict[str, Any]
    """The config as given, storage options left out (copied beside the output)."""


def _prepare_output(p: Plan, cfg: MergeConfig, ckpts: list[Checkpoint], out: str, *, overwrite: bool, seed: int,
                    resume: bool, copy_tokenizer: bool = True, model_card: bool = False) -> _Output:
    """Read the side files, open the writer and the journal, check free space, lay out the output."""
    side = read_side_files(p.side_source or ckpts[0].url, cfg.storage_options, model=True, tokenizer=False)
    from moemerge.tokenizers_merge import output_tokenizer_files

    tok = output_tokenizer_files(cfg, ckpts, copy_tokenizer=copy_tokenizer, donor=p.tokenizer_source or ckpts[0].url)
    if tok is None:
        tok = (read_side_files(p.tokenizer_source or ckpts[0].url, cfg.storage_options, model=False, tokenizer=True)
               if copy_tokenizer else {})
    source = {k: v for k, v in cfg.source.items() if k != "storage_options"}
    if model_card:  # ours, not an input's README.md (read_side_files never reads one)
        from moemerge.modelcard import card_files

        side = {**side, **card_files(cfg, source)}
    target = output_target(out, p.out_format, cfg.storage_options)  # the writer kind, decided once
    check_streamable(p, target.kind)  # a quantized tensor's scales wait for its codes in a stream
    writer = io_open_writer(target, p, overwrite=overwrite, attributes={"config": source})
    journal = _journal(p, writer, seed=seed, resume=resume, out=out, ckpts=ckpts)
    check_space(writer, p.bytes_written + sum(len(v) for v in (*side.values(), *tok.values())))
    writer.prepare()
    return _Output(target=target, writer=writer, journal=journal, side_files={**side, **tok}, source=source)


def _compute(p: Plan, cfg: MergeConfig, ckpts: list[Checkpoint], output: _Output, *, client: Any,
             own_cluster: bool, progress: Progress | NullProgress, device: str,
             resume: bool) -> tuple[dict[str, str], ResumeCheck | None]:
    """Compute and write every tensor not kept from an earlier run (`resume`), here or on the
    Dask cluster behind `client`; every tensor's checksum back, and what was kept."""
    writer, journal = output.writer, output.journal
    done: dict[str, str] = {}
    on_written = None
    resumed: ResumeCheck | None = None
    if journal is not None and isinstance(writer, LocalModelWriter):  # only those keep one (`_journal`)
        resumed = _recheck(journal, writer, progress) if resume else None  # before trusting `done`
        journal.begin()
        done, on_written = journal.done, _durable(writer, journal)
    if client is not None:
        digests = _run_on_dask(p, cfg, writer, output.target, client=client, own_cluster=own_cluster,
                               progress=progress, device=device, skip=done, on_written=on_written)
    else:
        digests = run_local(p, ckpts, writer, progress=progress, device=device, in_cast=cfg.dtype,
                            skip=done, on_written=on_written, written_every=_cadence())
    return {**done, **digests}, resumed


def _commit(p: Plan, output: _Output, digests: dict[str, str], *, seed: int, manifest_extra: dict[str, Any] | None,
            checks: Sequence[Callable[[], None]]) -> None:
    """Side files, index, then the manifest (the commit, `engine.commit`); the journal goes last.
    `checks` run right before the manifest (a lease taken over meanwhile: fail rather than commit)."""
    from moemerge.engine.commit import commit_output

    commit_output(output.writer, p, digests, side_files=output.side_files,
                  config_copy=yaml.safe_dump(output.source, sort_keys=False).encode(), config=output.source,
                  seed=seed, extra=manifest_extra, checks=checks)
    if output.journal is not None:
        output.journal.remove()  # committed: nothing left to resume


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
        if isinstance(writer, SupportsFlush):  # a journal is kept only for writers that flush
            writer.flush()
        journal.record(digests)

    return record


def _run_on_dask(p: Plan, cfg: MergeConfig, writer: ModelWriter, target: OutputTarget, *, client: Any,
                 own_cluster: bool, progress: Progress | NullProgress, device: str, skip: dict[str, str],
                 on_written: Any) -> dict[str, str]:
    """Run the plan's tasks on the Dask cluster behind `client`; checksums back."""
    import functools

    from moemerge.engine.cluster import OutputTarget as DaskTarget, run_dask

    # workers open the output where the writer builds it (beside the old one when overwriting)
    at = target.at(writer.target)
    dask_target = DaskTarget(kind=at.kind, url=at.url, storage_options=at.storage_options or None,
                             flush_each_task=not own_cluster)  # others' workers may be other machines
    from moemerge.io.hub import pinned

    digests = run_dask(p, client, opener=functools.partial(_open_all, cfg, hub_pins=pinned()), target=dask_target,
                       progress=progress, device=device, in_cast=cfg.dtype, skip=skip,
                       on_written=on_written, written_every=_cadence())
    if isinstance(writer, SupportsAdopt):  # shards the workers streamed and completed themselves
        writer.adopt([s.file for s in p.shards])
    return digests


def inspect(location: str, storage_options: dict[str, Any] | None = None) -> list[TensorInfo]:
    """Every tensor of a checkpoint (name, dtype, shape, bytes, file), in file order; a Hub id,
    `@revision` or `model+adapter` as in a config."""
    from moemerge.io.hub import model_reference

    ck = Checkpoint.open(model_reference(location, "PATH"), storage_options)
    try:
        return sorted(ck.tensors.values(), key=lambda t: (t.file, t.start))
    finally:
        ck.close()


def pma_config(
    snapshots: list[str], *, method: str = DEFAULT_PMA_METHOD, alpha: float = DEFAULT_ALPHA,
    weights: list[float] | None = None, dtype: str | None = None, dcp: dict[str, Any] | None = None,
    normalize: bool = True, notes: list[str] | None = None,
) -> tuple[dict[str, Any], list[float]]:
    """A merge config averaging `snapshots` (oldest first), and the weight of each snapshot.

    Non-float tensors come from the newest snapshot (`non_float: last`, implied by sma / wma /
    ema); `dcp` ({prefix, rename}) maps DCP training-checkpoint names to HF names. `method` is
    the schedule (`linear` and `minus-sqrt` are Megatron-LM's coefficients, a `linear` merge of
    them). Explicit `weights` may be negative; `normalize` divides them by their (positive)
    sum, else they are used as given (`pma.weights`); `notes` hears the warnings.
    """
    if len(snapshots) < 1:
        raise ConfigError("pma: give at least one snapshot")
    if weights is not None:
        from moemerge.pma.weights import effective_weights

        if len(weights) != len(snapshots):
            raise ConfigError(f"--weights: {len(weights)} weight(s) for {len(snapshots)} snapshot(s)")
        eff, said = effective_weights(weights, normalize=normalize)
        if notes is not None:
            notes.extend(said)
        doc: dict[str, Any] = {
            "merge_method": "linear",
            "models": [{"model": s, "parameters": {"weight": float(w)}} for s, w in zip(snapshots, weights)],
            "parameters": {"normalize": normalize},
            "non_float": "last",
        }
    else:
        if method not in PMA_METHODS:
            raise ConfigError(f"--schedule: unknown average {method!r}; use {', '.join(PMA_METHODS[:-1])} or {PMA_METHODS[-1]}")
        if method == "ema" and not 0 < alpha <= 1:
            raise ConfigError(f"--alpha: must be in (0, 1], got {alpha}")
        eff = average_weights(method, len(snapshots), alpha)
        if method in ("linear", "minus-sqrt"):  # Megatron's coefficients, used as they are (sum 1)
            doc = {"merge_method": "linear", "non_float": "last", "parameters": {"normalize": False},
                   "models": [{"model": s, "parameters": {"weight": w}} for s, w in zip(snapshots, eff)]}
        else:
            doc = {"merge_method": method, "models": [{"model": s} for s in snapshots]}
        if method == "ema":
            doc["parameters"] = {"alpha": alpha}
    if dtype:
        doc["out_dtype"] = dtype
    if dcp:
        doc["dcp"] = dcp
    return doc, eff



# -- what the CLI's `pma`, `pma update` and `plan --workers` decide, done here ----------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PmaJob:
    """A `pma` average, decided: the snapshots chosen, their weights and the merge config."""

    config: MergeConfig
    chosen: Chosen
    """The snapshots, oldest first, with their steps."""
    weights: list[float]
    """The effective (normalized) weight of each snapshot."""
    title: str
    """What is averaged: `sma`, `wma`, `ema` or `weights`."""
    record: dict[str, Any]
    """The manifest's `pma` entry (`run(..., manifest_extra={"pma": record})`)."""
    not_ready: str | None = None
    """A dry run with fewer snapshots than --min-snapshots: the NotReadyError message (the CLI
    lists what there is, then exits as `pma` would); None otherwise."""


def parse_weights(text: str | None) -> list[float] | None:
    """`--weights 1,2,3` -> [1.0, 2.0, 3.0]; None when not given."""
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as e:
        raise ConfigError(f"--weights: expected numbers separated by commas, got {text!r}") from e


def pma_dcp(prefix: str | None, rename: Sequence[str] = ()) -> dict[str, Any] | None:
    """The config's `dcp:` mapping from `--dcp-prefix P` / `--rename OLD=NEW` items, or None."""
    renames: dict[str, str] = {}
    for item in rename:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise ConfigError(f"--rename {item!r}: expected OLD=NEW (a tensor-name prefix and its replacement)")
        renames[old] = new
    if prefix is None and not renames:
        return None
    return {"prefix": prefix, "rename": renames}


def pma_job(
    snapshots: Sequence[str], *, out: str | None, dry_run: bool = False, method: str | None = None,
    alpha: float | None = None, weights: str | Sequence[float] | None = None, out_dtype: str | None = None,
    dcp_prefix: str | None = None, rename: Sequence[str] = (), last: int | None = None,
    interval_steps: int | None = None, interval_tokens: float | None = None,
    tokens_per_step: float | None = None, before_step: int | None = None, step_regex: str | None = None,
    on_note: Callable[[str], None] | None = None, min_snapshots: int | None = None,
    normalize: bool | None = None,
) -> PmaJob:
    """Choose the snapshots of a `pma` average (a list oldest first, or one glob/prefix), weigh
    them and build the merge config; `weights` may be the `--weights` text. `on_note` hears the
    notes of the choice as soon as it is made. While fewer than --last exist, what there is is
    averaged ("window 2 of 4"); fewer than `min_snapshots` (default 1) raises NotReadyError
    (the CLI's exit 3), except in a dry run (`PmaJob.not_ready`). `normalize` (default True)
    divides explicit weights by their sum; False uses them as given."""
    from moemerge.pma.choose import Window, check_min_snapshots, choose, not_ready
    from moemerge.settings import DEFAULT_MIN_SNAPSHOTS

    method = method or DEFAULT_PMA_METHOD
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    if not out and not dry_run:
        raise ConfigError("pma: give the output directory with -o OUT (or --dry-run)")
    given = parse_weights(weights) if isinstance(weights, str) or weights is None else list(weights)
    dcp = pma_dcp(dcp_prefix, rename)
    if normalize is not None and not given:
        raise ConfigError("--normalize / --no-normalize apply to --weights only (a schedule's weights sum to 1)")
    least = DEFAULT_MIN_SNAPSHOTS if min_snapshots is None else min_snapshots
    check_min_snapshots(least, last)
    window = Window(last=last, interval_steps=interval_steps, interval_tokens=interval_tokens,
                    tokens_per_step=tokens_per_step, before_step=before_step, step_regex=step_regex,
                    min_snapshots=least)
    chosen = choose(list(snapshots), window, min_last=len(given) if given else None)
    for n in chosen.notes:
        if on_note is not None:
            on_note(n)
    snaps = list(chosen.urls)
    waiting = None
    if len(snaps) < least:
        err = not_ready(len(snaps), least, chosen.pattern or "pma")
        if not dry_run:
            raise err
        waiting = str(err)
    said: list[str] = []
    doc, eff = pma_config(snaps, method=method, alpha=alpha, weights=given, dtype=out_dtype, dcp=dcp,
                          normalize=True if normalize is None else normalize, notes=said)
    for n in said:
        if on_note is not None:
            on_note(n)
    cfg = parse_config(doc, where="pma")
    record = {"method": "weights" if given else method,
              "alpha": alpha if method == "ema" and not given else None,
              "snapshots": snaps, "steps": list(chosen.steps), "weights": eff,
              "pattern": chosen.pattern, "selection": chosen.selection,
              "window": chosen.window, "filling": chosen.filling,
              **({"normalize": normalize is not False} if given else {})}
    return PmaJob(config=cfg, chosen=chosen, weights=eff, title="weights" if given else method, record=record,
                  not_ready=waiting)


def pma_update(
    state: str, pattern: str, out: str, *, method: str | None = None, last: int | None = None,
    alpha: float | None = None, interval_steps: int | None = None, interval_tokens: float | None = None,
    tokens_per_step: float | None = None, before_step: int | None = None, step_regex: str | None = None,
    recompute_every: int | None = None, memory_budget: str | int = DEFAULT_BUDGET,
    shard_size: str | int = DEFAULT_SHARD_SIZE, out_format: str = "safetensors", out_dtype: str | None = None,
    overwrite: bool = False, progress: bool = False, dcp_prefix: str | None = None, rename: Sequence[str] = (),
    weights: str | Sequence[float] | None = None, dry_run: bool = False, quantize: str | None = None,
    workers: int | None = None, scheduler: str | None = None, min_snapshots: int | None = None,
    normalize: bool | None = None,
) -> UpdateResult:
    """Update the running PMA state at `state` with the new snapshots of `pattern` and write the
    average to `out` (`moemerge.pma.update`); settings left out come from the state. The flags
    of `pma` that an update cannot honour (`weights`, `dry_run`) are refused; `quantize` is
    `pma`'s (same choices and default); `workers` / `scheduler` run its chunks on Dask, as `run` does."""
    from moemerge.names import parse_dcp_names
    from moemerge.pma.discovery import interval_steps_from_tokens
    from moemerge.pma.update import update

    for flag, given in (("--weights", weights), ("--dry-run", dry_run), ("--normalize", normalize is not None)):
        if given:
            raise ConfigError(f"pma update: {flag} is not supported; use `moemerge pma` for a one-off average")
    interval = interval_steps
    if interval_tokens is not None or tokens_per_step is not None:
        if interval_tokens is None or tokens_per_step is None or interval is not None:
            raise ConfigError("give --interval-tokens with --tokens-per-step, or --interval-steps alone")
        interval = interval_steps_from_tokens(interval_tokens, tokens_per_step)
    doc = pma_dcp(dcp_prefix, rename)
    names = None if doc is None else parse_dcp_names(doc, where="--dcp-prefix/--rename")
    return update(state, pattern, out, method=method, last=last, alpha=alpha, interval_steps=interval,
                  before_step=before_step, step_regex=step_regex, recompute_every=recompute_every,
                  memory_budget=memory_budget, shard_size=shard_size, out_format=out_format, out_dtype=out_dtype,
                  overwrite=overwrite, progress=progress, dcp=names, workers=workers, scheduler=scheduler,
                  min_snapshots=1 if min_snapshots is None else min_snapshots, quantize=quantize)


def plan_split(p: Plan, workers: int, out: str | None = None) -> dict[str, Any]:
    """How `p` splits into Dask tasks and what each of `workers` workers holds (sizes as text,
    for `moemerge plan --workers`); the split depends on whether `out` is object storage."""
    from moemerge.engine.cluster import worker_memory_limit
    from moemerge.engine.graph import build_graph, graph_summary
    from moemerge.sizes import format_size

    remote = bool(out) and "://" in str(out) and not str(out).startswith("file://")
    tasks = build_graph(p, by_shard=remote and p.out_format == "safetensors")
    kinds = graph_summary(tasks)
    work = sum(t.in_bytes for t in tasks)
    return {
        "tasks": kinds.pop("tasks"),
        "by_kind": ", ".join(f"{k} {v:,}" for k, v in kinds.items()),
        "bytes_per_task": format_size(work // max(1, len(tasks))),
        "tasks_per_worker": f"~{-(-len(tasks) // workers):,}",
        "worker_buffers": f"{format_size(p.peak_bytes)} (budget {format_size(p.memory_budget)} per worker)",
        "worker_memory_limit": format_size(worker_memory_limit(p.memory_budget)),
    }
