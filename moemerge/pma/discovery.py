"""Find the snapshots of a training run (glob or prefix, local or object storage) and choose
the window to average: the last N, spaced by an interval, before a step (PMA-init).

The step comes from the directory name (`step-00042000`, `step_42000`, `global_step42000`,
`iter_0042000`, `checkpoint-42000`, or a user regex with one group). A snapshot still being
written (no safetensors index or single file, no DCP `.metadata`, no Zarr `zarr.json`, or an
index naming shards not there yet) is skipped with a note, never half-read; so is one whose
files change size or time between the listing and the re-stat just before the snapshots are
returned (a copy or sync still writing). Symlinked snapshot directories (local) are followed:
the link's name gives the step, its target is listed.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from moemerge.errors import CheckpointError, ConfigError
from moemerge.io import storage
from moemerge.io.checkpoint import INDEX_NAME, SINGLE_NAME
from moemerge.io.limits import MAX_JSON_BYTES, read_limited

__all__ = ["Snapshot", "discover", "select", "interval_steps_from_tokens", "parse_step",
           "STEP_STYLES", "restat"]

STEP_STYLES = "step-00042000, step_42000, global_step42000, iter_0042000, checkpoint-42000"
# The names training frameworks give their checkpoint directories: Megatron (`iter_0042000`),
# DeepSpeed (`global_step42000`), HF Trainer (`checkpoint-42000`), torchtitan (`step-42000`).
# A `.zarr` suffix is allowed so that moemerge's own Zarr outputs can be snapshots too.
_BUILTIN_STEP = re.compile(r"(?:global_step|step|iter|checkpoint)[-_]?(\d+)(?:\.zarr)?", re.I)
_GLOB_CHARS = re.compile(r"[*?\[]")
DCP_METADATA = ".metadata"
ZARR_JSON = "zarr.json"
_LIST_THREADS = 16  # parallel directory listings on object storage (one LIST per snapshot)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One snapshot of a training run: its step and where it is (a local path or a URL)."""

    step: int
    url: str


def parse_step(name: str, step_regex: str | re.Pattern[str] | None = None) -> int | None:
    """The training step in a directory name, or None: `global_step42000` -> 42000.

    With `step_regex`, its one group (searched anywhere in the name) is the step.
    """
    if step_regex is None:
        m = _BUILTIN_STEP.fullmatch(name)
    else:
        m = _compile_step_regex(step_regex).search(name)
    if m is None or m.group(1) is None:
        return None
    try:
        return int(m.group(1))
    except ValueError:
        return None


