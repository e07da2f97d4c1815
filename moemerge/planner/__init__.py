"""Planning: config + checkpoint headers -> Plan (validated, chunked, laid out)."""

from moemerge.planner.build import build_plan
from moemerge.planner.plan import Plan, ShardLayout, TensorPlan, WorkUnit

__all__ = ["build_plan", "Plan", "TensorPlan", "ShardLayout", "WorkUnit"]
