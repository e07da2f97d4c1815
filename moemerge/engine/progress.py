"""Progress: a rich bar (bytes, throughput, ETA) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from moemerge.sizes import format_size

__all__ = ["Progress", "NullProgress"]


class NullProgress:
    """Progress that shows nothing (library use, tests)."""

    def start(self, total: int, label: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def stop(self) -> None: ...

    def note(self, text: str) -> None: ...


class Progress:
    """Counts bytes processed against a total; thread-safe `advance`."""

    def __init__(self, *, stream: TextIO | None = None, interval: float = 10.0, rich_bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.rich_bar = self.stream.isatty() if rich_bar is None else rich_bar
        self.total = 0
        self.done = 0
        self._t0 = 0.0
        self._last = 0.0
        self._lock = threading.Lock()
        self._bar: Any = None  # a rich Progress once started on a terminal
        self._task: Any = None
        self.label = ""

    def __repr__(self) -> str:
        return f"Progress({format_size(self.done)}/{format_size(self.total)})"

    def start(self, total: int, label: str) -> None:
        self.total, self.done, self.label = total, 0, label
        self._t0 = self._last = time.monotonic()
        if self.rich_bar:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                       TextColumn, TimeRemainingColumn, TransferSpeedColumn)

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
                return
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._log(now)

    def _log(self, now: float) -> None:
        el = max(now - self._t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"[moemerge] {self.label}: {pct:5.1f}%  {format_size(self.done)}/{format_size(self.total)}"
            f"  {format_size(rate)}/s  ETA {eta:,.0f}s",
            file=self.stream, flush=True,
        )

    def note(self, text: str) -> None:
        """One line for the user beside the bar (e.g. where the Dask dashboard is)."""
        print(f"[moemerge] {text}", file=self.stream, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.total:
            self._log(time.monotonic())
