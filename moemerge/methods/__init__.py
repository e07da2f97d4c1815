"""Merge methods: one registry, one visible list (name -> Method)."""

from __future__ import annotations

from moemerge.errors import ConfigError
from moemerge.methods.arcee_fusion import ARCEE_FUSION
from moemerge.methods.averages import EMA, MINUS_SQRT, SMA, WMA, average_weights
from moemerge.methods.base import Chunk, Method, ParamSpec, StatPass, TensorParams
from moemerge.methods.generalized import FAMILY
from moemerge.methods.linear import LINEAR
from moemerge.methods.model_stock import MODEL_STOCK
from moemerge.methods.nearswap import NEARSWAP
from moemerge.methods.nuslerp import NUSLERP
from moemerge.methods.passthrough import PASSTHROUGH
from moemerge.methods.ram import RAM, RAMPLUS_TL
from moemerge.methods.sce import SCE
from moemerge.methods.slerp import SLERP
from moemerge.methods.spherical import KARCHER, MULTISLERP

__all__ = [
    "REGISTRY", "get_method", "Method", "ParamSpec", "StatPass", "TensorParams", "Chunk",
    "average_weights",
]

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        LINEAR,
        *FAMILY,  # task_arithmetic, ties, dare_*, breadcrumbs*, della*
        SLERP,
        NEARSWAP,
        NUSLERP,
        MODEL_STOCK,
        SCE,
        MULTISLERP,
        KARCHER,
        ARCEE_FUSION,
        RAM,
        RAMPLUS_TL,
        PASSTHROUGH,
        SMA,
        WMA,
        EMA,
        MINUS_SQRT,
    )
}


def get_method(name: str) -> Method:
    """The registered method `name`; a ConfigError listing valid names otherwise."""
    m = REGISTRY.get(name)
    if m is not None:
        return m
    raise ConfigError(f"`merge_method`: unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
