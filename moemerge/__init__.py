"""moemerge: out-of-core, streaming merges and checkpoint averaging of huge (MoE) checkpoints."""

__version__ = "0.1.0"

from moemerge.api import inspect, plan, pma_config, run  # noqa: E402

__all__ = ["__version__", "run", "plan", "inspect", "pma_config"]
