"""The safetensors dtype names, their torch dtypes and sizes."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "itemsize", "to_torch", "from_torch", "is_float", "parse_dtype_name"]

#: safetensors name -> torch dtype. Unsigned 16/32/64 map to torch's uint types (torch >= 2.3).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FROM_TORCH = {v: k for k, v in DTYPES.items()}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

#: Names users write in configs (MergeKit's `dtype:` / `out_dtype:`) -> safetensors name.
_USER_NAMES = {
    "float64": "F64", "fp64": "F64", "double": "F64",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "fp8": "F8_E4M3", "fp8_e4m3": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "fp8_e5m2": "F8_E5M2",
}


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return DTYPES[name].itemsize


def to_torch(name: str) -> torch.dtype:
    return DTYPES[name]


def from_torch(dtype: torch.dtype) -> str:
    return _FROM_TORCH[dtype]


def is_float(name: str) -> bool:
    return name in _FLOATS


def parse_dtype_name(text: str) -> str | None:
    """A config dtype ('bfloat16', 'float16', 'F32', ...) -> safetensors name, or None."""
    key = str(text).strip()
    if key in DTYPES and key in _FLOATS:
        return key
    return _USER_NAMES.get(key.lower())
