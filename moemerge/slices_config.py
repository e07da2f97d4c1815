"""MergeKit's `slices:` and `modules:` grammar: parsed into `SliceSpec`s and checked (no checkpoint read).

A slice takes the same number of consecutive layers from each of its sources and merges them
into that many output layers; slices are stacked in order. The planner expands them per tensor
(`planner/slices.py`); parameters resolve slice source > slice > module > global, MergeKit's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from moemerge.errors import ConfigError

if TYPE_CHECKING:
    from moemerge.config import MergeConfig, ParamValue
    from moemerge.methods.base import Method

__all__ = ["SliceSource", "SliceSpec", "ParsedSlices", "parse_slices", "check_slices_config", "slice_bases",
           "module_params", "DEFAULT_MODULE"]

#: MergeKit's name of the one module of every single-part architecture (its JSON definitions).
DEFAULT_MODULE = "default"

_SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
_SOURCE_KEYS = ("model", "layer_range", "parameters")
_MODULE_KEYS = ("slices", "models", "parameters")


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceSource:
    """One entry of a slice's `sources:`."""

    model: str
    layer_range: tuple[int, int] | None
    """`[start, end)` layer indices of `model`; None: every layer (a module's `models:` entry)."""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    """Highest-precedence parameters, for this model in this slice."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceSpec:
    """One output slice: the same number of layers from each source, merged."""

    where: str
    """Where it is in the config (`slices[2]`), for messages."""
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    """This slice's base (overrides the top-level `base_model`); must be one of its sources."""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    residual_weight: float | None = None
    """Accepted as MergeKit 0.1.5 accepts it, and, as there, without effect (a plan warning says so)."""
    module: str = DEFAULT_MODULE
    """The part of the model this slice belongs to (`modules:`); `default`: the whole model."""
    module_parameters: dict[str, ParamValue] = field(default_factory=dict)
    """Its module's `parameters` (between the slice's and the top level's)."""
    architecture: str | None = None
    """For a named module: the layout family (`planner/modules.py`) the planner found in the
    inputs' config.json; None until then."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedSlices:
    """What `parse_slices` makes of a config's `slices:` / `modules:`."""

    slices: tuple[SliceSpec, ...]
    module_parameters: dict[str, ParamValue]
    models: tuple[str, ...]
    """Every model a slice reads, in order of first mention (the config's `models`)."""


def _mapping(v: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"`{where}` must be a mapping with keys {', '.join(keys)}, got {v!r}")
    unknown = sorted(set(map(str, v)) - set(keys))
    if unknown:
        raise ConfigError(f"`{where}` has unknown key(s) {', '.join(f'`{k}`' for k in unknown)}; "
                          f"allowed: {', '.join(keys)}")
    return v


