"""What a `pma update` will do, decided from settings, names and the state's metadata alone.

Pure functions (no storage, no tensor data): the settings an update runs with (given, else the
state's, else the defaults; a difference from the state's is refused) and which snapshots enter
and leave the sums. `pma.update` carries the decision out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moemerge.errors import ConfigError
from moemerge.names import DcpNames
from moemerge.pma.choose import check_min_snapshots, not_ready, window_note
from moemerge.pma.discovery import Snapshot, select
from moemerge.pma.state import METHOD_ARRAYS, StateMeta, StateSettings
from moemerge.settings import DEFAULT_ALPHA, DEFAULT_LAST, DEFAULT_MIN_SNAPSHOTS, DEFAULT_PMA_METHOD, PMA_METHODS

__all__ = ["Action", "Decision", "resolve_settings", "decide", "window_record", "RECOMPUTED",
           "DEFAULT_LAST", "DEFAULT_ALPHA"]

#: Schedules with no exact or bounded running form: every weight changes when the window moves
#: (minus-sqrt's c_j = sqrt((j+1)/N) - sqrt(j/N)), so each update recomputes from the window.
RECOMPUTED = frozenset({"minus-sqrt"})


Action = Literal["build", "incremental", "noop"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What an update will do, decided from names and the state's metadata alone."""

    action: Action
    window: tuple[Snapshot, ...]
    """The snapshots in the sums after the update, oldest first."""
    added: tuple[Snapshot, ...] = ()
    leaving: tuple[Snapshot, ...] = ()
    """SMA/WMA incremental: the oldest snapshots leaving the window, one per added, in order."""
    skipped: tuple[int, ...] = ()
    reason: str = ""
    notes: tuple[str, ...] = ()
    """What the printout says besides: a window still filling, a schedule recomputed."""

    @property
    def growing(self) -> int:
        """SMA/WMA incremental: the added snapshots that fill the window (no partner leaving);
        they enter first, the rest slide against `leaving`."""
        return len(self.added) - len(self.leaving) if self.action == "incremental" else 0


def window_record(settings: StateSettings, n: int) -> dict[str, object]:
    """The manifest's account of the window: 'window 2 of 4', still filling or not, and how
    the update computes the schedule (incremental, or recomputed from the window)."""
    last = settings.last
    return {"window": f"window {n} of {last}" if last is not None else f"{n} snapshot(s)",
            "filling": last is not None and n < last and settings.method != "ema",
            "incremental": "recomputed from the window each update" if settings.method in RECOMPUTED
            else "exact running sums" if settings.method != "ema" else "running EMA (error bounded)"}

def resolve_settings(*, method: str | None, last: int | None, alpha: float | None,
                     interval_steps: int | None, recorded: StateSettings | None,
                     dcp: DcpNames | None = None) -> StateSettings:
    """The settings of this update: the ones given, else the state's, else the defaults.

    A given setting that differs from the state's is refused: a state continues only the
    average it was built for.
    """
    if method is not None and method not in METHOD_ARRAYS:
        raise ConfigError(f"--schedule: unknown average {method!r}; use {', '.join(PMA_METHODS)}")
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ConfigError(f"--last must be a whole number >= 1, got {last!r}")
    if alpha is not None and not 0 < alpha <= 1:
        raise ConfigError(f"--alpha: must be in (0, 1], got {alpha}")
    if interval_steps is not None and (isinstance(interval_steps, bool) or interval_steps < 1):
        raise ConfigError(f"--interval-steps must be a whole number >= 1, got {interval_steps!r}")
    if recorded is None:
        m = method or DEFAULT_PMA_METHOD
        if alpha is not None and m != "ema":
            raise ConfigError(f"--alpha applies to --method ema only (this state is {m})")
        return StateSettings(method=m, last=last if last is not None else (None if m == "ema" else DEFAULT_LAST),
                             alpha=(alpha if alpha is not None else DEFAULT_ALPHA) if m == "ema" else None,
                             interval_steps=interval_steps, dcp=dcp)
    asked = StateSettings(
        method=method or recorded.method, last=last if last is not None else recorded.last,
        alpha=(alpha if alpha is not None else recorded.alpha) if (method or recorded.method) == "ema" else None,
        interval_steps=interval_steps if interval_steps is not None else recorded.interval_steps,
        dcp=dcp if dcp is not None else recorded.dcp,
    )
    if alpha is not None and asked.method != "ema":
        raise ConfigError(f"--alpha applies to --method ema only (this state is {asked.method})")
    if asked != recorded:
        raise ConfigError(
            f"the PMA state was built with {recorded.describe()}, this update asks for "
            f"{asked.describe()}; a state only continues the average it was built for: run with "
            f"the state's settings (or leave them out), or start a new state (another STATE "
            "location, or delete this one)")
    return recorded


