"""The safetensors dtype names, their sizes and torch dtypes.

Plain Python (no torch import): headers are parsed, and plans built, without loading torch;
`to_torch` / `from_torch` import it when a tensor is actually made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "itemsize", "to_torch", "from_torch", "is_float", "parse_dtype_name"]

#: safetensors name -> bytes per element. Unsigned 16/32/64 map to torch's uint types (torch >= 2.3).
DTYPES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: safetensors name -> the torch dtype's attribute name.
_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_FROM_TORCH: dict[str, str] = {f"torch.{v}": k for k, v in _TORCH_NAMES.items()}
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
    return DTYPES[name]


def to_torch(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, _TORCH_NAMES[name])
    return dtype


def from_torch(dtype: torch.dtype) -> str:
    return _FROM_TORCH[str(dtype)]


def is_float(name: str) -> bool:
    return name in _FLOATS


def parse_dtype_name(text: str) -> str | None:
    """A config dtype ('bfloat16', 'float16', 'F32', ...) -> safetensors name, or None."""
    key = str(text).strip()
    if key in DTYPES and key in _FLOATS:
        return key
    return _USER_NAMES.get(key.lower())
