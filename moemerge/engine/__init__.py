"""Execution of a Plan: the local executor, buffers, progress."""

from moemerge.engine.local import run_local
from moemerge.engine.progress import NullProgress, Progress

__all__ = ["run_local", "Progress", "NullProgress"]