def _layer_range(v: Any, where: str) -> tuple[int, int]:
    ok = (isinstance(v, list | tuple) and len(v) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
    if not ok:
        raise ConfigError(f"`{where}.layer_range` must be two layer indices [start, end), got {v!r}")
    a, b = int(v[0]), int(v[1])
    if a < 0 or b <= a:
        raise ConfigError(f"`{where}.layer_range` [{a}, {b}] takes no layers: it is [start, end) "
                          "with 0 <= start < end (end excluded, as in Python)")
    return a, b


def _parse_slice(doc: Any, where: str) -> SliceSpec:
    from moemerge.config import parse_model_ref, parse_params

    d = _mapping(doc, where, _SLICE_KEYS)
    srcs = d.get("sources")
    if not isinstance(srcs, list) or not srcs:
        raise ConfigError(f"`{where}.sources` must be a non-empty list of {{model, layer_range}} entries")
    sources = []
    for j, s in enumerate(srcs):
        at = f"{where}.sources[{j}]"
        sd = _mapping(s, at, _SOURCE_KEYS)
        if "model" not in sd or "layer_range" not in sd:
            raise ConfigError(f"`{at}` needs `model` and `layer_range`, got {s!r}")
        sources.append(SliceSource(model=parse_model_ref(sd["model"], f"{at}.model"),
                                   layer_range=_layer_range(sd["layer_range"], at),
                                   parameters=parse_params(sd.get("parameters"), f"{at}.parameters")))
    base = d.get("base_model")
    rw = d.get("residual_weight")
    if rw is not None and (isinstance(rw, bool) or not isinstance(rw, int | float)):
        raise ConfigError(f"`{where}.residual_weight` must be a number, got {rw!r}")
    return SliceSpec(where=where, sources=tuple(sources),
                     base_model=None if base is None else parse_model_ref(base, f"{where}.base_model"),
                     parameters=parse_params(d.get("parameters"), f"{where}.parameters"),
                     residual_weight=None if rw is None else float(rw))


def _module_models(models: Any, where: str, base: str | None) -> SliceSpec:
    """A module's `models:` as MergeKit reads it: one slice of every layer of each model, the
    base (of a method that takes one) appended when it is not listed."""
    from moemerge.config import parse_model_ref, parse_params

    if not isinstance(models, list) or not models:
        raise ConfigError(f"`{where}.models` must be a non-empty list of {{model: PATH}} entries")
    sources = []
    for j, m in enumerate(models):
        at = f"{where}.models[{j}]"
        md = _mapping({"model": m} if isinstance(m, str) else m, at, ("model", "parameters"))
        if "model" not in md:
            raise ConfigError(f"`{at}` must have a `model` key, got {m!r}")
        sources.append(SliceSource(model=parse_model_ref(md["model"], f"{at}.model"), layer_range=None,
                                   parameters=parse_params(md.get("parameters"), f"{at}.parameters")))
    if base is not None and base not in [s.model for s in sources]:
        sources.append(SliceSource(model=base, layer_range=None))
    return SliceSpec(where=f"{where}.models", sources=tuple(sources))


def parse_slices(doc: Mapping[str, Any], base_model: str | None) -> ParsedSlices:
    """The `slices:` or `modules:` of a top-level config mapping (MergeKit 0.1.5's schema).

    `modules:` is MergeKit's grammar for models made of parts (a vision tower, a projector and
    a text decoder, each with its own layers and weight prefix). A single-part model has one
    module, `default`: `modules: {default: {slices: ..., parameters: ...}}`. Named parts
    (`text_decoder: {...}, vision_tower: {...}`) are read the same way, each slice tagged with
    its module; which tensors and config keys make each part is the planner's business
    (`planner/modules.py`, from config.json). A module's `parameters` rank between its slices'
    and the top level's. `base_model` is the top-level base of a method that takes one
    (appended to a module's `models:`), else None.
    """
    from moemerge.config import parse_params

    given = [k for k in ("models", "slices", "modules") if doc.get(k) is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of `models`, `slices` or `modules` (MergeKit's rule), got "
                          f"{', '.join(f'`{k}`' for k in given)}")
    module_params: dict[str, ParamValue] = {}
    if "modules" in given:
        mods = doc["modules"]
        if not isinstance(mods, dict) or not mods:
            raise ConfigError("`modules` must be a mapping of module name -> {slices | models, parameters}")
        if DEFAULT_MODULE in mods and len(mods) > 1:
            raise ConfigError(f"`modules`: `{DEFAULT_MODULE}` is the whole model (single-part models); it cannot "
                              f"be listed with named parts ({', '.join(str(k) for k in mods if k != DEFAULT_MODULE)})")
        collected: list[SliceSpec] = []
        for name, body in mods.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"`modules`: {name!r} is not a module name (e.g. text_decoder, vision_tower)")
            where = f"modules.{name}"
            mod = _mapping(body, where, _MODULE_KEYS)
            if (mod.get("slices") is None) == (mod.get("models") is None):
                raise ConfigError(f"`{where}`: give either `slices` or `models` (MergeKit's rule)")
            params = parse_params(mod.get("parameters"), f"{where}.parameters")
            if name == DEFAULT_MODULE:
                module_params = params
            if mod.get("models") is not None:
                part: tuple[SliceSpec, ...] = (_module_models(mod["models"], where, base_model),)
            else:
                part = _slice_list(mod["slices"], f"{where}.slices")
            collected += [replace(sl, module=name, module_parameters=params) for sl in part]
        slices: tuple[SliceSpec, ...] = tuple(collected)
    else:
        slices = _slice_list(doc["slices"], "slices")
    models: list[str] = []
    for sl in slices:
        for s in sl.sources:
            if s.model not in models:
                models.append(s.model)
    return ParsedSlices(slices=slices, module_parameters=module_params, models=tuple(models))


def _slice_list(v: Any, where: str) -> tuple[SliceSpec, ...]:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"`{where}` must be a non-empty list of {{sources: [...]}} entries")
    return tuple(_parse_slice(s, f"{where}[{i}]") for i, s in enumerate(v))


