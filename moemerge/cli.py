"""The `moemerge` command: parses arguments, calls the API, prints. Decides nothing itself:
defaults come from `moemerge.settings`, checks and decisions from `moemerge.api`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from moemerge.errors import MoemergeError
from moemerge.settings import (DEFAULT_ALPHA, DEFAULT_BUDGET, DEFAULT_COPY_TOKENIZER, DEFAULT_DEVICE, DEFAULT_LAST,
                               DEFAULT_MIN_SNAPSHOTS, DEFAULT_PMA_METHOD, DEFAULT_SHARD_SIZE, DEFAULT_UNIT_BYTES,
                               DEFAULT_WRITE_MODEL_CARD, EXIT_NOT_READY, MERGEKIT_LOADER_FLAGS, MERGEKIT_NOT_NEEDED,
                               OUT_FORMATS, PMA_METHODS, QUANTIZE_CHOICES, VERSION)
from moemerge.sizes import parse_kmb

__all__ = ["main"]

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    """A rich Console made on first print: importing rich costs a tenth of a second that
    `--help` and `--version` (argparse's own output) never need."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return getattr(self._console, name)


def Table(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - rich's Table, imported when a table is printed
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


_err = cast("Console", _LazyConsole(stderr=True, highlight=False, soft_wrap=True))
_out = cast("Console", _LazyConsole(highlight=False, soft_wrap=True))


def _shard_size(text: str) -> str:
    """`--shard-size` as given, once known to be a size of at least `settings.MIN_SHARD_SIZE`."""
    from moemerge import settings
    from moemerge.errors import ConfigError
    from moemerge.sizes import parse_size

    try:
        parse_size(text, what="--shard-size", minimum=settings.MIN_SHARD_SIZE)
    except ConfigError as e:
        hint = ("; here B is bytes, so 1B is one byte: for MergeKit's units (1B = 10^9 bytes) write "
                "--out-shard-size 1B or --shard-size 1GB" if text.strip()[-1:] in "bB" else "")
        raise argparse.ArgumentTypeError(f"{e}{hint}") from None
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", default=DEFAULT_BUDGET,
                   help=f"memory for buffers, e.g. 128MB, 4GB (default {DEFAULT_BUDGET})")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, type=_shard_size,
                   help=f"largest output shard, at least 1MB (default {DEFAULT_SHARD_SIZE})")
    # MergeKit's spelling, same destination: the last one given wins
    p.add_argument("--out-shard-size", dest="shard_size", type=parse_kmb, metavar="SIZE",
                   help="largest output shard in MergeKit's units: K, M, B = thousands, millions, billions of "
                        "bytes (1B = 10^9 bytes, unlike --shard-size's 1B = one byte)")
    p.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0,
                   help="seed of random methods (DARE, DELLA); --random-seed is MergeKit's name")
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                   help="write weights quantized with fresh scales: like-input (the first input's layout; the "
                        "default when all inputs are quantized alike), fp8-block (128x128 block FP8), mxfp4 "
                        "(gpt-oss experts), or none (out dtype, no quantization_config)")


def _run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a finished output")
    p.add_argument("--device", default=DEFAULT_DEVICE, help=f"where the math runs: cpu or cuda (default {DEFAULT_DEVICE})")
    p.add_argument("--format", default=OUT_FORMATS[0], choices=OUT_FORMATS)
    _dask_opts(p)
    p.add_argument("--scheduler", default=None,
                   help="run on an existing Dask cluster (its address, e.g. tcp://10.0.0.5:8786)")
    p.add_argument("--dashboard", default=None, metavar="ADDRESS",
                   help="--workers: where the Dask dashboard listens (default 127.0.0.1, a free port; it has "
                        "no authentication), HOST:PORT, or off")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished (crashed or killed) run of the same merge into OUT, "
                        "keeping the tensors it had finished")
    p.add_argument("--hub-cache", default=None, metavar="DIR",
                   help="download the Hub models' files into DIR (huggingface_hub's cache layout) instead of "
                        "reading them in place with range requests")


