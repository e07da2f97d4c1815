"""From what a user typed to the snapshots to average: one glob or prefix (discovered, then the
window selected: last N, interval, before a step) or an explicit list (taken as given).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moemerge.errors import ConfigError, NotReadyError
from moemerge.io import storage
from moemerge.pma.discovery import (
    Snapshot,
    _completeness,
    _is_glob,
    _listed,
    discover,
    interval_steps_from_tokens,
    parse_step,
    select,
)
from moemerge.settings import DEFAULT_LAST, DEFAULT_MIN_SNAPSHOTS, EXIT_NOT_READY

__all__ = ["Window", "Chosen", "choose", "not_ready", "window_note", "check_min_snapshots", "DEFAULT_LAST"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """Which snapshots of a run to average (the `pma` selection flags)."""

    last: int | None = None
    """Keep the newest N (default DEFAULT_LAST for a pattern; all of an explicit list)."""
    interval_steps: int | None = None
    """Keep snapshots at least this many steps apart, counting back from the newest."""
    interval_tokens: float | None = None
    """The same spacing in tokens; needs `tokens_per_step`."""
    tokens_per_step: float | None = None
    """Tokens per training step (global batch x sequence length)."""
    before_step: int | None = None
    """Keep only steps < S (PMA-init: merge the snapshots before a loss spike at S)."""
    step_regex: str | None = None
    """A regex with one group that finds the step in a directory name."""
    min_snapshots: int = DEFAULT_MIN_SNAPSHOTS
    """Fewer snapshots than this is "nothing to do yet" (NotReadyError, exit 3); from this many
    up to `last`, the window is still filling and what there is is averaged."""

    def interval(self) -> int | None:
        """The spacing in steps, from `interval_steps` or the token flags."""
        if self.interval_tokens is not None or self.tokens_per_step is not None:
            if self.interval_tokens is None or self.tokens_per_step is None:
                raise ConfigError("--interval-tokens and --tokens-per-step go together; give both "
                                  "(e.g. --interval-tokens 80e9 --tokens-per-step 4e6)")
            if self.interval_steps is not None:
                raise ConfigError("give the interval once: --interval-steps or --interval-tokens, "
                                  "not both")
            return interval_steps_from_tokens(self.interval_tokens, self.tokens_per_step)
        return self.interval_steps

    @property
    def selects(self) -> bool:
        """Whether any flag narrows the snapshots (so steps are needed)."""
        return (self.last is not None or self.interval_steps is not None or self.before_step is not None
                or self.interval_tokens is not None or self.tokens_per_step is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chosen:
    """The snapshots to average, oldest first, with their steps (None: not in the name)."""

    urls: tuple[str, ...]
    steps: tuple[int | None, ...]
    notes: tuple[str, ...] = ()
    pattern: str | None = None
    """The glob or prefix they were discovered from; None for an explicit list."""
    selection: dict[str, Any] = field(default_factory=dict)
    """The effective selection (for the manifest): last, interval_steps, before_step."""
    window_of: int | None = None
    """The window size asked for (--last, or its default for a pattern); None: no --last."""

    @property
    def filling(self) -> bool:
        """Fewer snapshots than the window holds: the window is still filling."""
        return self.window_of is not None and len(self.urls) < self.window_of

    @property
    def window(self) -> str:
        """'window 2 of 4' (for the printout and the manifest); '3 snapshot(s)' with no --last."""
        if self.window_of is None:
            return f"{len(self.urls)} snapshot(s)"
        return f"window {len(self.urls)} of {self.window_of}"


def check_min_snapshots(min_snapshots: int, last: int | None) -> None:
    """`--min-snapshots K`: a whole number >= 1, at most the window (it would never fill)."""
    if isinstance(min_snapshots, bool) or not isinstance(min_snapshots, int) or min_snapshots < 1:
        raise ConfigError(f"--min-snapshots must be a whole number >= 1, got {min_snapshots!r}")
    if last is not None and min_snapshots > last:
        raise ConfigError(f"--min-snapshots {min_snapshots} is more than --last {last}: the window never "
                          "holds that many; lower --min-snapshots or raise --last")


def window_note(n: int, last: int | None) -> str | None:
    """The note of a window still filling, None when full (or no --last)."""
    if last is None or n >= last:
        return None
    return (f"window {n} of {last}: fewer snapshots than --last {last} so far; averaging the {n} there "
            f"{'is' if n == 1 else 'are'} (the window slides once {last} exist)")


def not_ready(n: int, min_snapshots: int, where: str) -> NotReadyError:
    """The error of fewer than --min-snapshots snapshots: nothing to do yet (exit 3)."""
    return NotReadyError(
        f"{where}: nothing to do yet: {n} snapshot{'s' if n != 1 else ''} found, --min-snapshots is "
        f"{min_snapshots}; nothing was written (exit status {EXIT_NOT_READY}); rerun when more "
        "snapshots exist")


def _is_pattern(location: str, storage_options: dict[str, Any] | None) -> bool:
    """A glob, or a directory that is not itself a checkpoint (a prefix of snapshots)."""
    if _is_glob(location):
        return True
    try:
        fs, path = storage.resolve(location, storage_options)
    except Exception:
        return False  # Checkpoint.open reports the bad location in its own words
    path = path.rstrip("/") or path
    try:
        if not fs.isdir(path):
            return False
    except Exception:
        return False
    return _completeness(fs, location, _listed(fs, path)) is not None


def choose(locations: Sequence[str], window: Window, *,
           storage_options: dict[str, Any] | None = None, min_last: int | None = None) -> Chosen:
    """The snapshots to average, oldest first.

    One glob or prefix: discovered, sorted by step, then `window` selects (default: the last
    DEFAULT_LAST, or `min_last` when given, e.g. the number of explicit weights); while fewer
    exist, all of them (the window is still filling; `Chosen.filling`). None found is
    NotReadyError ("nothing to do yet", exit 3). A list of directories: taken in the order
    given; selection flags need every name to carry a step. `window.min_snapshots` is checked
    by the caller (a dry run lists what there is first).
    """
    if not locations:
        raise ConfigError("pma: give the snapshot directories (oldest first) or one pattern, "
                          "e.g. 'ckpt/step-*'")
    interval = window.interval()
    if len(locations) == 1 and _is_pattern(locations[0], storage_options):
        pattern = locations[0]
        found, notes = discover(pattern, storage_options=storage_options, step_regex=window.step_regex)
        last = window.last if window.last is not None else (min_last or DEFAULT_LAST)
        check_min_snapshots(window.min_snapshots, last)
        if not found:
            why = ("; " + "; ".join(notes[:5]) + (" ..." if len(notes) > 5 else "")) if notes else ""
            # a nightly job started with the run: not an error (exit 3), but say how to check
            raise NotReadyError(
                f"{pattern}: nothing to do yet: no finished snapshot directories match{why}; nothing was "
                f"written (exit status {EXIT_NOT_READY}); if snapshots exist, check the pattern and quote "
                "it so that the shell does not expand it")
        try:
            snaps = select(found, last=last, interval_steps=interval, before_step=window.before_step)
        except ConfigError as e:
            skipped = ("; " + "; ".join(notes[:5]) + (" ..." if len(notes) > 5 else "")) if notes else ""
            raise ConfigError(f"{pattern}: {e}{skipped}") from e
        note = window_note(len(snaps), last)
        return Chosen(urls=tuple(s.url for s in snaps), steps=tuple(s.step for s in snaps),
                      notes=tuple(notes) + ((note,) if note else ()), pattern=pattern, window_of=last,
                      selection={"last": last, "interval_steps": interval, "before_step": window.before_step})
    steps = [parse_step(posixpath.basename(str(loc).rstrip("/")), window.step_regex) for loc in locations]
    if not window.selects:
        notes = []
        known = [s for s in steps if s is not None]
        if len(known) == len(steps) and known != sorted(known):
            notes.append("the snapshots are listed out of step order; weights follow the order given "
                         "(oldest first); quote a pattern ('ckpt/step-*') to have them sorted by step")
        return Chosen(urls=tuple(locations), steps=tuple(steps), notes=tuple(notes))
    for loc, step in zip(locations, steps):
        if step is None:
            raise ConfigError(
                f"{loc}: no step number in the name, so --last / --interval / --before-step cannot "
                "choose among the listed snapshots; rename it, pass --step-regex, or list only the "
                "snapshots to average"
            )
    by_step: dict[int, str] = {}
    for loc, step in zip(locations, steps):
        if step in by_step:
            raise ConfigError(f"step {step} appears twice: {by_step[step]} and {loc}; list each step once")
        by_step[step] = loc  # type: ignore[index]
    check_min_snapshots(window.min_snapshots, window.last)
    snaps = select([Snapshot(s, u) for s, u in by_step.items()], last=window.last,
                   interval_steps=interval, before_step=window.before_step)
    note = window_note(len(snaps), window.last)
    return Chosen(urls=tuple(s.url for s in snaps), steps=tuple(s.step for s in snaps),
                  notes=(note,) if note else (), window_of=window.last,
                  selection={"last": window.last, "interval_steps": interval,
                             "before_step": window.before_step})
