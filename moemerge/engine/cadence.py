"""How often the engines report finished tensors to `on_written` (the resume journal).

Each report costs an fsync of the output, so it is not per tensor; but a byte threshold alone
never fires for a small output, and a kill then loses everything. Whichever comes first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Cadence", "Tally"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Cadence:
    """Report when any of these is reached since the last report."""

    nbytes: int = 2 << 30
    """Output bytes of finished tensors."""
    tensors: int = 64
    """Finished tensors, once `min_seconds` have passed: each report costs an fsync (~5 ms),
    and a report per 64 of a million tiny tensors would spend minutes in them."""
    seconds: float = 30.0
    """Seconds since the last report (checked as tensors finish)."""
    min_seconds: float = 1.0

    @classmethod
    def of(cls, every: int | Cadence) -> Cadence:
        """A cadence as given, or an int as bytes alone (the engines' older argument)."""
        if isinstance(every, Cadence):
            return every
        return cls(nbytes=every, tensors=1 << 62, seconds=float("inf"))


class Tally:
    """What finished since the last report, against a cadence; not thread-safe (one counter per loop)."""

    def __init__(self, cadence: Cadence) -> None:
        self.cadence = cadence
        self.nbytes = 0
        self.tensors = 0
        self._since = time.monotonic()

    def __repr__(self) -> str:
        return f"Tally({self.tensors} tensors, {self.nbytes} bytes; {self.cadence})"

    def add(self, nbytes: int, tensors: int = 1) -> bool:
        """Count finished work; True when a report is due (the caller reports, then `reset`s)."""
        self.nbytes += nbytes
        self.tensors += tensors
        c = self.cadence
        if self.nbytes >= c.nbytes:
            return True
        elapsed = time.monotonic() - self._since
        return elapsed >= c.seconds or (self.tensors >= c.tensors and elapsed >= c.min_seconds)

    def reset(self) -> None:
        self.nbytes = self.tensors = 0
        self._since = time.monotonic()
