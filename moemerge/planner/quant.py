"""`--quantize`: which logical output tensors are written quantized, in which layout, and the
`quantization_config` that goes into the output's config.json. Headers only, before any work.

- `none`: every tensor in the compute/out dtype; config.json loses `quantization_config`.
- `like-input`: the first input's layout: the tensors it stores quantized (same codec, block
  size, part names and dtypes), the rest as it has them; its `quantization_config`. The
  default when every input is quantized the same way.
- `fp8-block`: 128 x 128 block FP8 (DeepSeek-V3) for the Linear weights a DeepSeek/Qwen FP8
  release quantizes (the first input's quantized set when it has one).
- `mxfp4`: gpt-oss MXFP4 for the fused expert tensors (`mlp.experts.gate_up_proj`, `down_proj`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moemerge.errors import ConfigError
from moemerge.io.checkpoint import Checkpoint, TensorInfo
from moemerge.io.quant.base import QuantScheme, QuantSpec

if TYPE_CHECKING:
    from moemerge.planner.plan import PlannedTensor

__all__ = ["OutputQuant", "QUANTIZE_MODES", "resolve_output_quant", "input_layout", "with_quant_config"]

QUANTIZE_MODES = ("none", "like-input", "fp8-block", "mxfp4")

#: Linear weights a block-FP8 release keeps in bf16: embeddings, lm_head, norms, the router
#: (`mlp.gate.weight`, `router`), the shared-expert gate (DeepSeek-V3 / Qwen3-FP8 files).
_NOT_FP8 = re.compile(r"(embed|lm_head|norm|router|shared_expert_gate|(^|\.)gate\.weight$|score)")
#: gpt-oss fused experts: the only tensors its MXFP4 release quantizes.
_MXFP4 = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")

_FP8_BLOCK = QuantScheme(method="fp8", block=(128, 128), fp8="F8_E4M3",
                         config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]})
_MXFP4_SCHEME = QuantScheme(method="mxfp4", config={
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"]})


#: Why a format cannot take a quantized output (the refusal says it).
_NO_PARTS = {
    "zarr": "a Zarr output keeps one real-valued array per logical tensor, which `moemerge export` "
            "turns back into safetensors",
    "dcp": "a DCP output holds the training model's real-valued state_dict",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputQuant:
    """The output's quantization: mode, the quantized logical tensors, the config to write."""

    mode: str
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    """Logical name -> how it is stored (parts not yet placed)."""
    config: dict[str, Any] | None = None
    """config.json's `quantization_config` (None: removed)."""
    note: str | None = None
    """What `plan` says about the choice."""
    keep: dict[str, TensorInfo] = field(default_factory=dict)
    """Stored tensors beside the quantized ones that are copied from the first input as they
    are (compressed-tensors `input_scale`: an activation statistic, not a weight)."""


def input_layout(ck: Checkpoint) -> tuple[QuantScheme, dict[str, QuantSpec]] | None:
    """A dequantizing view's scheme and quantized logical tensors (None: not quantized)."""
    specs = getattr(ck, "specs", None)
    scheme = getattr(ck, "scheme", None)
    if specs and scheme is not None:
        return scheme, dict(specs)
    return None


def _same(a: QuantScheme, b: QuantScheme) -> bool:
    return (a.method, a.block, a.strategy, a.fp8) == (b.method, b.block, b.strategy, b.fp8)


def _describe(scheme: QuantScheme) -> str:
    if scheme.block:
        pow2 = ", power-of-two (ue8m0) scales" if scheme.ue8m0 else ""
        return f"{scheme.method} {'x'.join(map(str, scheme.block))} blocks{pow2}"
    return scheme.method + (f" per-{scheme.strategy}" if scheme.strategy else "")


