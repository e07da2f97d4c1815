"""MergeKit's `slices:` expanded into the per-tensor plan: which stored tensor of which source
makes each output tensor, with which parameters (pure: headers in, planned tensors out).

MergeKit 0.1.5's meaning (`mergekit/plan.py`, `MergePlanner.plan_module`):
- output layers are the slices' layers in order, renumbered from 0; a layer taken twice is two
  output layers (the same bytes under two names);
- tensors outside numbered layers: the embeddings (`pre_weights`) are merged from the FIRST
  slice's sources with its parameters; the others (final norm, `lm_head`: `post_weights`) from
  the LAST slice's sources, cut to as many as the first slice has (MergeKit zips the two lists),
  with the last slice's parameters; a gradient takes its first entry on both (t = 0);
- in a slice of L layers, layer i has t = i / (L - 1) (t = 1 when L = 1) for gradients;
- parameters resolve slice source > slice > module > top level, the first that gives a value
  (a filter list matching nothing falls through); per-model parameters match filters against
  the source's tensor name (its own layer index), merge-wide ones against the output name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moemerge.config import MergeConfig, ParamValue, param_problem, resolve_value
from moemerge.errors import PlanError
from moemerge.io.checkpoint import TensorInfo
from moemerge.io.dtypes import is_float
from moemerge.io.quant.base import QuantSpec
from moemerge.methods.base import Method, ParamSpec, TensorParams
from moemerge.planner.params import _LAYER
from moemerge.planner.plan import PlannedTensor
from moemerge.slices_config import DEFAULT_MODULE, SliceSpec, module_params, slice_bases

__all__ = ["select_slices", "output_layers", "slice_config_updates", "config_list_updates", "is_pre_weight"]

#: Averages over one run's snapshots take non-float tensors from the newest (as planner/build.py).
_AVERAGES = frozenset({"sma", "wma", "ema"})
#: Config keys holding the layer count, by family (MergeKit's `num_layers_config_key`s).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: config.json lists of layer INDICES (not one entry per layer): remapped by membership.
_INDEX_LISTS = frozenset({"mlp_only_layers", "moe_layers", "hybrid_layer_ids"})
#: Embedding-side names outside the layers (MergeKit's `pre_weights` of every JSON architecture:
#: embed_tokens, embeddings.*, wte, wpe, embd, embed_in, rotary/relative position tables).
_PRE = re.compile(r"emb|(?:^|\.)(?:wte|wpe)\.|position_ids|rotary_pos|relative_pe")


def is_pre_weight(name: str) -> bool:
    """Whether a tensor outside the layers sits before them (MergeKit's `pre_weights`), e.g.
    `model.embed_tokens.weight`; the rest (norms, `lm_head`, GPT-NeoX's `embed_out`) come after."""
    return "embed_out" not in name and _PRE.search(name) is not None


#: The layer pattern of a module with no layers (a projector): matches nothing.
_NO_LAYERS = re.compile(r"(?!)")


def _renumber(name: str, layer: int, rx: re.Pattern[str] = _LAYER) -> str:
    m = rx.search(name)
    assert m is not None, name
    return f"{name[:m.start(1)]}{layer}{name[m.end(1):]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Layers:
    """One checkpoint's tensor names by layer, in file order."""

    by_layer: dict[int, list[str]]
    others: list[str]
    """Names outside numbered layers."""
    n_layers: int
    suffix_shapes: dict[str, tuple[int, ...]]
    """Shape of each in-layer name with its layer index blanked (the first layer's that has it)."""
    rx: re.Pattern[str] = _LAYER
    """Finds the layer index (group 1) in a name (a module's own pattern, `planner/modules.py`)."""
    has_layers: bool = True
    """False for a module that has no layers (a projector): its tensors are all `others`."""


def _layers(cat: Mapping[str, TensorInfo], rx: re.Pattern[str] = _LAYER,
            keep: Callable[[str], bool] | None = None) -> _Layers:
    """`cat`'s names (those `keep` accepts) by layer, the layer index found by `rx`."""
    by_layer: dict[int, list[str]] = {}
    others: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(cat, key=lambda n: (cat[n].file, cat[n].start)):
        if keep is not None and not keep(name):
            continue
        m = rx.search(name)
        if m is None:
            others.append(name)
            continue
        by_layer.setdefault(int(m.group(1)), []).append(name)
        shapes.setdefault(_renumber(name, -1, rx), tuple(cat[name].shape))
    return _Layers(by_layer=by_layer, others=others, n_layers=max(by_layer, default=-1) + 1, suffix_shapes=shapes,
                   rx=rx, has_layers=rx is not _NO_LAYERS)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Resolved:
    """A slice with every source's layer range known."""

    spec: SliceSpec
    ranges: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        a, b = self.ranges[0]
        return b - a


def _resolve_ranges(slices: Sequence[SliceSpec], layers: Mapping[str, _Layers]) -> list[_Resolved]:
    """Each slice's layer ranges (a module's `models:` entry: every layer), checked against the
    models' layers; every problem raised at once."""
    problems: list[str] = []
    out: list[_Resolved] = []
    for sl in slices:
        ranges = []
        for j, s in enumerate(sl.sources):
            n = layers[s.model].n_layers
            a, b = s.layer_range if s.layer_range is not None else (0, n)
            if not layers[s.model].has_layers:
                if s.layer_range is not None:
                    problems.append(f"`{sl.where}.sources[{j}]`: the {sl.module} module has no layers; give it "
                                    "`models:` instead of `slices:`")
            elif n == 0:
                problems.append(f"`{sl.where}.sources[{j}]`: {s.model} has no numbered layers "
                                "(no `layers.N.` tensor names); slices take layer ranges")
            elif b > n:
                problems.append(f"`{sl.where}.sources[{j}].layer_range` [{a}, {b}] is outside {s.model}, which "
                                f"has {n} layers (0..{n - 1}; ranges are [start, end) with end <= {n})")
            ranges.append((a, b))
        if len({b - a for a, b in ranges}) > 1:
            listed = ", ".join(f"{s.model} {list(r)}" for s, r in zip(sl.sources, ranges))
            problems.append(f"`{sl.where}.sources`: the models give different numbers of layers ({listed}); "
                            "every source of a slice must give the same number of layers")
        out.append(_Resolved(spec=sl, ranges=tuple(ranges)))
    if problems:
        raise PlanError(problems[0] if len(problems) == 1 else
                        f"cannot plan these slices ({len(problems)} problems):\n  " + "\n  ".join(problems))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Group:
    """The slices of one module, with the models' tensors of that module by layer."""

    module: str
    slices: tuple[SliceSpec, ...]
    layers: dict[str, _Layers]
    is_pre: Callable[[str], bool]


def _groups(cfg: MergeConfig, catalogs: Mapping[str, Mapping[str, TensorInfo]]) -> list[_Group]:
    """`cfg.slices` by module, in the config's order: one group of the whole model for top-level
    `slices:` / `modules: {default: ...}`; for named modules, each its part of every model
    (`planner/modules.py`), every tensor of every model placed in a part or refused."""
    named = [sl for sl in cfg.slices if sl.module != DEFAULT_MODULE]
    if not named:
        return [_Group(module=DEFAULT_MODULE, slices=tuple(cfg.slices),
                       layers={m.model: _layers(catalogs[m.model]) for m in cfg.models}, is_pre=is_pre_weight)]
    from moemerge.planner.modules import family

    fam = named[0].architecture
    if fam is None:
        raise PlanError("named `modules:` need the inputs' config.json to find each part's tensors; plan them "
                        "with moemerge.plan / moemerge.run (not build_plan alone)")
    lay = family(fam)
    strays = sorted({f"{m.model}: `{n}`" for m in cfg.models for n in catalogs[m.model] if lay.module_of(n) is None})
    if strays:
        raise PlanError(f"{len(strays)} tensor(s) belong to no part of a {fam} model ({', '.join(strays[:5])}"
                        f"{', ...' if len(strays) > 5 else ''}); moemerge's module table (planner/modules.py) "
                        f"knows the parts {', '.join(m.name for m in lay.modules)} by their name prefixes")
    out: list[_Group] = []
    for name in dict.fromkeys(sl.module for sl in cfg.slices):
        mod = lay.module(name)

        def mine(n: str, mod: Any = mod) -> bool:
            return lay.module_of(n) is mod

        def pre(n: str, p: re.Pattern[str] | None = mod.pre) -> bool:
            return is_pre_weight(n) if p is None else p.search(n) is not None

        rx = mod.layer or _NO_LAYERS
        out.append(_Group(module=name, slices=tuple(sl for sl in cfg.slices if sl.module == name),
                          layers={m.model: _layers(catalogs[m.model], rx, mine) for m in cfg.models}, is_pre=pre))
    return out


def _output_layers(g: _Group) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for r in _resolve_ranges(g.slices, g.layers):
        a, _ = r.ranges[0]
        out += [(r.spec.sources[0].model, a + i) for i in range(r.length)]
    return out


def output_layers(cfg: MergeConfig, catalogs: Mapping[str, Mapping[str, TensorInfo]]) -> list[tuple[str, int]]:
    """(model, its layer index) of each output layer, in order: each slice's first source (of
    every module in turn, for named `modules:`)."""
    return [x for g in _groups(cfg, catalogs) for x in _output_layers(g)]


def _as_kind(spec: ParamSpec, v: Any) -> Any:
    return bool(v) if spec.kind == "bool" else int(v) if spec.kind == "int" else float(v)


def _first(scopes: Sequence[Mapping[str, ParamValue]], name: str, tensor: str, layer: int | None,
           n: int) -> Any:
    """The first value a scope gives `name` (a filter list matching nothing gives none)."""
    for scope in scopes:
        if name in scope:
            v = resolve_value(scope[name], tensor, layer, n)
            if v is not None:
                return v
    return None


def _params(method: Method, cfg: MergeConfig, sl: SliceSpec, inputs: Sequence[tuple[str, str]], out_name: str,
            layer: int | None, n: int, seed: int) -> tuple[TensorParams, list[str]]:
    """Parameters of one output tensor; `inputs` are (model, its stored name) of the method's
    inputs (base excluded); `layer` is the index within the slice (None outside layers)."""
    shared = [sl.parameters, module_params(cfg, sl), cfg.parameters]
    problems: list[str] = []
    per_input = []
    for model, in_name in inputs:
        own = [s.parameters for s in sl.sources if s.model == model]
        values: dict[str, Any] = {}
        for spec in method.params:
            if spec.scope != "model":
                continue
            v = _first(own + shared, spec.name, in_name, layer, n)
            v = spec.default if v is None else v
            if v is None:
                problems.append(f"tensor `{out_name}`: parameter `{spec.name}` of {model} in {sl.where} has no "
                                "value (no filter rule matches it and there is no default); add a rule without "
                                "`filter`")
                continue
            bad = param_problem(spec, v)
            if bad:
                problems.append(f"tensor `{out_name}`: {method.name} parameter `{spec.name}` resolves to {v!r} "
                                f"for {model} in {sl.where}; {spec.name} {bad}")
                continue
            values[spec.name] = _as_kind(spec, v)
        per_input.append(values)
    glob: dict[str, Any] = {}
    for spec in method.params:
        if spec.scope != "global":
            continue
        v = _first(shared, spec.name, out_name, layer, n)
        v = spec.default if v is None else v
        if v is None:
            problems.append(f"tensor `{out_name}`: parameter `{spec.name}` has no value in {sl.where} "
                            "(no filter rule matches)")
            continue
        bad = param_problem(spec, v)
        if bad:
            problems.append(f"tensor `{out_name}`: {method.name} parameter `{spec.name}` resolves to {v!r} in "
                            f"{sl.where}; {spec.name} {bad}")
            continue
        glob[spec.name] = _as_kind(spec, v)
    return TensorParams(per_input=tuple(per_input), glob=glob, seed=seed), problems


@dataclass(slots=True)
class _Acc:
    """The planned tensors and the problems found, as `_Selection` wants them."""

    planned: list[PlannedTensor]
    warnings: list[str]
    missing: list[str]
    mismatched: list[str]
    param_problems: list[str]


def select_slices(cfg: MergeConfig, method: Method, sources: Sequence[str],
                  catalogs: Mapping[str, Mapping[str, TensorInfo]], *, seed: int,
                  quant: Mapping[str, QuantSpec] | None, keep: Mapping[str, TensorInfo] | None) -> tuple[Any, int]:
    """`cfg.slices` as build_plan's selection (`planner.build._Selection`), and the most method
    inputs any tensor has (buffers are sized for it). Output order: embeddings, the layers in
    output order (each in its source's file order), then the tensors after the layers."""
    from moemerge.planner.build import _Selection

    if quant or keep:
        raise PlanError("slices with a quantized output are not supported: the output layers are renumbered, "
                        "so the inputs' quantized layout does not describe them; add `--quantize none` "
                        "(the quantized inputs are read dequantized and written unquantized)")
    acc = _Acc(planned=[], warnings=[], missing=[], mismatched=[], param_problems=[])
    _warn(cfg, method, acc)
    take_last = (cfg.non_float or ("last" if method.name in _AVERAGES else "equal")) == "last"
    most = 0
    for g in _groups(cfg, catalogs):
        most = max(most, _expand(cfg, method, sources, catalogs, g, acc, take_last=take_last, seed=seed))
    sel = _Selection(planned=tuple(acc.planned), warnings=tuple(acc.warnings), unsupported=(),
                     missing=tuple(acc.missing), mismatched=tuple(acc.mismatched),
                     param_problems=tuple(acc.param_problems))
    return sel, max(most, 1)


def _expand(cfg: MergeConfig, method: Method, sources: Sequence[str],
            catalogs: Mapping[str, Mapping[str, TensorInfo]], g: _Group, acc: _Acc, *, take_last: bool,
            seed: int) -> int:
    """The planned tensors of one module's slices (appended to `acc`); the most method inputs
    any of them has."""
    layers = g.layers
    resolved = _resolve_ranges(g.slices, layers)
    first, last = resolved[0], resolved[-1]
    ref_model = first.spec.sources[0].model
    ref = layers[ref_model]
    _check_architecture(resolved, layers, catalogs, acc)
    most = 0

    def plan(sl: SliceSpec, models: Sequence[str], names: Sequence[str], out_name: str,
             layer: int | None, n: int) -> None:
        nonlocal most
        base = slice_bases(cfg, method, sl)
        if base is not None and base not in models:  # the last slice's sources, cut to the first's count
            acc.param_problems.append(
                f"tensor `{out_name}`: base_model {base} is not among the sources it is merged from "
                f"({', '.join(models)}); MergeKit merges the tensors after the layers from the last slice's "
                "first N sources, N the first slice's source count: list the base among those")
            return
        pairs = list(zip(models, names))
        ins = [p for p in pairs if p[0] != base]
        used = ([p for p in pairs if p[0] == base] if base is not None else []) + ins
        infos: list[TensorInfo] = []
        for model, name in used:
            info = catalogs[model].get(name)
            if info is None:
                acc.missing.append(f"tensor `{name}` is missing in {model} ({sl.where}; output `{out_name}`)")
            else:
                infos.append(info)
        if len(infos) != len(used):
            return
        r = infos[0]
        for (model, name), info in zip(used, infos):
            if info.shape != r.shape:
                acc.mismatched.append(f"{model}/{info.file}: tensor `{name}` is {list(info.shape)}, {used[0][0]} "
                                      f"has {list(r.shape)} for `{r.name}` ({sl.where}); inputs must share one "
                                      "architecture")
            elif is_float(info.dtype) != is_float(r.dtype) or (not is_float(r.dtype) and info.dtype != r.dtype):
                acc.mismatched.append(f"{model}/{info.file}: tensor `{name}` is {info.dtype}, {used[0][0]} has "
                                      f"{r.dtype} ({sl.where}); integer tensors must match exactly")
        src = {m: sources.index(m) for m, _ in used}
        inputs = tuple(src[m] for m, _ in ins)
        b = src[base] if base is not None else None
        newest = infos[-1]
        if take_last and (not is_float(newest.dtype) or out_name.endswith("_extra_state")):
            acc.planned.append(PlannedTensor(name=out_name, infos=(newest,), method="copy", out_dtype=newest.dtype,
                                             inputs=inputs[-1:], base=None))
            return
        if not is_float(r.dtype):
            acc.planned.append(PlannedTensor(name=out_name, infos=tuple(infos), method="copy", out_dtype=r.dtype,
                                             inputs=inputs, base=b))
            return
        params, probs = _params(method, cfg, sl, ins, out_name, layer, n, seed)
        acc.param_problems.extend(probs)
        if not probs:
            msg = method.check_tensor(params)
            if msg:
                acc.param_problems.append(f"tensor `{out_name}`: {msg}")
        most = max(most, len(inputs))
        out_dtype = cfg.out_dtype or cfg.dtype or ("BF16" if r.codec else r.dtype)
        acc.planned.append(PlannedTensor(name=out_name, infos=tuple(infos), method=method.name, out_dtype=out_dtype,
                                         inputs=inputs, base=b, params=params))

    pre = [n for n in ref.others if g.is_pre(n)]
    post = [n for n in ref.others if not g.is_pre(n)]
    head = [s.model for s in first.spec.sources]
    for name in pre:
        plan(first.spec, head, [name] * len(head), name, None, 1)
    out_layer = 0
    for r in resolved:
        for i in range(r.length):
            lead = layers[r.spec.sources[0].model].by_layer.get(r.ranges[0][0] + i, [])
            for name in lead:  # the first source's tensors of this layer say what the layer holds
                names = [_renumber(name, a + i, ref.rx) for a, _ in r.ranges]
                plan(r.spec, [s.model for s in r.spec.sources], names, _renumber(name, out_layer, ref.rx), i,
                     r.length)
            out_layer += 1
    tail = [s.model for s in last.spec.sources][:len(head)]
    if len(last.spec.sources) > len(head):
        acc.warnings.append(
            f"{last.spec.where} has {len(last.spec.sources)} sources and the first slice {len(head)}: the tensors "
            f"after the layers (final norm, lm_head) are merged from {', '.join(tail)} only, as MergeKit 0.1.5 does")
    for name in post:
        plan(last.spec, tail, [name] * len(tail), name, None, 1)
    return most


def _warn(cfg: MergeConfig, method: Method, acc: _Acc) -> None:
    if cfg.base_model and method.base == "none":
        acc.warnings.append(f"base_model is not merged by {method.name}; its config and tokenizer files are copied")
    scopes = [cfg.parameters, cfg.module_parameters]
    for sl in cfg.slices:
        scopes += [sl.parameters, sl.module_parameters, *(s.parameters for s in sl.sources)]
        if sl.residual_weight is not None:
            acc.warnings.append(f"{sl.where}.residual_weight has no effect (MergeKit 0.1.5 ignores it too)")
    for name in method.ignored_params:
        if any(name in s for s in scopes):
            acc.warnings.append(f"parameter `{name}` has no effect on {method.name} (MergeKit ignores it too)")


def _check_architecture(resolved: Sequence[_Resolved], layers: Mapping[str, _Layers],
                        catalogs: Mapping[str, Mapping[str, TensorInfo]], acc: _Acc) -> None:
    """Every model a slice reads shares the first model's architecture: the same tensors
    outside the layers, and the same shape for each in-layer tensor the first model has.
    Layers of another width stacked into one model would load as a broken model."""
    ref_model = resolved[0].spec.sources[0].model
    ref, ref_cat = layers[ref_model], catalogs[ref_model]
    for r in resolved:
        for j, s in enumerate(r.spec.sources):
            if s.model == ref_model:
                continue
            lay, cat = layers[s.model], catalogs[s.model]
            where = f"{r.spec.where}.sources[{j}]"
            for name in ref.others:
                info = cat.get(name)
                if info is not None and info.shape != ref_cat[name].shape:
                    acc.mismatched.append(f"{where}: {s.model} has `{name}` {list(info.shape)}, {ref_model} "
                                          f"{list(ref_cat[name].shape)}; every model a slice reads must share one "
                                          "architecture")
            a, b = r.ranges[j]
            for layer in range(a, b):
                for name in lay.by_layer.get(layer, []):
                    want = ref.suffix_shapes.get(_renumber(name, -1, ref.rx))
                    if want is not None and tuple(cat[name].shape) != want:
                        acc.mismatched.append(f"{where}: {s.model} has `{name}` {list(cat[name].shape)}, "
                                              f"{ref_model}'s layers have {list(want)}; every model a slice reads "
                                              "must share one architecture")


#: config.json integers that say which layers are of which kind by position, and how:
#: `prefix` k: layers < k differ from the rest (DeepSeek's dense layers); `period` s: the kind
#: repeats every s layers (MoE every s-th layer, Gemma's sliding-window pattern).
_LAYER_PATTERNS = {"first_k_dense_replace": "prefix", "decoder_sparse_step": "period", "moe_layer_freq": "period",
                   "interleave_moe_layer_step": "period", "sliding_window_pattern": "period"}


def _check_layer_patterns(side: Mapping[str, Any], mapping: Sequence[int]) -> None:
    """Refuse a layer order that config.json's positional layer patterns cannot describe: the
    output would load with a dense layer's weights where the config expects experts (or a
    sliding-window layer as a global one). A per-layer list (`layer_types`) supersedes the
    sliding-window pattern, and it is remapped instead."""
    problems = []
    for key, kind in _LAYER_PATTERNS.items():
        v = side.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= (0 if kind == "prefix" else 1):
            continue
        if key == "sliding_window_pattern" and isinstance(side.get("layer_types"), list):
            continue
        for i, src in enumerate(mapping):
            same = (i < v) == (src < v) if kind == "prefix" else (i - src) % v == 0
            if not same:
                rule = f"layers below {v} differ from the rest" if kind == "prefix" else f"the layer kind repeats every {v} layers"
                problems.append(f"config.json `{key}: {v}` ({rule}): output layer {i} would be source layer {src}, "
                                "of the other kind; choose layer ranges that keep each layer's position in that "
                                "pattern")
                break
    if problems:
        raise PlanError(problems[0] if len(problems) == 1 else "\n  ".join(["cannot plan these slices:", *problems]))


def slice_config_updates(cfg: MergeConfig, catalogs: Mapping[str, Mapping[str, TensorInfo]],
                         side_config: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """config.json fields the sliced output changes: the layer count (under the key the side
    source uses) and every per-layer list, remapped to the output layers.

    Lists of one entry per layer (`layer_types`, `no_rope_layers`, ...: a key naming layers,
    as long as the old layer count) take the entry of each output layer's source layer; lists
    of layer indices (`mlp_only_layers`) keep the output layers whose source layer was listed.
    The side source's lists are used for every model (the models share one architecture).
    Example: layer_types [a, b, c, d] and slices [0, 2) + [1, 3) -> [a, b, b, c].
    """
    named = [sl for sl in cfg.slices if sl.module != DEFAULT_MODULE]
    if named:  # each part's own keys, maybe nested (`vision_config.depth`): planner/modules.py
        from moemerge.planner.modules import module_config_updates

        maps = {g.module: [layer for _, layer in _output_layers(g)] for g in _groups(cfg, catalogs)}
        return module_config_updates(side_config, maps, str(named[0].architecture))
    mapping = [layer for _, layer in output_layers(cfg, catalogs)]
    side = dict(side_config or {})
    keys = [k for k in _LAYER_COUNT_KEYS if isinstance(side.get(k), int) and not isinstance(side.get(k), bool)]
    return tuple(config_list_updates(side, mapping, keys))


def config_list_updates(side: Mapping[str, Any], mapping: Sequence[int], keys: Sequence[str]) -> list[tuple[str, Any]]:
    """The layer-count keys `keys` (none: `num_hidden_layers`) of the config mapping `side` set to
    the output's count, and its per-layer lists remapped by `mapping` (output layer -> source
    layer); positional layer patterns that `mapping` breaks are refused."""
    _check_layer_patterns(side, mapping)
    updates: list[tuple[str, Any]] = [(k, len(mapping)) for k in keys or ["num_hidden_layers"]]
    old = side[keys[0]] if keys else None
    for key, value in side.items():
        if not isinstance(value, list) or "layer" not in key.lower() or key in keys:
            continue
        if key in _INDEX_LISTS and all(isinstance(x, int) for x in value):
            listed = set(value)
            updates.append((key, [i for i, src in enumerate(mapping) if src in listed]))
        elif old is not None and len(value) == old:
            updates.append((key, [value[src] for src in mapping]))
    return updates
