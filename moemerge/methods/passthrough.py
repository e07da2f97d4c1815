"""passthrough: one input, copied (optionally multiplied by `scale`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.methods.base import Chunk, Method, ParamSpec, TensorParams

__all__ = ["PASSTHROUGH"]


def _apply(chunk: Chunk, stats: Mapping[str, Any], params: TensorParams) -> torch.Tensor:
    out = chunk.input(0, out=chunk.scratch(0))
    scale = params.per_input[0].get("scale")
    if scale is not None and float(scale) != 1.0:
        out.mul_(float(scale))
    return out


PASSTHROUGH = Method(
    name="passthrough",
    pretty_name="Passthrough",
    reference_url="https://github.com/arcee-ai/mergekit",
    params=(ParamSpec(name="scale", scope="model", default=1.0, doc="multiply the tensor by this"),),
    apply=_apply,
    elementwise=True,
    min_inputs=1,
    max_inputs=1,
    working_copies=lambda n: 1,
)
