"""Output layout: which shard each tensor goes in and its byte offset, fixed before compute."""

from __future__ import annotations

import math
from collections.abc import Collection

from moemerge.io.dtypes import itemsize
from moemerge.io.safetensors_format import ShardLayout, build_header

__all__ = ["shard_name", "lay_out_shards"]

#: transformers refuses safetensors files whose metadata lacks a known format
_METADATA = {"format": "pt"}


def shard_name(i: int, n: int) -> str:
    """HF shard naming, 0-based i: shard_name(0, 3) == 'model-00001-of-00003.safetensors'."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def lay_out_shards(
    tensors: list[tuple[str, str, tuple[int, ...]]], shard_size: int, glued: Collection[str] = ()
) -> tuple[list[ShardLayout], dict[str, tuple[str, int]]]:
    """Pack `(name, dtype, shape)` in order into shards of at most `shard_size` data bytes.

    A tensor bigger than `shard_size` gets a shard of its own; one named in `glued` stays in
    the shard of the tensor before it (a quantized tensor's scales beside its codes, written
    together chunk by chunk). Always sharded naming with an
    index (even for one shard): the index is the commit marker, so a half-written output is
    never loadable. Returns the shards and name -> (file, absolute offset).
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t[2]) * itemsize(t[1])
        if groups[-1] and size + nbytes > shard_size and t[0] not in glued:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    shards: list[ShardLayout] = []
    where: dict[str, tuple[str, int]] = {}
    for i, group in enumerate(groups):
        fname = shard_name(i, len(groups))
        header, offsets = build_header(group, _METADATA)
        data = sum(math.prod(s) * itemsize(d) for _, d, s in group)
        shards.append(ShardLayout(file=fname, header=header, size=len(header) + data,
                                  tensors=tuple(n for n, _, _ in group)))
        for name, off in offsets.items():
            where[name] = (fname, off)
    return shards, where