def _mergekit_opts(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags, with MergeKit's meaning (`moemerge run` is a drop-in for it)."""
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=DEFAULT_COPY_TOKENIZER,
                   help="copy the tokenizer source's tokenizer files (default on)")
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=DEFAULT_WRITE_MODEL_CARD,
                   help="write README.md (Hub front matter, method, models, config) and mergekit_config.yml "
                        "(default on)")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="same as --device cuda")
    p.add_argument("-j", "--num-threads", type=int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the plan's notes")
    p.add_argument("--quiet", dest="no_progress", action="store_true", help="same as --no-progress")
    p.add_argument("--trust-remote-code", action="store_true", help=MERGEKIT_NOT_NEEDED["--trust-remote-code"])
    p.add_argument("--allow-crimes", action="store_true",
                   help="merge inputs whose config.json names different architectures (refused without it)")
    loader = p.add_argument_group("MergeKit loader flags", MERGEKIT_NOT_NEEDED["loader"])
    for flag in MERGEKIT_LOADER_FLAGS:  # collected by name, for one note
        if flag in ("--lora-merge-cache", "--transformers-cache"):  # these take a directory
            loader.add_argument(flag, dest="mergekit_loader", action="append", default=[], metavar="DIR",
                                type=_named(flag))
        else:
            loader.add_argument(flag, dest="mergekit_loader", action="append_const", const=flag, default=[])


def _named(flag: str) -> Callable[[str], str]:
    """An argparse `type` recording that `flag` was given (its value is not needed)."""
    def name(_value: str) -> str:
        return flag
    return name


def _mergekit_notes(args: argparse.Namespace) -> list[str]:
    """The notes for mergekit-yaml flags given that change nothing here."""
    notes = []
    if args.mergekit_loader:
        notes.append(f"{', '.join(args.mergekit_loader)}: {MERGEKIT_NOT_NEEDED['loader']}")
    if args.trust_remote_code:
        notes.append(f"--trust-remote-code: {MERGEKIT_NOT_NEEDED['--trust-remote-code']}")
    return notes


def _dask_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local Dask cluster of N worker processes (--memory-budget is per worker)")
    p.add_argument("--unit-size", default=None,
                   help=f"input bytes per Dask task (default about {DEFAULT_UNIT_BYTES // 10**6}MB); the output "
                        "does not depend on it")


def _pma_select_opts(p: argparse.ArgumentParser) -> None:
    """The selection and method flags of `pma` (and `pma update`)."""
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help=f"average the newest N snapshots (default {DEFAULT_LAST} for a pattern)")
    p.add_argument("--interval-steps", type=int, default=None, metavar="K",
                   help="keep snapshots at least K steps apart, counting back from the newest")
    p.add_argument("--interval-tokens", type=float, default=None, metavar="V",
                   help="keep snapshots at least V tokens apart (e.g. 80e9); needs --tokens-per-step")
    p.add_argument("--tokens-per-step", type=float, default=None, metavar="T",
                   help="tokens per training step (e.g. 4e6), for --interval-tokens")
    p.add_argument("--before-step", type=int, default=None, metavar="S",
                   help="only snapshots before step S (PMA-init after a loss spike at S)")
    p.add_argument("--step-regex", default=None, metavar="RE",
                   help=r"regex with one group finding the step in a directory name, e.g. 'ckpt(\d+)'")
    # defaults None so that `pma update` can tell a given setting from the state's (the API applies the defaults)
    p.add_argument("--schedule", "--method", dest="method", default=None, choices=PMA_METHODS,
                   help=f"the average (default {DEFAULT_PMA_METHOD}); linear and minus-sqrt are Megatron-LM's "
                        "coefficient schedules (README 'Schedules'); --method is its older name")
    p.add_argument("--min-snapshots", type=int, default=None, metavar="K",
                   help=f"fewer than K snapshots (default {DEFAULT_MIN_SNAPSHOTS}) is 'nothing to do yet': "
                        f"write nothing and exit with status {EXIT_NOT_READY}; from K up to --last, average "
                        "what there is (the window is filling)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="--weights: divide by their sum, which must be positive (the default); "
                        "--no-normalize uses them as given, negative ones included (Megatron's default)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"EMA weight of the newest snapshot (default {DEFAULT_ALPHA})")
    p.add_argument("--weights", default=None,
                   help="explicit weights, comma-separated, oldest first, negative allowed (see --normalize); "
                        "write a leading negative as --weights=-1,2")
    p.add_argument("--out-dtype", default=None, help="output dtype (default: the inputs')")
    p.add_argument("--dcp-prefix", default=None, metavar="P",
                   help="DCP snapshots: keep model keys under P and strip it (e.g. model.)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="DCP snapshots: rename tensor-name prefix OLD to NEW (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moemerge", description="Stream-merge huge model checkpoints in constant memory.")
    ap.add_argument("--version", action="version", version=f"moemerge {VERSION}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="merge as a MergeKit YAML config says")
    p.add_argument("config")
    p.add_argument("out")
    _common(p)
    _run_opts(p)
    _mergekit_opts(p)

    p = sub.add_parser("multi", help="run several named merges of one YAML file (MergeKit's mergekit-multi)",
                       description="Run the merges of a multi-document YAML file (documents separated by ---, "
                       "each with a `name:`; a reference to a name means that merge's output) in dependency "
                       "order, as MergeKit's mergekit-multi. A finished merge is kept only when its config and "
                       "input files are unchanged since it was made.")
    p.add_argument("config")
    p.add_argument("--intermediate-dir", "-I", required=True, metavar="DIR",
                   help="where the named merges are written (DIR/NAME)")
    p.add_argument("--out-path", default=None, metavar="OUT", help="the output of the unnamed (final) merge")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished merges whose config and inputs are unchanged (default on)")
    _common(p)
    _run_opts(p)
    _mergekit_opts(p)

    p = sub.add_parser("plan", help="dry run: what will be read and written, how much memory")
    p.add_argument("config")
    p.add_argument("out", nargs="?", default=None, help="the output location (how Dask splits work depends on it)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-crimes", action="store_true",
                   help="plan a merge of inputs whose config.json names different architectures")
    p.add_argument("--format", default=OUT_FORMATS[0], choices=OUT_FORMATS)
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help="cuda: also print the device memory the merge needs there (engine/device.py)")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="same as --device cuda")
    p.add_argument("--disk-speed", default=None, type=_disk_speed, metavar="RATE",
                   help="read and write rate the time estimate assumes, per second, e.g. 500MB or 2GB (default 1GB)")
    _common(p)
    _dask_opts(p)

    p = sub.add_parser("pma", help="average training snapshots (SMA / WMA / EMA)",
                       description="Average the snapshots of one training run. Give the snapshot "
                       "directories oldest first, or one quoted glob or prefix ('ckpt/step-*', "
                       "s3://b/run/ckpt/) to discover them by the step in their names. "
                       "`moemerge pma update STATE PATTERN -o OUT` updates a running average. "
                       f"Exit status: 0 done, 1 error, {EXIT_NOT_READY} nothing to do yet (fewer snapshots "
                       "than --min-snapshots; nothing written).")
    p.add_argument("snapshots", nargs="+", help="snapshot directories oldest first, or one glob/prefix")
    p.add_argument("-o", "--out", default=None, help="output directory")
    _pma_select_opts(p)
    p.add_argument("--dry-run", action="store_true", help="print the snapshots, weights and plan; write nothing")
    p.add_argument("--recompute-every", type=int, default=None, metavar="K",
                   help="pma update: recompute the state exactly from the window every K updates (SMA/WMA)")
    _common(p)
    _run_opts(p)

    p = sub.add_parser("inspect", help="list a checkpoint's tensors")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="convert a moemerge Zarr output to a safetensors directory")
    p.add_argument("store", help="the Zarr output (local path or URL)")
    p.add_argument("out", help="the safetensors directory to write")
    p.add_argument("--shard-size", default=None, type=_shard_size,
                   help="largest output shard, at least 1MB (default: the shards the merge planned)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished output")

    p = sub.add_parser("verify", help="check an output against its manifest checksums")
    p.add_argument("out")

    p = sub.add_parser("demo", help="make three small MoE checkpoints, merge and average them")
    p.add_argument("dir", nargs="?", default="moemerge-demo")
    return ap


def _disk_speed(text: str) -> int:
    """`--disk-speed` as bytes per second (`500MB`, `2GB`; a trailing `/s` is allowed)."""
    from moemerge.errors import ConfigError
    from moemerge.sizes import parse_size

    try:
        return parse_size(text.removesuffix("/s"), what="--disk-speed", minimum=1)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print_plan(plan: Any, header: str, disk_speed: int | None = None) -> None:
    from moemerge.sizes import format_size

    t = Table(title=header, show_header=False, box=None)
    t.add_row("method", plan.method)
    for i, s in enumerate(plan.sources):
        t.add_row("input" if i == 0 else "", s)
    t.add_row("tensors", f"{len(plan.tensors):,}")
    t.add_row("output shards", f"{len(plan.shards)}")
    t.add_row("work units", f"{len(plan.units):,}")
    t.add_row("read", format_size(plan.bytes_read))
    t.add_row("write", format_size(plan.bytes_written))
    t.add_row("statistics passes", f"{plan.passes}")
    if (plan.quantize or "none") != "none":  # --quantize (or its default): the output's layout
        t.add_row("quantize", plan.quantize)
    t.add_row("memory", f"buffers {format_size(plan.peak_bytes)} (budget {format_size(plan.memory_budget)})")
    # planner/estimate.py: measured per-element costs of the method on a 2-core machine
    e = plan.estimate(disk_speed=disk_speed)
    total = f"{e.total_s:,.{1 if e.total_s < 10 else 0}f}"
    t.add_row("estimate", f"~{total} s = {e.startup_s:g} s start-up + the longer of (overlapped):")
    t.add_row("", f"I/O {e.io_s:,.1f} s (read + write at {format_size(e.disk_speed)}/s; --disk-speed)")
    t.add_row("", f"compute {e.compute_s:,.1f} s ({e.family} costs, {e.threads} thread(s) of {e.cores} cores)")
    _out.print(t)
    for w in plan.warnings:
        _err.print(f"[yellow]warning:[/] {w}")
    for n in plan.notes:
        _err.print(f"note: {n}")


def _dask_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"workers": args.workers, "scheduler": args.scheduler, "unit_size": args.unit_size,
            "dashboard": args.dashboard}


