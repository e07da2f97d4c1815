"""moemerge: out-of-core, streaming merges and checkpoint averaging of huge (MoE) checkpoints."""

from moemerge.settings import VERSION as __version__  # first: modules still importing it from here

from moemerge.api import inspect, plan, pma_config, run  # noqa: E402

__all__ = ["__version__", "run", "plan", "inspect", "pma_config"]
