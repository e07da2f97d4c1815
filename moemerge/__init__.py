"""moemerge: out-of-core, streaming merges and checkpoint averaging of huge (MoE) checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moemerge.settings import VERSION as __version__  # first: modules still importing it from here

if TYPE_CHECKING:
    from moemerge.api import inspect, plan, pma_config, run

__all__ = ["__version__", "run", "plan", "inspect", "pma_config"]


def __getattr__(name: str) -> Any:
    """`moemerge.run` & co. import the API on first use: `python -m moemerge --version` and the
    CLI's start-up import only what they need (tests/test_startup.py)."""
    if name in ("run", "plan", "inspect", "pma_config"):
        from moemerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'moemerge' has no attribute {name!r}")