def _run_kw(args: argparse.Namespace) -> dict[str, Any]:
    """`api.run`'s settings from the flags `run` and `multi` share (all but config, out, overwrite, resume)."""
    if getattr(args, "hub_cache", None):  # read when a Hub model is opened (Dask workers inherit it)
        from moemerge.api import use_hub_cache

        use_hub_cache(args.hub_cache)
    return {"memory_budget": args.memory_budget, "shard_size": args.shard_size, "seed": args.seed,
            "device": args.device, "progress": not args.no_progress, "out_format": args.format,
            "quantize": args.quantize, "copy_tokenizer": args.copy_tokenizer, "model_card": args.write_model_card,
            "num_threads": args.num_threads, "allow_crimes": args.allow_crimes, **_dask_kw(args)}


def _cmd_run(args: argparse.Namespace) -> None:
    from moemerge.api import run

    for n in _mergekit_notes(args):
        _err.print(f"note: {n}", markup=False)
    res = run(args.config, args.out, overwrite=args.overwrite, resume=args.resume, **_run_kw(args))
    _report(res)
    if args.verbose:
        for n in res.plan.notes:
            _err.print(f"note: {n}", markup=False)


def _cmd_multi(args: argparse.Namespace) -> None:
    from moemerge.multi import Decision, run_multi

    for n in _mergekit_notes(args):
        _err.print(f"note: {n}", markup=False)

    def said(d: Decision) -> None:
        if d.action == "keep":
            _out.print(f"kept {d.doc.label}: {d.doc.out} ({d.why})", markup=False)
        else:
            _out.print(f"running {d.doc.label} -> {d.doc.out}" + (f" ({d.why})" if d.why else ""), markup=False)

    for _, res in run_multi(args.config, intermediate_dir=args.intermediate_dir, out_path=args.out_path,
                            lazy=args.lazy, overwrite=args.overwrite, resume=args.resume, on_decision=said,
                            **_run_kw(args)):
        if res is not None:
            _report(res)


