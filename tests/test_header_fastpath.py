"""The fast header parse (io/safetensors_format.py) refuses what the careful one refused: a key
repeated anywhere (also behind whitespace, escapes or nesting), malformed entries with the same
messages; and inputs sharing shard records (io.checkpoint.shared_records) read as if opened alone."""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import pytest

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint, shared_records
from moemerge.io.quant import dequantizing
from moemerge.io.safetensors_format import build_header, parse_header
from moemerge.synthetic_headers import write_headers_only

_ENTRY = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'


def _parse(text: str, data: int) -> object:
    raw = text.encode()
    return parse_header(raw, file_size=8 + len(raw) + data, where="f.safetensors")


@pytest.mark.parametrize("text, key", [
    ('{"a":%s,"a":%s}' % (_ENTRY % (0, 4), _ENTRY % (4, 8)), "a"),
    ('{"a" :%s,"a"\n:%s}' % (_ENTRY % (0, 4), _ENTRY % (4, 8)), "a"),  # whitespace before the colon
    ('{"a":%s,"\\u0061":%s}' % (_ENTRY % (0, 4), _ENTRY % (4, 8)), "a"),  # the same key, escaped
    ('{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "dtype"),
    ('{"a":{"\\u0064type":"F16","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "dtype"),
    ('{"__metadata__":{"x":"1","x":"2"},"a":%s}' % (_ENTRY % (0, 4)), "x"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":{"k":1,"k":2}}}', "k"),  # nested
    ('{"__metadata__":{"v":"ends\\":"},"a":%s,"a":%s}' % (_ENTRY % (0, 4), _ENTRY % (4, 8)), "a"),
])
def test_a_repeated_key_anywhere_is_refused(text: str, key: str) -> None:
    with pytest.raises(CheckpointError, match=f"header names `{key}` twice"):
        _parse(text, 8)


@pytest.mark.parametrize("entry, message", [
    ('{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}', "shape [1.0] is not a list of non-negative ints"),
    ('{"dtype":"F32","shape":[true],"data_offsets":[0,4]}', "shape [True] is not a list of non-negative ints"),
    ('{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}', "shape [-1] is not a list of non-negative ints"),
    ('{"dtype":"F32","shape":1,"data_offsets":[0,4]}', "shape 1 is not a list of non-negative ints"),
    ('{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}', "data_offsets [0, 4.0] are not [begin, end]"),
    ('{"dtype":"F32","shape":[1],"data_offsets":[4,0]}', "data_offsets [4, 0] are not [begin, end]"),
    ('{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}', "data_offsets [0, 4, 8] are not [begin, end]"),
    ('{"dtype":"X","shape":[1],"data_offsets":[0,4]}', "unknown dtype 'X'"),
    ('{"dtype":"F32","shape":[2],"data_offsets":[0,4]}', "data_offsets [0, 4] span 4 bytes but F32[2] needs 8"),
    ('[1]', "entry is not an object"),
])
def test_malformed_entries_are_refused_by_name(entry: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(f"f.safetensors: tensor `w`: {message}")):
        _parse('{"w":%s}' % entry, 4)


def test_fresh_random_headers_parse_to_what_was_written() -> None:
    rng = random.Random()
    dtypes = ["F32", "BF16", "F8_E4M3", "I64", "BOOL", "U8"]
    tensors = [(f"t.{i}.{rng.randrange(10**6)}", rng.choice(dtypes),
                tuple(rng.randrange(0, 5) for _ in range(rng.randrange(0, 4)))) for i in range(200)]
    header, offsets = build_header(tensors, {"format": "pt", "k": "v:\"x\""})
    n = struct.unpack("<Q", header[:8])[0]
    size = len(header) + sum(_nbytes(d, s) for _, d, s in tensors)
    parsed = parse_header(header[8:8 + n], file_size=size, where="f")
    assert parsed.metadata == {"format": "pt", "k": "v:\"x\""}
    assert [(e.name, e.dtype, e.shape, e.start) for e in parsed.tensors.values()] == \
        [(name, d, s, offsets[name]) for name, d, s in tensors]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    from moemerge.io.dtypes import itemsize

    out = itemsize(dtype)
    for d in shape:
        out *= d
    return out


def test_inputs_sharing_records_read_as_opened_alone(tmp_path: Path) -> None:
    """Three inputs: two with byte-identical headers, one with other metadata of the same length
    (same offsets, other bytes). Shared or not, every record and quantized spec is equal."""
    write_headers_only(tmp_path / "a", layers=3, experts=4, shards=3, metadata={"who": "a"})
    write_headers_only(tmp_path / "b", layers=3, experts=4, shards=3, metadata={"who": "a"})
    write_headers_only(tmp_path / "c", layers=3, experts=4, shards=3, metadata={"who": "c"})
    alone = [dequantizing(Checkpoint.open(str(tmp_path / n))) for n in "abc"]
    with shared_records():
        shared = [dequantizing(Checkpoint.open(str(tmp_path / n))) for n in "abc"]
    for x, y in zip(alone, shared):
        assert x.tensors == y.tensors and list(x.tensors) == list(y.tensors)
        assert getattr(x, "specs") == getattr(y, "specs")
        assert x.header_digests == y.header_digests
    assert shared[0].header_digests == shared[1].header_digests != shared[2].header_digests
    assert all(shared[0].tensors[n] is shared[1].tensors[n] for n in shared[0].tensors)  # shared, not copied
    for c in alone + shared:
        c.close()


def test_index_names_a_tensor_the_shard_lacks(tmp_path: Path) -> None:
    write_headers_only(tmp_path / "a", layers=3, experts=2, shards=2)
    index = tmp_path / "a" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.layers.0.mlp.ghost.weight"] = next(iter(doc["weight_map"].values()))
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="tensor `model.layers.0.mlp.ghost.weight` is listed in"):
        Checkpoint.open(str(tmp_path / "a"))
