"""The one visible list of quantization codecs (as zarr lists its codecs): name -> codec."""

from __future__ import annotations

from moemerge.io.quant.base import Codec
from moemerge.io.quant.block_fp8 import BlockFP8
from moemerge.io.quant.channel_fp8 import ChannelFP8
from moemerge.io.quant.mxfp4 import MXFP4

__all__ = ["CODECS", "get_codec"]

#: Every layout moemerge reads and writes, in the order detection tries them.
CODECS: tuple[Codec, ...] = (
    BlockFP8(),
    MXFP4(),
    ChannelFP8(),
)
_BY_NAME = {c.name: c for c in CODECS}


def get_codec(name: str) -> Codec:
    """The registered codec `name` (`fp8-block`, `mxfp4`, `fp8-channel`)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown quantization codec {name!r}; known: {', '.join(_BY_NAME)}") from None
