"""Bounds on what moemerge reads whole from its inputs: small files by size (checked before a
byte is read) and JSON documents without repeated keys, so that a hostile or corrupt input
fails with one line instead of exhausting memory or being read ambiguously.
"""

from __future__ import annotations

import json
from typing import Any

from moemerge.errors import CheckpointError
from moemerge.sizes import format_size

__all__ = [
    "MAX_JSON_BYTES", "MAX_TOKENIZER_BYTES", "MAX_OWN_JSON_BYTES", "MAX_TENSORS",
    "check_size", "read_limited", "loads_unique", "check_tensor_count", "DuplicateKey", "no_duplicate_keys",
]

#: config.json, generation_config.json, model.safetensors.index.json. Real ones are KBs; the
#: index of a 92,000-tensor DeepSeek-V3 is about 8 MB. A 500 MB config.json took 8.4 GB of
#: memory to parse and was copied into the output (issue 11).
MAX_JSON_BYTES = 64_000_000
#: Tokenizer files (tokenizer.json, vocab, merges, sentencepiece .model): real tokenizer.json
#: files are 10-30 MB (the largest vocabularies about 35 MB), so this is generous.
MAX_TOKENIZER_BYTES = 256_000_000
#: Documents moemerge writes itself (its manifest, state metadata): about 200 bytes a tensor.
MAX_OWN_JSON_BYTES = 256_000_000
#: Tensors in one checkpoint, checked as each header is parsed (before any per-tensor work).
#: The largest real layouts have ~100k-150k (DeepSeek-V3: 92k with its FP8 scales; Kimi K2:
#: ~140k); the limit leaves room for larger expert counts. Planning costs per tensor (2 x 100k
#: tiny tensors: 8 s, 0.43 GB; 2 x 500k: 132 s, 1.5 GB on a busy 2-core machine; 2 x 1M took
#: 451 s and 4 GB, issue 11); above the limit a checkpoint is refused in about a second.
MAX_TENSORS = 500_000


def check_size(size: int, *, where: str, limit: int, what: str) -> None:
    """Refuse a file of `size` bytes above `limit`: the message names the file, size and limit."""
    if size > limit:
        raise CheckpointError(
            f"{where}: is {format_size(size)}, above the {format_size(limit)} limit for {what}; "
            "a real one is far smaller: this file is corrupt or not what its name says (replace "
            "or remove it)"
        )


def read_limited(fs: Any, path: str, *, where: str, limit: int, what: str) -> bytes | None:
    """The bytes of file `path` (None if it is not a file), its size checked before reading."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") != "file":
        return None
    size = info.get("size")
    if size is not None:
        check_size(int(size), where=where, limit=limit, what=what)
        data = bytes(fs.cat_file(path))
    else:  # no size listed: read at most limit + 1 bytes
        data = bytes(fs.cat_file(path, start=0, end=limit + 1))
    check_size(len(data), where=where, limit=limit, what=what)  # a file grown since `info`
    return data


class DuplicateKey(ValueError):
    """A JSON object names a key twice (raised by `no_duplicate_keys`)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads that raises DuplicateKey on a repeated key."""
    out = dict(pairs)  # C speed; a Python loop per key cost seconds on a 1M-tensor header
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return out


def loads_unique(raw: bytes | str, *, where: str) -> Any:
    """json.loads refusing a repeated key in any object (JSON lets the last one win silently,
    so `a: shard1, a: shard2` would read as one tensor from an arbitrary shard).

    A repeated key raises CheckpointError naming it; invalid JSON raises ValueError.
    """
    try:
        return json.loads(raw, object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as e:
        raise CheckpointError(
            f"{where}: names `{e.key}` twice; JSON lets the last one silently win, so the file is "
            "ambiguous: fix or re-download it"
        ) from e


def check_tensor_count(n: int, *, where: str) -> None:
    """Refuse a checkpoint (or one of its shards) of more than MAX_TENSORS tensors."""
    if n > MAX_TENSORS:
        raise CheckpointError(
            f"{where}: holds {n:,} tensors, above moemerge's limit of {MAX_TENSORS:,} per checkpoint "
            "(real models have ~150k at most; planning costs time and memory per tensor): merge "
            "a checkpoint with fewer, larger tensors"
        )