def _compile_step_regex(step_regex: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(step_regex, re.Pattern):
        pat = step_regex
    else:
        try:
            pat = re.compile(step_regex)
        except re.error as e:
            raise ConfigError(f"--step-regex '{step_regex}' is not a valid regular expression ({e})") from e
    if pat.groups != 1:
        raise ConfigError(
            f"--step-regex '{pat.pattern}' has {pat.groups} groups; it needs exactly one, around "
            r"the step digits, e.g. 'ckpt_(\d+)' (use (?:...) for other groups)"
        )
    return pat


def _is_glob(pattern: str) -> bool:
    path = pattern.split("://", 1)[-1]
    return bool(_GLOB_CHARS.search(path))


Signature = tuple[tuple[str, str, str], ...]
"""(file name, size, time) of every file directly in a snapshot directory, sorted."""


def _signature(entries: list[dict[str, Any]]) -> Signature:
    return tuple(sorted(
        (posixpath.basename(str(e["name"]).rstrip("/")), str(e.get("size")),
         str(e.get("mtime", e.get("LastModified", e.get("ETag", "")))))
        for e in entries if e.get("type") == "file"))


def restat(fs: Any, url: str, path: str) -> Signature:
    """The snapshot's files as they are now (one listing): compared with the listing that judged
    it complete, a change means something is still writing it."""
    if hasattr(fs, "invalidate_cache"):  # s3fs & co. cache listings: ask the store again
        fs.invalidate_cache(path)
    entries = storage.with_retries(lambda: fs.ls(path, detail=True), what="list the snapshot", url=url)
    return _signature(list(entries))


def _inspect(fs: Any, url: str, path: str) -> tuple[str | None, Signature]:
    """(None if the snapshot at `path` is complete enough to open, else why not; its files)."""
    try:
        entries = list(storage.with_retries(lambda: fs.ls(path, detail=True), what="list the snapshot",
                                            url=url))
    except CheckpointError as e:
        return f"cannot list it ({e})", ()
    return _judge(fs, url, path, entries), _signature(entries)


def _completeness(fs: Any, url: str, path: str) -> str | None:
    """None if the snapshot at `path` is complete enough to open; else why it is not."""
    return _inspect(fs, url, path)[0]


def _judge(fs: Any, url: str, path: str, entries: list[dict[str, Any]]) -> str | None:
    names = {posixpath.basename(str(e["name"]).rstrip("/")) for e in entries}
    if ZARR_JSON in names or DCP_METADATA in names or SINGLE_NAME in names:
        return None
    if INDEX_NAME not in names:
        return (f"no {INDEX_NAME}, {SINGLE_NAME}, DCP {DCP_METADATA} or Zarr {ZARR_JSON} yet "
                "(still being written?)")
    # The index is written last by save_pretrained, but a copy or sync may bring it first:
    # every shard it names must be there too.
    index_path = storage.join(path, INDEX_NAME)
    try:
        doc = json.loads(storage.with_retries(
            lambda: read_limited(fs, index_path, where=f"{url}/{INDEX_NAME}", limit=MAX_JSON_BYTES,
                                 what=INDEX_NAME) or b"",
            what=f"read {INDEX_NAME}", url=url))
        wanted = set(doc["weight_map"].values())
    except (CheckpointError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{INDEX_NAME} is not readable yet ({e})"
    missing = sorted(f for f in wanted if f not in names)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{INDEX_NAME} names {missing[0]}{more}, not there yet (still being written?)"
    return None


def _candidates(fs: Any, path: str, pattern: str) -> list[str]:
    """Directories matching a glob, or the child directories of a prefix."""
    if _is_glob(pattern):
        found = storage.with_retries(lambda: fs.glob(path, detail=True), what="expand the pattern",
                                     url=pattern, error=ConfigError)
        return sorted(p for p, info in found.items() if _is_dir(info))
    if not storage.with_retries(lambda: fs.isdir(path), what="look up the prefix", url=pattern,
                                error=ConfigError):
        raise ConfigError(
            f"{pattern}: no such directory or prefix; give a glob of snapshot directories "
            "(quote it: 'ckpt/step-*') or the directory that holds them"
        )
    entries = storage.with_retries(lambda: fs.ls(path.rstrip("/"), detail=True),
                                   what="list the prefix", url=pattern, error=ConfigError)
    return sorted(str(e["name"]).rstrip("/") for e in entries if _is_dir(e))


def _is_dir(info: dict[str, Any]) -> bool:
    """A directory, or (local) a symlink to one: fsspec reports a link as type `other`."""
    if info.get("type") == "directory":
        return True
    return bool(info.get("islink")) and os.path.isdir(str(info["name"]))  # isdir follows the link


def _listed(fs: Any, p: str) -> str:
    """Where to list candidate `p`: a local symlink's target (fsspec lists a link as empty)."""
    if storage.is_local(fs) and os.path.islink(p):
        return os.path.realpath(p)
    return p


def discover(pattern: str, *, storage_options: dict[str, Any] | None = None,
             step_regex: str | None = None) -> tuple[list[Snapshot], list[str]]:
    """Snapshots matching a glob or prefix (local or fsspec URL), sorted by step;
    plus human-readable notes about what was skipped and why."""
    regex = _compile_step_regex(step_regex) if step_regex is not None else None
    try:
        fs, path = storage.resolve(pattern, storage_options)
    except Exception as e:  # bad protocol, missing driver, bad options
        raise ConfigError(storage.redact(f"{pattern}: cannot open this location ({e})",
                                         storage_options)) from e
    remote = "://" in pattern
    def to_url(p: str) -> str:
        return str(fs.unstrip_protocol(p)) if remote else p
    notes: list[str] = []
    named: list[tuple[int, str, str]] = []  # (step, url, path)
    for p in _candidates(fs, path, pattern):
        name = posixpath.basename(p)
        step = parse_step(name, regex)
        if step is None:
            how = f"--step-regex '{regex.pattern}'" if regex else f"the known styles ({STEP_STYLES})"
            notes.append(f"skipped {to_url(p)}: no step number in the name {name!r} by {how}")
            continue
        named.append((step, to_url(p), _listed(fs, p)))

    def each(fn: Any, items: list[tuple[int, str, str]]) -> list[Any]:
        if remote and len(items) > 1:  # one LIST per snapshot, in parallel on object storage
            with ThreadPoolExecutor(min(_LIST_THREADS, len(items))) as pool:
                return list(pool.map(lambda s: fn(fs, s[1], s[2]), items))
        return [fn(fs, url, p) for _, url, p in items]

    judged = each(_inspect, named)
    complete = [n for n, (reason, _) in zip(named, judged) if reason is None]
    # the re-stat: a snapshot judged complete whose files changed since is still being written
    # (a sync that brought the index early, a writer that appends after its index); skip it
    now = dict(zip((u for _, u, _ in complete), each(_restat_or_none, complete)))
    snaps: dict[int, Snapshot] = {}
    for (step, url, _), (reason, sig) in zip(named, judged):
        if reason is None and now.get(url) != sig:
            reason = ("its files changed while it was being listed (still being written?); it is "
                      "taken once they stop changing")
        if reason is not None:
            notes.append(f"skipped {url} (step {step}): {reason}")
            continue
        if step in snaps:
            raise ConfigError(
                f"step {step} appears twice: {snaps[step].url} and {url}; remove or rename one, "
                "or narrow the pattern"
            )
        snaps[step] = Snapshot(step, url)
    return [snaps[s] for s in sorted(snaps)], notes


def _restat_or_none(fs: Any, url: str, path: str) -> Signature | None:
    try:
        return restat(fs, url, path)
    except CheckpointError:
        return None  # unlistable now: not the same as before, so skipped with the note


def _positive_int(value: int | None, flag: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")


def select(snapshots: list[Snapshot], *, last: int | None = None,
           interval_steps: int | None = None, before_step: int | None = None) -> list[Snapshot]:
    """before_step keeps steps < S; interval keeps snapshots spaced >= interval apart counting
    back from the newest; then the last N, or all there are while fewer than N remain (a window
    still filling: the caller says so). Raises ConfigError when none remain, saying why."""
    _positive_int(last, "--last")
    _positive_int(interval_steps, "--interval-steps")
    if before_step is not None and (isinstance(before_step, bool) or not isinstance(before_step, int)):
        raise ConfigError(f"--before-step must be a whole number, got {before_step!r}")
    chosen = sorted(snapshots, key=lambda s: s.step)
    story = [f"{len(chosen)} snapshot{'s' if len(chosen) != 1 else ''} found"]
    if before_step is not None:
        chosen = [s for s in chosen if s.step < before_step]
        story.append(f"{len(chosen)} before step {before_step}")
    if interval_steps is not None and chosen:
        kept = [chosen[-1]]
        for s in reversed(chosen[:-1]):
            if kept[-1].step - s.step >= interval_steps:
                kept.append(s)
        chosen = kept[::-1]
        story.append(f"{len(chosen)} spaced >= {interval_steps} steps apart counting back from "
                     f"step {kept[0].step}")
    if not chosen:
        raise ConfigError(f"no snapshots to average: {', '.join(story)}; check the pattern and "
                          "--before-step")
    return chosen[-last:] if last is not None else chosen


def interval_steps_from_tokens(interval_tokens: float, tokens_per_step: float) -> int:
    """Steps between snapshots for a spacing of `interval_tokens` tokens, rounded up so that
    snapshots are at least that many tokens apart: (80e9, 4e6) -> 20000."""
    try:
        # decimal from the printed value: 1.1e9 / 1e8 is exactly 11, not 11.000000000000002
        tokens, per = Decimal(repr(float(interval_tokens))), Decimal(repr(float(tokens_per_step)))
    except (InvalidOperation, TypeError, ValueError) as e:
        raise ConfigError(f"--interval-tokens / --tokens-per-step must be numbers ({e})") from e
    if not tokens.is_finite() or tokens <= 0:
        raise ConfigError(f"--interval-tokens must be a positive number of tokens, got {interval_tokens!r}")
    if not per.is_finite() or per <= 0:
        raise ConfigError(f"--tokens-per-step must be a positive number of tokens, got {tokens_per_step!r}")
    q = tokens / per
    steps = int(q) if q == q.to_integral_value() else int(q) + 1
    return max(1, steps)