def _report(res: Any) -> None:
    from moemerge.sizes import format_size

    for w in res.plan.warnings:
        _err.print(f"[yellow]warning:[/] {w}")
    rate = res.plan.bytes_read / res.seconds if res.seconds else 0.0
    _out.print(
        f"wrote {res.out}: {len(res.plan.tensors):,} tensors in {len(res.plan.shards)} shard(s), "
        f"{format_size(res.plan.bytes_written)} in {res.seconds:.1f}s ({format_size(rate)}/s read)"
    )
    if getattr(res, "resumed", None) is not None:  # --resume: what was kept after re-reading it
        _out.print(res.resumed.message, markup=False)


def _device_need(plan: Any, device: str) -> dict[str, Any]:
    """`plan --device cuda`: the device memory a run there needs (none for the CPU)."""
    if device == "cpu":
        return {}
    from moemerge.api import device_bytes

    return {"device": device, "device_bytes": device_bytes(plan)}


def _cmd_plan(args: argparse.Namespace) -> None:
    from moemerge.api import plan, plan_split

    p = plan(args.config, memory_budget=args.memory_budget, shard_size=args.shard_size, seed=args.seed,
             unit_size=args.unit_size, out_format=args.format, quantize=args.quantize,
             allow_crimes=args.allow_crimes)
    dask = plan_split(p, args.workers, args.out) if args.workers else None
    dev = _device_need(p, args.device)
    if args.json:
        summary = p.summary(disk_speed=args.disk_speed)
        _out.print_json(json.dumps({**summary, **({"dask": dask} if dask else {}), **dev}))
        return
    _print_plan(p, f"plan for {args.config}", args.disk_speed)
    if dev:
        from moemerge.sizes import format_size

        _out.print(f"device memory on {args.device}: {format_size(dev['device_bytes'])} (one chunk's inputs "
                   "and output, the compute buffers and temporaries; checked against the free memory when "
                   "the merge starts)")
    if dask:
        t = Table(title=f"on Dask, {args.workers} worker(s)", show_header=False, box=None)
        for k, v in dask.items():
            t.add_row(k.replace("_", " "), str(v))
        _out.print(t)