def module_params(cfg: MergeConfig, sl: SliceSpec) -> dict[str, ParamValue]:
    """The `parameters` of slice `sl`'s module (a config built by hand may give the default
    module's only as `cfg.module_parameters`)."""
    return sl.module_parameters or (cfg.module_parameters if sl.module == DEFAULT_MODULE else {})


def slice_bases(cfg: MergeConfig, method: Method, sl: SliceSpec) -> str | None:
    """The base model of slice `sl` for `method` (the slice's, else the top level's); None when
    the method takes no base."""
    if method.base == "none":
        return None
    return sl.base_model or cfg.base_model


def check_slices_config(cfg: MergeConfig, method: Method) -> None:
    """Every slice's inputs and parameters checked against `method` (names, values, the input
    contract, ranges of equal length); all problems in one ConfigError."""
    from moemerge.config import scoped_param_problems

    problems = scoped_param_problems(method, "parameters", cfg.parameters, {"model", "global"}, None)
    seen: set[str] = set()
    for sl in cfg.slices:
        mp = module_params(cfg, sl)
        if mp and sl.module not in seen:
            seen.add(sl.module)
            problems += scoped_param_problems(method, f"modules.{sl.module}.parameters", mp, {"model", "global"}, None)
    for sl in cfg.slices:
        problems += scoped_param_problems(method, f"{sl.where}.parameters", sl.parameters, {"model", "global"}, None)
        names = [s.model for s in sl.sources]
        for j, s in enumerate(sl.sources):
            problems += scoped_param_problems(method, f"{sl.where}.sources[{j}].parameters", s.parameters, {"model"},
                                        s.model)
        dup = sorted({m for m in names if names.count(m) > 1})
        if dup:
            problems.append(f"`{sl.where}.sources`: {', '.join(dup)} listed twice; a slice merges distinct "
                            "models (MergeKit refuses this too): split it into two slices")
        ranges = [s.layer_range for s in sl.sources if s.layer_range is not None]
        if len({b - a for a, b in ranges}) > 1:
            listed = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sl.sources if s.layer_range)
            problems.append(f"`{sl.where}.sources`: the layer ranges differ in length ({listed}); every "
                            "source of a slice must give the same number of layers")
        base = slice_bases(cfg, method, sl)
        if base is not None and base not in names:
            problems.append(f"`{sl.where}`: base_model {base} is not among its sources; list it under "
                            f"`{sl.where}.sources` with the layer_range to take from it")
        if method.base == "required" and base is None:
            problems.append(f"`{sl.where}`: {method.name} needs a base model (set `base_model` at the top "
                            "level or on the slice, and list it among the slice's sources)")
        n = len(names) - (1 if base in names else 0)
        besides = " besides base_model" if method.base != "none" else ""
        if n < method.min_inputs:
            problems.append(f"`{sl.where}.sources`: {method.name} needs at least {method.min_inputs} "
                            f"model(s){besides}, got {n}")
        if method.max_inputs is not None and n > method.max_inputs:
            problems.append(f"`{sl.where}.sources`: {method.name} takes at most {method.max_inputs} "
                            f"model(s){besides}, got {n}")
        for spec in method.params:
            if spec.default is not None:
                continue
            shared = [sl.parameters, module_params(cfg, sl), cfg.parameters]
            if spec.scope == "global":
                if not any(spec.name in p for p in shared):
                    problems.append(f"`{sl.where}.parameters.{spec.name}`: required by {method.name} (or "
                                    "set it under top-level `parameters`)")
                continue
            for j, s in enumerate(sl.sources):
                if s.model != base and not any(spec.name in p for p in [s.parameters, *shared]):
                    problems.append(f"`{sl.where}.sources[{j}].parameters.{spec.name}`: required by "
                                    f"{method.name} for {s.model} (or set it on the slice or at the top level)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])
