"""`torch`, imported on first use: modules that compute write `from moemerge._lazy import torch`
so that `--help`, `--version`, `plan`, `inspect` and `verify` (headers only) never load it
(importing torch costs about 1.5 s and 220 MB; tests/test_startup.py checks it stays out)."""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

__all__ = ["torch"]


class _LazyModule(types.ModuleType):
    """Stands in for a module until an attribute is read; then imports it and copies its
    namespace in, so later reads are plain attribute reads (as fast as the module's own)."""

    def __getattr__(self, attr: str) -> Any:
        mod = importlib.import_module(self.__name__)
        self.__dict__.update(mod.__dict__)
        return getattr(mod, attr)  # also what the module adds later (its lazy submodules)


if TYPE_CHECKING:
    import torch as torch
else:
    torch = _LazyModule("torch")
