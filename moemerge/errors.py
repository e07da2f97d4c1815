"""Every error moemerge raises on purpose: one tree, each class also a builtin exception.

Messages name the file, the tensor and the fix. Fields survive pickling, because units fail on
Dask workers and their errors travel back to the client.
"""

from __future__ import annotations

__all__ = [
    "MoemergeError",
    "ConfigError",
    "CheckpointError",
    "MismatchError",
    "PlanError",
    "OutputError",
    "MergeRuntimeError",
    "NotReadyError",
]


class MoemergeError(Exception):
    """Base of every error a user can cause; the CLI prints its message alone, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[MoemergeError], tuple[str]]:  # keep the message through pickling (Dask workers)
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class ConfigError(MoemergeError, ValueError):
    """The YAML/CLI configuration is wrong: unknown key or method, bad or missing parameter."""


class CheckpointError(MoemergeError, OSError):
    """A checkpoint cannot be read: missing, truncated, corrupt header, bad index."""


class MismatchError(MoemergeError, ValueError):
    """Inputs disagree: a tensor missing in one model, a shape or dtype mismatch."""


class PlanError(MoemergeError, ValueError):
    """Several problems found while planning; the message lists all of them."""


class OutputError(MoemergeError, OSError):
    """The output location cannot be used: not writable, a file, a finished output."""


class MergeRuntimeError(MoemergeError, RuntimeError):
    """A problem only visible while reading data (e.g. integer tensors that differ)."""


class NotReadyError(MoemergeError, LookupError):
    """Nothing to do yet: fewer snapshots than `--min-snapshots` exist (`pma`, `pma update`).
    The CLI exits with `settings.EXIT_NOT_READY` (3), not 1: a nightly job is not failing."""