def resolve_output_quant(mode: str | None, ckpts: Sequence[Checkpoint], logical: Mapping[str, TensorInfo],
                         *, out_format: str = "safetensors") -> OutputQuant:
    """Decide the output quantization for inputs `ckpts` (dequantizing views, first = the
    layout `like-input` copies); `logical` is the first input's served tensors."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ConfigError(f"--quantize: expected one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    layouts = [input_layout(c) for c in ckpts]
    first = layouts[0] if layouts else None
    if out_format != "safetensors" and mode not in (None, "none"):
        why = _NO_PARTS.get(out_format, f"{out_format} keeps one real-valued array per tensor")
        raise ConfigError(f"--quantize {mode}: quantized output is written as safetensors only ({why}: no place "
                          f"for a quantized tensor's codes and scales); use --format safetensors (the default), "
                          f"or --quantize none to write {out_format} unquantized")
    if out_format != "safetensors":
        return OutputQuant(mode="none", note=(
            f"{out_format} output is unquantized (quantized output is written as safetensors only: "
            "--format safetensors)" if any(lay is not None for lay in layouts) else None))
    if mode is None:
        if first is not None and all(lay is not None and _same(lay[0], first[0]) for lay in layouts):
            mode = "like-input"
            note = (f"output quantized like the inputs ({_describe(first[0])}, fresh scales; "
                    "--quantize none writes unquantized weights)")
        else:
            if any(lay is not None for lay in layouts):
                return OutputQuant(mode="none", note=(
                    "the inputs are not all quantized the same way: the output is unquantized "
                    "(--quantize like-input, fp8-block or mxfp4 writes a quantized one)"))
            return OutputQuant(mode="none")
    else:
        note = None
    if mode == "none":
        return OutputQuant(mode="none", note=note)
    if mode == "like-input":
        if first is None:
            raise ConfigError(f"--quantize like-input: the first input {ckpts[0].url} is not quantized, so "
                              "there is no layout to copy; use --quantize fp8-block or mxfp4, or none")
        scheme, specs = first
        from moemerge.io.quant import get_codec

        cfg = get_codec(next(iter(specs.values())).codec).quantization_config(scheme)
        inner = getattr(ckpts[0], "inner", ckpts[0])
        keep = {x.name: inner.tensors[x.name] for s in specs.values() for x in s.extras if x.name in inner.tensors}
        return OutputQuant(mode=mode, specs=specs, config=cfg, keep=keep,
                           note=note or f"output quantized like {ckpts[0].url} ({_describe(scheme)}, fresh scales)")
    from moemerge.io.quant import get_codec

    codec = get_codec(mode)
    scheme = _FP8_BLOCK if mode == "fp8-block" else _MXFP4_SCHEME
    if mode == "fp8-block" and first is not None and first[0].ue8m0:
        from dataclasses import replace

        scheme = replace(scheme, ue8m0=True)  # DeepSeek-V3.1 in, its power-of-two scales out
    if mode == "fp8-block" and first is not None and first[0].method in ("fp8", "compressed-tensors", "fbgemm_fp8"):
        names = [n for n, s in first[1].items() if len(s.shape) >= 2]  # the input's quantized set
    elif mode == "fp8-block":
        names = [n for n, t in logical.items()
                 if len(t.shape) == 2 and n.endswith(".weight") and not _NOT_FP8.search(n)]
    else:
        names = [n for n, t in logical.items() if len(t.shape) == 3 and _MXFP4.search(n) and t.shape[1] % 32 == 0]
    if not names:
        want = ("2-D Linear `.weight` tensors" if mode == "fp8-block" else
                "fused expert tensors `mlp.experts.gate_up_proj` / `down_proj` [E, K, N], K a multiple of 32")
        raise ConfigError(f"--quantize {mode}: {ckpts[0].url} has no tensor this layout stores ({want}); "
                          "use --quantize none")
    specs = {}
    for n in names:
        try:
            specs[n] = codec.layout(n, logical[n].shape, scheme)
        except ValueError as e:
            raise ConfigError(f"--quantize {mode}: {e}") from e
    config = codec.quantization_config(scheme)
    if mode == "fp8-block":
        # transformers converts every nn.Linear not listed here (and, given a list, adds no
        # default skips such as lm_head): list each matrix we leave unquantized, as Qwen3-FP8 does
        config["modules_to_not_convert"] = sorted(
            n[:-len(".weight")] for n, t in logical.items() if n.endswith(".weight") and len(t.shape) == 2
            and n not in specs)
    return OutputQuant(mode=mode, specs=specs, config=config,
                       note=f"output quantized as {mode} ({len(specs)} tensors, fresh "
                            f"{'power-of-two (ue8m0) ' if scheme.ue8m0 else ''}scales)")


def plan_with_quant(plan: Any, oq: OutputQuant) -> Any:
    """`plan` carrying the choice: a note for `plan`, `quantize` and `quantization_config`."""
    from dataclasses import replace

    return replace(plan, notes=plan.notes + ((oq.note,) if oq.note else ()), quantize=oq.mode,
                   quantization_config=oq.config)


def with_quant_config(raw: bytes, config: object) -> bytes:
    """config.json with `quantization_config` set to `config` (removed when it is not a mapping:
    None, as `Plan.quantization_config` is for an unquantized output)."""
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(doc, dict):
        return raw
    if not isinstance(config, dict):
        if "quantization_config" not in doc:
            return raw
        doc.pop("quantization_config")
    else:
        doc["quantization_config"] = config
    return (json.dumps(doc, indent=2) + "\n").encode()


# -- helpers for planner/build.py ----------------------------------------------------------------


def quant_for(specs: Mapping[str, QuantSpec] | None, name: str, shape: tuple[int, ...]) -> QuantSpec | None:
    """The spec of an output tensor merged by a method (None: written unquantized)."""
    spec = (specs or {}).get(name)
    return spec if spec is not None and tuple(spec.shape) == tuple(shape) and spec.rows > 0 else None


def chunk_align(spec: QuantSpec) -> int:
    """Rows a chunk of this tensor is a multiple of: a scale block's, or the whole tensor when
    one scale spans it (per-tensor FP8 needs the merged tensor's amax before any code)."""
    from moemerge.io.quant import get_codec

    return spec.rows if get_codec(spec.codec).needs_amax(spec) else max(1, spec.row_align)


def layout_entries(planned: Sequence[PlannedTensor]) -> tuple[list[tuple[str, str, tuple[int, ...]]], set[str]]:
    """(name, dtype, shape) of every stored output tensor in order, a quantized tensor's parts
    in its place; and the parts that must share the shard of the part before them."""
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    glued: set[str] = set()
    for p in planned:
        spec = p.quant
        if spec is None:
            entries.append((p.name, p.out_dtype, p.infos[0].shape))
            continue
        for i, part in enumerate(spec.parts):
            entries.append((part.name, part.dtype, part.shape))
            if i:
                glued.add(part.name)
    return entries, glued


def placed(spec: QuantSpec, where: Mapping[str, tuple[str, int]]) -> Any:
    """The spec with every part's place in the output (an `io.quant_out.OutQuant`)."""
    from moemerge.io.quant_out import OutQuant, PartPlace

    return OutQuant(spec=spec, places=tuple(
        PartPlace(role=p.role, name=p.name, dtype=p.dtype, shape=p.shape, file=where[p.name][0],
                  offset=where[p.name][1]) for p in spec.parts))


def chunk_parts_bytes(spec: QuantSpec, rows: int) -> int:
    """The most bytes of stored parts a chunk of `rows` logical rows produces."""
    from moemerge.io.quant_out import OutQuant, parts_bytes

    # by what decides it: a layout has a few dozen distinct shapes among 92k tensors
    key = (spec.codec, spec.shape, spec.scheme, tuple((p.role, p.dtype, p.shape) for p in spec.parts), rows)
    got = _PARTS_BYTES.get(key)
    if got is None:
        if len(_PARTS_BYTES) > 4096:
            _PARTS_BYTES.clear()
        got = _PARTS_BYTES[key] = parts_bytes(OutQuant.unplaced(spec), 0, min(rows, spec.rows))
    return got


_PARTS_BYTES: dict[tuple[Any, ...], int] = {}


def check_streamable(plan: Any, kind: str) -> None:
    """Refuse, before any output, a quantized tensor a streamed object-storage shard cannot take.

    A streamed shard takes bytes in file order and holds back at most `s3_writer.MAX_PENDING`
    bytes that arrive early; a quantized tensor's scales come after its codes in the file but
    are produced chunk by chunk with them, so all of them wait for the last codes (block FP8:
    1/4096 of the codes, fine; MXFP4: 1/16, 66 MB for gpt-oss-120b's gate_up_proj).
    """
    if kind != "remote":
        return
    from moemerge.io.s3_writer import MAX_PENDING
    from moemerge.sizes import format_size

    for t in plan.tensors:
        held = sum(p.nbytes for p in t.quant.places[1:]) if t.quant is not None else 0
        if held > MAX_PENDING:
            raise ConfigError(
                f"tensor `{t.name}`: its {t.quant.spec.codec} scales ({format_size(held)}) would wait in memory "
                f"for its codes in a streamed upload (at most {format_size(MAX_PENDING)} may arrive out of file "
                "order); write the output to a local directory and upload it, or use --quantize none")
