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
    static = _static_key(method, cfg, model_indices, seed)
    if static is not None:  # no filter or gradient: the same for every tensor, resolved once
        hit = _STATIC.get(static)
        if hit is not None:
            return hit, []
    params, problems = _resolve(method, cfg, model_indices, tensor, n_layers, seed)
    if static is not None and not problems:  # problems name the tensor: those are resolved each time
        if len(_STATIC) >= _SHARED_MAX:
            _STATIC.clear()
        _STATIC[static] = params
    return params, problems


#: Parameters resolved from plain values (no filter, no gradient), by those values.
_STATIC: dict[tuple[Any, ...], TensorParams] = {}


def _static_key(method: Method, cfg: MergeConfig, model_indices: list[int], seed: int) -> tuple[Any, ...] | None:
    """What the parameters of every tensor depend on when no value is a filter list or a
    gradient (they are then the same for every tensor), as a key; None otherwise."""
    values = [cfg.parameters.get(spec.name, _ABSENT) for spec in method.params]
    for mi in model_indices:
        params = cfg.models[mi].parameters
        values += [params.get(spec.name, _ABSENT) for spec in method.params if spec.scope == "model"]
    types = tuple(map(type, values))
    # plain values only (a filter list or a gradient depends on the tensor); a float zero is
    # left out too, as 0.0 == -0.0 would share the parameters of both
    if not _PLAIN.issuperset(types) or 0.0 in values and any(type(v) is float and v == 0.0 for v in values):
        return None
    return (method.name, seed, len(model_indices), types, tuple(values))


_ABSENT = object()
#: The value types whose parameters are the same for every tensor (the types are in the key:
#: True, 1 and 1.0 are equal but different parameters).
_PLAIN = frozenset({bool, int, float, str, type(_ABSENT)})


def _resolve(method: Method, cfg: MergeConfig, model_indices: list[int], tensor: str, n_layers: int,
             seed: int) -> tuple[TensorParams, list[str]]:
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
    return _shared(TensorParams(per_input=tuple(per_input), glob=glob, seed=seed)), problems


#: Resolved parameters seen so far, by value: most tensors of a merge resolve alike, and one
#: object for all of them saves about 600 bytes per tensor (55 MB at 92k tensors). Bounded:
#: values that differ per tensor (gradients over layers) make at most one entry per layer and
#: parameter combination, and the table is emptied when it grows past `_SHARED_MAX`.
_SHARED: dict[tuple[Any, ...], TensorParams] = {}
_SHARED_MAX = 4096


def _shared(tp: TensorParams) -> TensorParams:
    """The one TensorParams equal to `tp` (itself the first time)."""
    try:
        # repr, not the value: 1 == 1.0 == True and 0.0 == -0.0 are different parameters
        key = (tuple(tuple((k, repr(v)) for k, v in d.items()) for d in tp.per_input),
               tuple((k, repr(v)) for k, v in tp.glob.items()), tp.seed)
        hit = _SHARED.get(key)
    except TypeError:  # an unhashable value: keep it as it is
        return tp
    if hit is not None:
        return hit
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    _SHARED[key] = tp
    return tp
