"""The model card (`README.md`) and MergeKit's config copy (`mergekit_config.yml`) written beside
a merged model, as `mergekit-yaml --write-model-card` (its default) writes them."""

from __future__ import annotations

from typing import Any

import yaml

from moemerge.config import MergeConfig

from moemerge.io.writer import CARD_NAME, MERGEKIT_CONFIG_NAME

__all__ = ["card_files"]


def card_files(cfg: MergeConfig, source: dict[str, Any]) -> dict[str, bytes]:
    """`{README.md: card, mergekit_config.yml: config}` for a merge by `cfg`, whose config as
    given (storage options left out) is `source`. The card's front matter lists the input
    models as `base_model` (the base first, if any), tags `merge` and `moemerge`."""
    from moemerge.methods import get_method

    from dataclasses import replace

    from moemerge.io.hub import display_reference as shown  # `org/name`, as written, not `hf://org/name`

    cfg = replace(cfg, base_model=shown(cfg.base_model) if cfg.base_model else None,
                  models=tuple(replace(m, model=shown(m.model)) for m in cfg.models))
    method = get_method(cfg.merge_method)
    config_yaml = yaml.safe_dump(source, sort_keys=False)
    models = list(dict.fromkeys(([cfg.base_model] if cfg.base_model else []) + [m.model for m in cfg.models]))
    front = yaml.safe_dump({"base_model": models, "library_name": "transformers", "tags": ["merge", "moemerge"]},
                           sort_keys=False)
    lines = [
        "---", front.rstrip("\n"), "---", "",
        "# Merged model", "",
        "This model was merged with moemerge, a streaming MergeKit-compatible merger, using the "
        f"[{method.pretty_name}]({method.reference_url}) method"
        + (f", with `{cfg.base_model}` as the base." if cfg.base_model else "."), "",
        "## Models merged", "",
        *[f"- `{m}`" for m in models if m != cfg.base_model], "",
        "## Configuration", "",
        "The YAML configuration used to produce this model:", "",
        "```yaml", config_yaml.rstrip("\n"), "```", "",
    ]
    return {CARD_NAME: "\n".join(lines).encode(), MERGEKIT_CONFIG_NAME: config_yaml.encode()}
