"""Small files that travel with the weights: model config, generation config, tokenizer."""

from __future__ import annotations

import json
import re
from typing import Any

from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io import limits
from moemerge.io.limits import read_limited

__all__ = ["MODEL_FILES", "is_tokenizer_file", "side_file_limit", "read_side_files", "retag_config_dtype",
           "update_config"]

MODEL_FILES = ("config.json", "generation_config.json")
_TOKENIZER = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|"
    r".*\.model|chat_template.*|preprocessor_config\.json)$"
)
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def side_file_limit(name: str) -> int:
    """The size limit for the file `name` beside the weights (`io.limits`)."""
    if is_tokenizer_file(name):
        return limits.MAX_TOKENIZER_BYTES
    if name in MODEL_FILES or name.endswith(".index.json"):
        return limits.MAX_JSON_BYTES
    return limits.MAX_OWN_JSON_BYTES


def is_tokenizer_file(name: str) -> bool:
    return bool(_TOKENIZER.match(name)) and not name.endswith(".safetensors")


def read_side_files(url: str, storage_options: dict[str, Any] | None, *, model: bool, tokenizer: bool) -> dict[str, bytes]:
    """The model config files and/or tokenizer files found directly under `url`."""
    fs, root = storage.resolve(url, storage_options)
    out: dict[str, bytes] = {}
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError as e:
        # silently copying nothing would ship a model without its tokenizer
        raise CheckpointError(
            f"{url}: does not exist, so its config/tokenizer files cannot be copied "
            "(check `tokenizer_source` / `base_model`)"
        ) from e
    except NotADirectoryError:
        return out
    for entry in sorted(entries, key=lambda x: str(x["name"])):
        p = str(entry["name"])
        name = p.rstrip("/").rsplit("/", 1)[-1]
        wanted = (model and name in MODEL_FILES) or (tokenizer and is_tokenizer_file(name))
        if wanted and entry.get("type") == "file":
            # the listing's size is checked before a byte is read (a 500 MB config.json took
            # 8.4 GB to handle and was copied into the output)
            data = read_limited(fs, p, where=f"{url.rstrip('/')}/{name}", limit=side_file_limit(name), what=name)
            if data is not None:
                out[name] = data
    return out


def retag_config_dtype(raw: bytes, dtype: str) -> bytes:
    """config.json with its dtype fields (`torch_dtype`, transformers 5's `dtype`) set to `dtype`."""
    try:
        cfg = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(cfg, dict):
        return raw
    name = _DTYPE_NAMES.get(dtype, dtype)
    cfg["torch_dtype"] = name
    if "quantization_config" in cfg and not dtype.startswith("F8"):
        # quantized inputs (FP8, MXFP4, ...) were dequantized: the weights are plain now (a
        # requantized output gets its config back from planner.quant.with_quant_config)
        del cfg["quantization_config"]
    if "dtype" in cfg:
        cfg["dtype"] = name
    return (json.dumps(cfg, indent=2) + "\n").encode()


def update_config(raw: bytes, updates: tuple[tuple[str, Any], ...]) -> bytes:
    """config.json with each top-level `(key, value)` of `updates` set (nothing to set: `raw`).

    An unreadable config.json with updates to make is an error: writing it unchanged would ship
    weights whose shapes or layer count it does not describe."""
    if not updates:
        return raw
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"config.json is not JSON ({e}); cannot set {', '.join(k for k, _ in updates)}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json is not a JSON object; cannot set {', '.join(k for k, _ in updates)}")
    for key, value in updates:
        cfg[key] = value
    return (json.dumps(cfg, indent=2) + "\n").encode()
