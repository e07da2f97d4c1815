"""The parts (`modules:`) of multi-part models, by architecture: which tensors, layers and
config.json keys make each part (moemerge's own table; MergeKit 0.1.5 names the same parts)."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moemerge.errors import PlanError
from moemerge.slices_config import DEFAULT_MODULE

if TYPE_CHECKING:
    from moemerge.config import MergeConfig

__all__ = ["ModuleDef", "Layout", "LAYOUTS", "layout_for", "with_module_layout", "module_config_updates"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleDef:
    """One part of a multi-part model."""

    name: str
    """MergeKit's name of the part (`text_decoder`, `vision_tower`, `multi_modal_projector`)."""
    prefixes: tuple[str, ...]
    """A tensor is in this part when its name starts with one of these (parts are tried in the
    layout's order, so a narrower prefix of another part listed earlier wins)."""
    layer: re.Pattern[str] | None
    """Finds the layer index (group 1) in a name of this part; None: the part has no layers."""
    count_keys: tuple[str, ...] = ()
    """config.json keys (dotted: `vision_config.depth`) holding the layer count; each present
    one is rewritten."""
    index_keys: tuple[str, ...] = ()
    """config.json lists of this part's layer INDICES (`vision_config.fullatt_block_indexes`)."""
    pre: re.Pattern[str] | None = None
    """Names outside the layers that come before them (embeddings; MergeKit's `pre_weights`):
    merged from the first slice. None: the text rule (`planner.slices.is_pre_weight`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """The parts of one family of architectures."""

    family: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    modules: tuple[ModuleDef, ...]
    """In matching order (see `ModuleDef.prefixes`)."""

    def module(self, name: str) -> ModuleDef:
        return next(m for m in self.modules if m.name == name)

    def module_of(self, tensor: str) -> ModuleDef | None:
        """The part `tensor` belongs to; None: none of them (an unknown tensor)."""
        for m in self.modules:
            if tensor.startswith(m.prefixes):
                return m
        return None


_VISION_PRE = re.compile(r"emb|patch|ln_pre|pre_layrnorm|layernorm_pre|class_embedding")

#: Every known family. Qwen2-VL names: transformers >= 4.52 saves `model.language_model.` /
#: `model.visual.`; older checkpoints (and MergeKit's definitions) use `model.` / `visual.`.
#: LLaVA-style names: `model.language_model.` / `model.vision_tower.` now, `language_model.model.`
#: / `vision_tower.` before.
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        family="qwen2_vl",
        architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
        model_types=("qwen2_vl", "qwen2_5_vl"),
        modules=(
            ModuleDef(name="multi_modal_projector", prefixes=("model.visual.merger.", "visual.merger."), layer=None),
            ModuleDef(name="vision_tower", prefixes=("model.visual.", "visual."),
                      layer=re.compile(r"^(?:model\.)?visual\.blocks\.(\d+)\."),
                      count_keys=("vision_config.depth",), index_keys=("vision_config.fullatt_block_indexes",),
                      pre=_VISION_PRE),
            ModuleDef(name="text_decoder", prefixes=("model.language_model.", "model.", "lm_head."),
                      layer=re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\."),
                      count_keys=("text_config.num_hidden_layers", "num_hidden_layers")),
        ),
    ),
    Layout(
        family="llava",
        architectures=("LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration",
                       "Gemma3ForConditionalGeneration"),
        model_types=("llava", "mistral3", "gemma3"),
        modules=(
            ModuleDef(name="multi_modal_projector",
                      prefixes=("model.multi_modal_projector.", "multi_modal_projector."), layer=None),
            ModuleDef(name="vision_tower", prefixes=("model.vision_tower.", "vision_tower."),
                      layer=re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.encoder\.|transformer\.)"
                                       r"layers\.(\d+)\."),
                      count_keys=("vision_config.num_hidden_layers",), pre=_VISION_PRE),
            ModuleDef(name="text_decoder", prefixes=("model.language_model.", "language_model.", "lm_head."),
                      layer=re.compile(r"^(?:model\.language_model\.|language_model\.model\.)layers\.(\d+)\."),
                      count_keys=("text_config.num_hidden_layers",)),
        ),
    ),
)


def _known() -> str:
    return "; ".join(f"{', '.join(lay.architectures)} (modules {', '.join(sorted(m.name for m in lay.modules))})"
                     for lay in LAYOUTS)


def _describe(config: Mapping[str, Any] | None) -> str:
    archs = (config or {}).get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else "no `architectures`"
    return f"{arch} (model_type {(config or {}).get('model_type')!r})"


def layout_for(config: Mapping[str, Any] | None) -> Layout | None:
    """The layout of the model config.json `config` describes (its first `architectures` entry,
    else its `model_type`); None: not a known multi-part model."""
    cfg = config or {}
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs:
        for lay in LAYOUTS:
            if archs[0] in lay.architectures:
                return lay
    mt = cfg.get("model_type")
    return next((lay for lay in LAYOUTS if mt in lay.model_types), None)


def with_module_layout(cfg: MergeConfig, side: Mapping[str, Any] | None) -> MergeConfig:
    """`cfg` with each slice told the layout family of its model (named `modules:`), checked:
    the module names exist for this architecture; a multi-part model's top-level `slices:` is
    refused as MergeKit refuses it. Reads only config.json (`side`, the first input's)."""
    named = sorted({sl.module for sl in cfg.slices if sl.module != DEFAULT_MODULE})
    lay = layout_for(side)
    if not named:
        if lay is not None:
            raise PlanError(f"the inputs are {_describe(side)}, a model of several parts "
                            f"({', '.join(m.name for m in lay.modules)}): slices of it must be given per part, "
                            "under `modules: {NAME: {slices: ...}}` (MergeKit's rule too)")
        return cfg
    if lay is None:
        raise PlanError(f"`modules`: {', '.join(named)} name(s) parts of a multi-part model, but the inputs are "
                        f"{_describe(side)}, which moemerge's table of multi-part models does not list. Known: "
                        f"{_known()}. For a single-part model use `modules: {{{DEFAULT_MODULE}: ...}}` or "
                        "top-level `slices:` / `models:`")
    names = {m.name for m in lay.modules}
    bad = [n for n in named if n not in names]
    if bad:
        raise PlanError(f"`modules`: {', '.join(f'`{n}`' for n in bad)} is not a part of {_describe(side)}; its "
                        f"parts are {', '.join(sorted(names))}")
    missing = sorted(names - set(named))
    if missing:
        # MergeKit 0.1.5 writes only the listed modules: the output would lack these tensors and
        # transformers would load them as freshly initialized random weights, silently.
        raise PlanError(f"`modules` does not list {', '.join(missing)} of {_describe(side)}: the output would "
                        "lack that part's tensors (MergeKit 0.1.5 drops them) and transformers would load it "
                        "with random weights. List every part; to take one unchanged from one model, give it "
                        "that model alone, e.g. `" + missing[0] + ": {models: [{model: PATH}]}` with a method "
                        "that takes one input (passthrough), or the same models as the others")
    return replace(cfg, slices=tuple(replace(sl, architecture=lay.family) for sl in cfg.slices))


def family(name: str) -> Layout:
    return next(lay for lay in LAYOUTS if lay.family == name)


def _get(d: Mapping[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _parent(d: dict[str, Any], path: str) -> tuple[dict[str, Any], str] | None:
    """The dict holding `path`'s last part, and that part; None when a step is missing."""
    *head, last = path.split(".")
    cur: Any = d
    for part in head:
        cur = cur.get(part) if isinstance(cur, dict) else None
    return (cur, last) if isinstance(cur, dict) and last in cur else None


def module_config_updates(side: Mapping[str, Any] | None, mappings: Mapping[str, Sequence[int]],
                          family_name: str) -> tuple[tuple[str, Any], ...]:
    """config.json fields a module-wise merge changes: each part's layer count (every present
    key of `count_keys`), its per-layer lists (remapped: output layer i takes its source layer's
    entry) and its lists of layer indices (kept where the source layer was listed). `mappings`:
    module -> the source layer of each output layer. Returned as top-level (key, value) pairs
    (a changed `vision_config` is written whole)."""
    from moemerge.planner.slices import config_list_updates

    lay = family(family_name)
    before = dict(side or {})
    after = copy.deepcopy(before)
    for name, mapping in mappings.items():
        mod = lay.module(name)
        if mod.layer is None:
            continue
        found = [p for p in mod.count_keys if isinstance(_get(after, p), int)]
        if not found:
            raise PlanError(f"config.json has none of {', '.join(mod.count_keys)}, the layer count of the "
                            f"{name} module; it cannot describe the output's {len(mapping)} layers")
        for path in found:
            holder = _parent(after, path)
            assert holder is not None
            d, key = holder
            for k, v in config_list_updates(d, mapping, [key]):
                d[k] = v
        for path in mod.index_keys:
            holder = _parent(after, path)
            if holder is not None and isinstance(holder[0][holder[1]], list):
                listed = set(holder[0][holder[1]])
                holder[0][holder[1]] = [i for i, src in enumerate(mapping) if src in listed]
        if name == "vision_tower":
            _check_feature_layer(after, len(mapping))
    return tuple((k, after[k]) for k in after if after[k] != before.get(k))


def _check_feature_layer(cfg: Mapping[str, Any], n: int) -> None:
    """LLaVA's `vision_feature_layer` indexes the vision tower's n + 1 hidden states: a
    shortened tower must still have it."""
    v = cfg.get("vision_feature_layer")
    for i in v if isinstance(v, list) else [v]:
        if isinstance(i, int) and not isinstance(i, bool) and not -(n + 1) <= i <= n:
            raise PlanError(f"config.json `vision_feature_layer: {v}` points past the output's vision tower of {n} "
                            "layers; take more vision layers or edit vision_feature_layer")