def _print_snapshots(chosen: Any, weights: list[float], title: str) -> None:
    t = Table(title=title, box=None)
    t.add_column("step", justify="right")
    t.add_column("snapshot", overflow="fold")
    t.add_column("weight", justify="right")
    for step, url, w in zip(chosen.steps, chosen.urls, weights):
        t.add_row("-" if step is None else str(step), url, f"{w:.6f}")
    _out.print(t)


def _cmd_pma(args: argparse.Namespace) -> None:
    from moemerge.api import plan, pma_job, run

    if args.snapshots[0] == "update":  # `moemerge pma update STATE PATTERN -o OUT`
        _cmd_pma_update(args)
        return
    job = pma_job(args.snapshots, out=args.out, dry_run=args.dry_run, method=args.method, alpha=args.alpha,
                  weights=args.weights, out_dtype=args.out_dtype, dcp_prefix=args.dcp_prefix, rename=args.rename,
                  last=args.last, interval_steps=args.interval_steps, interval_tokens=args.interval_tokens,
                  tokens_per_step=args.tokens_per_step, before_step=args.before_step, step_regex=args.step_regex,
                  on_note=lambda n: _err.print(f"note: {n}", markup=False), min_snapshots=args.min_snapshots,
                  normalize=args.normalize)
    _print_snapshots(job.chosen, job.weights, f"{job.title} over {job.chosen.window}, oldest first")
    if job.not_ready is not None:  # a dry run listed what there is; the run would stop here
        from moemerge.errors import NotReadyError

        raise NotReadyError(job.not_ready)
    if args.dry_run:
        _print_plan(plan(job.config, memory_budget=args.memory_budget, shard_size=args.shard_size,
                         quantize=args.quantize), "plan")
        return
    res = run(job.config, args.out, memory_budget=args.memory_budget, shard_size=args.shard_size, seed=args.seed,
              overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
              out_format=args.format, manifest_extra={"pma": job.record}, resume=args.resume, quantize=args.quantize,
              **_dask_kw(args))
    _report(res)


