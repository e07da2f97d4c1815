"""Averages over the snapshots of one training run (PMA): discovery and window selection."""

from moemerge.pma.discovery import Snapshot, discover, interval_steps_from_tokens, select

__all__ = ["Snapshot", "discover", "select", "interval_steps_from_tokens"]
