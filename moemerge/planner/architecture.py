"""Which architecture each input declares (config.json), and MergeKit's rule against mixing them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["architecture_of", "mixed_architectures"]


def architecture_of(config: Mapping[str, Any] | None) -> str | None:
    """`LlamaForCausalLM (llama)`: config.json's first `architectures` entry and its `model_type`;
    None when the input has no config.json or it names neither (a DCP or Zarr snapshot)."""
    if not config:
        return None
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    kind = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if arch is None and kind is None:
        return None
    return f"{arch or '?'} ({kind or '?'})"


def mixed_architectures(configs: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str | None:
    """The problem when inputs declare different architectures (MergeKit refuses them without
    `--allow-crimes`), else None. Inputs that declare none are not compared.

    Tensor names and shapes are checked by the planner either way; this catches what they
    cannot: two families with the same weights but another meaning (e.g. rotary layout,
    norm placement), whose average loads and runs but is not a model of either."""
    seen = [(url, a) for url, a in ((u, architecture_of(c)) for u, c in configs) if a is not None]
    kinds = {a for _, a in seen}
    if len(kinds) <= 1:
        return None
    listed = "; ".join(f"{url} is {a}" for url, a in seen)
    return (f"the inputs mix architectures ({listed}); merging different architectures is refused as "
            "MergeKit refuses it: pass --allow-crimes (API: allow_crimes=True) to merge them anyway "
            "(tensor names and shapes must still match)")