def _cmd_pma_update(args: argparse.Namespace) -> None:
    """`moemerge pma update STATE PATTERN -o OUT [flags]` (flags left out come from the state)."""
    from moemerge.api import pma_update
    from moemerge.errors import ConfigError
    from moemerge.sizes import format_size

    if len(args.snapshots) != 3 or not args.out:
        raise ConfigError("pma update: usage is `moemerge pma update STATE PATTERN -o OUT` (STATE: where the "
                          "running state lives; PATTERN: a quoted glob or prefix of snapshot directories)")
    _, state, pattern = args.snapshots
    res = pma_update(state, pattern, args.out, method=args.method, last=args.last, alpha=args.alpha,
                     interval_steps=args.interval_steps, interval_tokens=args.interval_tokens,
                     tokens_per_step=args.tokens_per_step, before_step=args.before_step,
                     step_regex=args.step_regex, recompute_every=args.recompute_every,
                     memory_budget=args.memory_budget, shard_size=args.shard_size, out_format=args.format,
                     out_dtype=args.out_dtype, overwrite=args.overwrite, progress=not args.no_progress,
                     dcp_prefix=args.dcp_prefix, rename=args.rename, weights=args.weights, dry_run=args.dry_run,
                     quantize=args.quantize, workers=args.workers, scheduler=args.scheduler,
                     min_snapshots=args.min_snapshots, normalize=args.normalize)
    for n in res.notes:
        _err.print(f"note: {n}", markup=False)
    if res.action != "noop":
        t = Table(title=f"{res.settings.method} over {len(res.steps)} snapshot(s), oldest first", box=None)
        t.add_column("step", justify="right")
        t.add_column("weight", justify="right")
        for step, w in zip(res.steps, res.weights):
            t.add_row(str(step), f"{w:.6f}")
        _out.print(t)
    _out.print(f"{res.message} (state version {res.version}); read {format_size(res.bytes_read)} of snapshots "
               f"and {format_size(res.state_bytes_read)} of state in {res.seconds:.1f}s", markup=False)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from moemerge.api import inspect
    from moemerge.sizes import format_size

    from moemerge.render import print_json_list, print_table

    infos = inspect(args.path)
    if args.json:  # streamed, as print_json would print the whole list (92k tensors: 2.8 GB that way)
        print_json_list(_out, ({"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "bytes": i.nbytes,
                                "file": i.file} for i in infos))
        return
    columns = [(col, "right" if col == "bytes" else "left") for col in ("name", "dtype", "shape", "bytes", "shard")]
    print_table(_out, args.path, columns,
                [(i.name, i.dtype, str(list(i.shape)), format_size(i.nbytes), i.file) for i in infos])
    _out.print(f"{len(infos):,} tensors, {format_size(sum(i.nbytes for i in infos))}")


def _cmd_export(args: argparse.Namespace) -> None:
    from moemerge.export import export
    from moemerge.sizes import format_size

    res = export(args.store, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    _out.print(f"wrote {res.out}: {res.tensors:,} tensors in {len(res.shards)} shard(s), "
               f"{format_size(res.bytes_written)}")


def _cmd_verify(args: argparse.Namespace) -> None:
    from moemerge.verify import verify

    n = verify(args.out)
    _out.print(f"{args.out}: {n:,} tensors match the manifest")


def _cmd_demo(args: argparse.Namespace) -> None:
    from moemerge.demo import run_demo

    run_demo(args.dir, console=_out)


_COMMANDS = {
    "run": _cmd_run, "multi": _cmd_multi, "plan": _cmd_plan, "pma": _cmd_pma, "inspect": _cmd_inspect,
    "export": _cmd_export, "verify": _cmd_verify, "demo": _cmd_demo,
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every `finally` (writers closed,
    uploads aborted, the output lock released) runs the same way."""


def _on_sigterm(signum: int, frame: Any) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = _parser().parse_args(argv)
    # `run`, `pma` and `pma update` load torch once the plan is made and its first reads are
    # asked for (engine/prefetch.py); `multi` now
    if args.command == "multi" and not getattr(args, "dry_run", False):
        from moemerge._startup import load_torch_quietly

        load_torch_quietly()  # these compute: torch loads now, without the collector's rescans
    previous = None
    if threading.current_thread() is threading.main_thread():  # only there can Python take signals
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _COMMANDS[args.command](args)
    except MoemergeError as e:
        from moemerge.errors import NotReadyError

        if isinstance(e, NotReadyError):  # not a failure: a nightly job before its first snapshots
            _err.print(f"moemerge: {e}", markup=False)
            return EXIT_NOT_READY
        _err.print(f"moemerge: error: {e}", markup=False)
        return 1
    except KeyboardInterrupt as e:  # SIGINT (130) or SIGTERM (143); say what is on disk
        term = isinstance(e, _Terminated)
        state = getattr(e, "moemerge_state", None) or "nothing new was committed"
        _err.print(f"moemerge: {'terminated (SIGTERM)' if term else 'interrupted'}; {state}", markup=False)
        return 143 if term else 130
    except OSError as e:  # storage failures that escaped our wrappers: one line, no traceback
        _err.print(f"moemerge: error: {e}", markup=False)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
