"""Resolve a method's parameters for one tensor (precedence, gradients, filters)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from moemerge.config import MergeConfig, param_problem, resolve_value
from moemerge.methods.base import Method, ParamSpec, TensorParams

__all__ = ["layer_index", "count_layers", "resolve_tensor_params"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """`model.layers.12.mlp.w1.weight` -> 12; None for tensors outside numbered layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def count_layers(names: Iterable[str], hint: int | None = None) -> int:
    """Number of layers: `num_hidden_layers` from config.json when given, else max index + 1."""
    if hint:
        return int(hint)
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else 1


def _coerce(spec: ParamSpec, v: Any) -> Any:
    if spec.kind == "bool":
        return bool(v)
    if spec.kind == "int":
        return int(v)
    return float(v)


def resolve_tensor_params(
    method: Method,
    cfg: MergeConfig,
    model_indices: list[int],
    tensor: str,
    n_layers: int,
    seed: int,
) -> tuple[TensorParams, list[str]]:
    """Parameters of `tensor` per input model (config indices) and global; plus problems."""
    layer = layer_index(tensor)
    problems: list[str] = []
    per_input = []
    for mi in model_indices:
        model = cfg.models[mi]
        values: dict[str, Any] = {}
        for spec in method.params:
            if spec.scope != "model":
                continue
            v = None
            if spec.name in model.parameters:
                v = resolve_value(model.parameters[spec.name], tensor, layer, n_layers)
            if v is None and spec.name in cfg.parameters:
                v = resolve_value(cfg.parameters[spec.name], tensor, layer, n_layers)
            if v is None:
                v = spec.default
            if v is None:
                problems.append(
                    f"tensor `{tensor}`: parameter `{spec.name}` of {model.model} has no value "
                    "(no filter rule matches it and there is no default); add a rule without `filter`"
                )
                continue
            bad = param_problem(spec, v)
            if bad:  # gradients and filters resolve here: every resolved value is checked
                problems.append(f"tensor `{tensor}`: {method.name} parameter `{spec.name}` resolves to {v!r} "
                                f"for {model.model}; {spec.name} {bad}")
                continue
            values[spec.name] = _coerce(spec, v)
        per_input.append(values)
    glob: dict[str, Any] = {}
    for spec in method.params:
        if spec.scope != "global":
            continue
        v = resolve_value(cfg.parameters[spec.name], tensor, layer, n_layers) if spec.name in cfg.parameters else None
        if v is None:
            v = spec.default
        if v is None:
            problems.append(f"tensor `{tensor}`: parameter `{spec.name}` has no value (no filter rule matches)")
            continue
        bad = param_problem(spec, v)
        if bad:
            problems.append(f"tensor `{tensor}`: {method.name} parameter `{spec.name}` resolves to {v!r}; "
                            f"{spec.name} {bad}")
            continue
        glob[spec.name] = _coerce(spec, v)
    return TensorParams(per_input=tuple(per_input), glob=glob, seed=seed), problems