def decide(settings: StateSettings, meta: StateMeta | None, snapshots: list[Snapshot], *,
           recompute_every: int | None = None, min_snapshots: int = DEFAULT_MIN_SNAPSHOTS,
           where: str = "pma update") -> Decision:
    """What to do with `snapshots` (all found, sorted by step) given the current state.

    Until `settings.last` snapshots exist the window holds what there is (SMA/WMA snapshots
    then enter without one leaving, exactly as a build adds them); with no state and fewer than
    `min_snapshots`, NotReadyError (nothing to do yet, exit 3).
    """
    if meta is None:
        check_min_snapshots(min_snapshots, settings.last if settings.method != "ema" else None)
        first = tuple(select(snapshots, last=settings.last, interval_steps=settings.interval_steps)) \
            if snapshots else ()
        if len(first) < min_snapshots:
            raise not_ready(len(first), min_snapshots, where)
        chosen = {s.step for s in first}
        passed = tuple(s.step for s in snapshots
                       if first[0].step <= s.step <= first[-1].step and s.step not in chosen)
        return Decision(action="build", window=first, added=first, skipped=passed,
                        reason="no state yet: built from the selected window",
                        notes=_notes(settings, len(first)))
    old = tuple(Snapshot(s, u) for s, u in meta.steps)
    last_step = meta.last_step
    known = {s for s, _ in meta.steps} | set(meta.skipped)
    for s in snapshots:
        if old[0].step <= s.step < last_step and s.step not in known:
            raise ConfigError(
                f"{s.url} (step {s.step}) is older than the state's last step {last_step} and is "
                "not in the state: a running average takes snapshots in step order only. Move it "
                "out of the pattern, or start a new state (another STATE location, or delete this "
                "one) to include it")
    added: list[Snapshot] = []
    skipped: list[int] = list(meta.skipped)
    anchor = last_step
    for s in snapshots:
        if s.step <= last_step:
            continue
        if settings.interval_steps is None or s.step - anchor >= settings.interval_steps:
            added.append(s)
            anchor = s.step
        else:
            skipped.append(s.step)
    if not added:
        return Decision(action="noop", window=old, skipped=tuple(skipped),
                        reason=f"no new snapshot after step {last_step}", notes=_notes(settings, len(old)))
    if settings.method == "ema":
        window = old + tuple(added)
        return Decision(action="incremental", window=window, added=tuple(added),
                        skipped=tuple(skipped), reason=f"{len(added)} new snapshot(s)")
    # the window holds `last` snapshots; while it fills (a state built from fewer), the first
    # added enter with none leaving, the rest slide; len(old) is the cap for older states
    cap = max(settings.last or len(old), len(old))
    window = (old + tuple(added))[-cap:]
    skipped = [s for s in skipped if s >= window[0].step]  # steps older than the window are gone
    k = len(added)
    leave = max(0, len(old) + k - cap)
    n = len(window)
    notes = _notes(settings, n)
    due = recompute_every is not None and meta.updates_since_recompute + 1 >= recompute_every
    if settings.method in RECOMPUTED:
        return Decision(action="build", window=window, added=tuple(added), skipped=tuple(skipped),
                        reason=f"{settings.method} has no exact running form: recomputed from the window",
                        notes=notes)
    if due:
        return Decision(action="build", window=window, added=tuple(added), skipped=tuple(skipped),
                        reason=f"--recompute-every {recompute_every}: exact recompute from the window",
                        notes=notes)
    if k + leave >= n:
        return Decision(action="build", window=window, added=tuple(added), skipped=tuple(skipped),
                        reason=f"{k} new snapshot(s) in a window of {n}: recomputing reads no more",
                        notes=notes)
    return Decision(action="incremental", window=window, added=tuple(added), leaving=old[:leave],
                    skipped=tuple(skipped), notes=notes,
                    reason=f"{k} new snapshot(s), {leave} leaving the window")


def _notes(settings: StateSettings, n: int) -> tuple[str, ...]:
    """The printout's notes of an update: a window still filling; a schedule recomputed."""
    out = []
    note = window_note(n, settings.last) if settings.method != "ema" else None
    if note:
        out.append(note)
    if settings.method in RECOMPUTED:
        out.append(f"--schedule {settings.method}: every weight changes as the window moves, so no running "
                   "sum gives it exactly; each update recomputes the average from the whole window "
                   "(reads every snapshot in it)")
    return tuple(out)
