"""Quantized checkpoints: the codecs, in one list, and the detection that picks them.

From config.json's `quantization_config` and the tensor headers, `find_quantized` decides,
before any work, which logical tensors are stored quantized and how (a `QuantSpec` each);
`dequantizing(ck)` then serves them as real-valued tensors and hides their parts. Supported
`quant_method`s: `fp8` (block scales, `weight_block_size`), `mxfp4` (gpt-oss),
`compressed-tensors` (`float-quantized` FP8: per tensor, channel or block) and `fbgemm_fp8`
(per row); a checkpoint with FP8 + `_scale_inv` pairs and no config is DeepSeek's 128 x 128.
Any other method is refused by name: its integer codes are not weights.

Example::

    ck = dequantizing(Checkpoint.open("gpt-oss-20b"))
    ck.tensors["model.layers.0.mlp.experts.gate_up_proj"].shape   # (32, 2880, 5760), BF16
    ck.specs["model.layers.0.mlp.experts.gate_up_proj"].codec     # 'mxfp4'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint, TensorInfo
from moemerge.io.dtypes import is_float
from moemerge.io.quant.base import Codec, Part, QuantScheme, QuantSpec
from moemerge.io.quant.registry import _BY_NAME, CODECS, get_codec

__all__ = ["CODECS", "get_codec", "parse_scheme", "find_quantized", "dequantizing", "describe",
           "Codec", "Part", "QuantScheme", "QuantSpec"]


#: DeepSeek-V3's tiles: what FP8 + `_scale_inv` without a quantization_config means.
DEFAULT_BLOCK = (128, 128)
_FIX = ("dequantize it to bf16 first (e.g. load it in transformers and save_pretrained), or use the "
        "unquantized release")
#: Names of tensors that hold quantization state, not weights (GPTQ/AWQ/bitsandbytes/MX/FP8).
_QUANT_NAME = re.compile(
    r"(_blocks|_scales?|_scale_inv|input_scale|weight_scale|_zero_point|qweight|qzeros|\.g_idx|"
    r"\.absmax|\.quant_map|\.quant_state|nested_absmax|nested_quant_map|\.SCB|weight_format)$")


#: compressed-tensors' static attention scales: activations, plain floats (not a weight's scale).
_KV_SCALES = ("k_scale", "v_scale", "q_scale")


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v > 0 for v in value):
        return tuple(value)
    return None


def _names(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else ()


def parse_scheme(config: Mapping[str, Any] | None, where: str) -> QuantScheme | None:
    """config.json's `quantization_config` as a scheme (None: not quantized).

    Raises CheckpointError naming the method for anything moemerge cannot dequantize.
    """
    qc = (config or {}).get("quantization_config")
    if qc is None:
        qc = (config or {}).get("compression_config")  # compressed-tensors' older key
    if qc is None:
        return None
    where = f"{where}/config.json"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: `quantization_config` is not an object")
    method = str(qc.get("quant_method", qc.get("quantization_method", "")) or "?")
    fmt = str(qc.get("fmt", "e4m3")).lower()
    fp8 = "F8_E5M2" if fmt == "e5m2" else "F8_E4M3"
    if method == "fp8":
        block = _ints(qc.get("weight_block_size")) if qc.get("weight_block_size") is not None else DEFAULT_BLOCK
        if block is None or len(block) != 2:
            raise CheckpointError(f"{where}: `weight_block_size` is {qc.get('weight_block_size')!r}; "
                                  "block FP8 needs two positive integers, e.g. [128, 128]")
        return QuantScheme(method=method, block=block, fp8=fp8, config=dict(qc), ue8m0=_ue8m0(qc, where),
                           not_converted=_names(qc.get("modules_to_not_convert")))
    if method == "mxfp4":
        return QuantScheme(method=method, config=dict(qc), not_converted=_names(qc.get("modules_to_not_convert")))
    if method == "fbgemm_fp8":
        return QuantScheme(method=method, strategy="row", config=dict(qc),
                           not_converted=_names(qc.get("modules_to_not_convert")))
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise CheckpointError(
        f"{where}: quantization `{method}` is not supported (moemerge reads fp8 block, mxfp4, "
        f"compressed-tensors float-quantized FP8 and fbgemm_fp8); averaging its integer codes would "
        f"give a wrong model: {_FIX}")


def _ue8m0(qc: Mapping[str, Any], where: str) -> bool:
    """Whether block FP8's `scale_fmt` says power-of-two scales (`ue8m0`) or plain (`float`,
    absent); any other value is refused: its scales would be misread."""
    fmt = qc.get("scale_fmt")
    if fmt is None or fmt == "float":
        return False
    if fmt == "ue8m0":
        return True
    raise CheckpointError(f"{where}: `scale_fmt` is {fmt!r}; moemerge reads block FP8 with `float` or `ue8m0` "
                          f"scales only: {_FIX}")


def _compressed_tensors(qc: dict[str, Any], where: str) -> QuantScheme:
    fmt = str(qc.get("format", ""))
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    if fmt != "float-quantized" or not weights or any(
            w.get("type", "float") != "float" or w.get("num_bits", 8) != 8 for w in weights):
        kinds = sorted({f"{w.get('type')} {w.get('num_bits')}-bit" for w in weights}) or ["no weight scheme"]
        raise CheckpointError(
            f"{where}: compressed-tensors format `{fmt or '?'}` ({', '.join(kinds)}) is not supported; "
            f"moemerge reads `float-quantized` FP8 weights only: {_FIX}")
    strategies = {str(w.get("strategy", "tensor")) for w in weights}
    if len(strategies) != 1 or not strategies <= {"tensor", "channel", "block"}:
        raise CheckpointError(f"{where}: compressed-tensors weight strategy {sorted(strategies)} is not "
                              f"supported (tensor, channel or block, one per checkpoint): {_FIX}")
    strategy = strategies.pop()
    block: tuple[int, ...] = ()
    if strategy == "block":
        block = _ints(weights[0].get("block_structure")) or ()
        if len(block) != 2:
            raise CheckpointError(f"{where}: compressed-tensors block strategy without a 2-D `block_structure`")
    return QuantScheme(method="compressed-tensors", strategy=strategy, block=block, config=dict(qc),
                       not_converted=_names(qc.get("ignore")))


def _codec_for(scheme: QuantScheme) -> Codec:
    if scheme.method == "mxfp4":
        return _BY_NAME["mxfp4"]
    if scheme.method == "fp8" or scheme.strategy == "block":
        return _BY_NAME["fp8-block"]
    return _BY_NAME["fp8-channel"]


def find_quantized(tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None,
                   where: str) -> tuple[QuantScheme | None, dict[str, QuantSpec]]:
    """(scheme, logical name -> spec) of a checkpoint, from its config and headers only."""
    scheme = parse_scheme(config, where)
    if scheme is None:  # no config: FP8 + `_scale_inv` pairs are DeepSeek's 128 x 128 blocks
        legacy = QuantScheme(method="fp8", block=DEFAULT_BLOCK)
        specs = _BY_NAME["fp8-block"].find(tensors, legacy, where)
        return (legacy, specs) if specs else (None, {})
    return scheme, _codec_for(scheme).find(tensors, scheme, where)


def _suspects(tensors: Mapping[str, TensorInfo], scheme: QuantScheme | None,
              specs: Mapping[str, QuantSpec]) -> list[str]:
    """Tensors that look like quantization state no codec claimed (never merged or copied)."""
    hidden = {p.name for s in specs.values() for p in s.parts + s.extras}
    out = []
    for n, t in tensors.items():
        if n in hidden:
            continue
        looks = bool(_QUANT_NAME.search(n))
        if not is_float(t.dtype) and (looks or scheme is not None and t.dtype in ("U8", "I8", "I32")):
            out.append(f"`{n}` ({t.dtype} {list(t.shape)})")
        elif scheme is not None and (t.dtype.startswith("F8") or (looks and n.endswith(("_scale", "_scale_inv", "_scales"))
                                                                   and not n.endswith(_KV_SCALES))):
            out.append(f"`{n}` ({t.dtype} {list(t.shape)}, no scale/weight pair)")
    return out


def dequantizing(ck: Checkpoint, *, raw_ok: bool = False) -> Checkpoint:
    """`ck` with its quantized tensors served dequantized (`ck` itself when it has none).

    Tensors that look like quantization state but no codec claims (`*_blocks` without an
    MXFP4 config, an FP8 weight without its scale, GPTQ `qweight`) are refused unless
    `raw_ok` (the YAML's `non_float` says explicitly how to copy non-float tensors).
    """
    from moemerge.io.quant.view import QuantizedView

    where = ck.url
    scheme, specs = find_quantized(ck.tensors, ck.config(), where)
    suspects = _suspects(ck.tensors, scheme, specs)
    if suspects and not raw_ok:
        how = f"quantization `{scheme.method}`" if scheme else "no quantization_config in config.json"
        raise CheckpointError(
            f"{where}: {len(suspects)} tensor(s) look quantized but match no layout moemerge reads "
            f"({how}): {', '.join(suspects[:5])}{' ...' if len(suspects) > 5 else ''}; they would be copied "
            "or averaged as plain numbers. Fix config.json's quantization_config, or set `non_float: equal` "
            "(or `last`) in the YAML to copy them as they are")
    if not specs or scheme is None:  # find_quantized gives specs only with their scheme
        return ck
    view = QuantizedView(ck, scheme, specs)
    view.check_ue8m0()  # `scale_fmt: ue8m0` promises power-of-two scales: a lie is refused before work
    return view


def describe(ck: Checkpoint) -> str | None:
    """One line for `plan`: how `ck` is quantized (None: it is not)."""
    specs: dict[str, QuantSpec] = getattr(ck, "specs", None) or {}
    scheme: QuantScheme | None = getattr(ck, "scheme", None)
    if not specs or scheme is None:
        return None
    codecs = sorted({s.codec for s in specs.values()})
    extra = f" {'x'.join(map(str, scheme.block))} blocks" if scheme.block else (f" per {scheme.strategy}" if scheme.strategy else "")
    # the view's records carry each tensor's stored bytes already (view.py); specs otherwise
    tensors = ck.tensors
    stored = sum(t.stored_nbytes if (t := tensors.get(n)) is not None and t.stored_nbytes is not None
                 else s.stored_nbytes for n, s in specs.items())
    from moemerge.sizes import format_size

    return (f"{ck.url}: {len(specs)} tensors stored quantized ({scheme.method}{extra}, codec "
            f"{'/'.join(codecs)}, {format_size(stored)}), dequantized on read")
