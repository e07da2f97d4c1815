"""Commit a finished output: its side files, the index, then the manifest (written last, so its
presence is the commit), each built from the plan and the tensors' checksums. One code path for
every job that writes a model (`moemerge run`, `pma`, `pma update`)."""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moemerge.settings import VERSION as __version__
from moemerge.io.manifest import Manifest, TensorEntry
from moemerge.io.sidefiles import retag_config_dtype, update_config
from moemerge.io.writer import CONFIG_COPY_NAME, ModelWriter
from moemerge.planner.plan import Plan
from moemerge.planner.quant import with_quant_config

__all__ = ["main_dtype", "output_index", "output_manifest", "commit_output"]


def main_dtype(p: Plan) -> str:
    """The dtype most merged elements are written in (config.json's `torch_dtype`)."""
    by_bytes: Counter[str] = Counter()
    for t in p.tensors:
        if t.method != "copy" and t.quant is None:  # quantized ones are merged in F32, stored as parts
            by_bytes[t.out_dtype] += t.numel
    return by_bytes.most_common(1)[0][0] if by_bytes else "F32"


def output_index(p: Plan) -> dict[str, Any]:
    """The safetensors index: every stored tensor's shard."""
    return {
        "metadata": {"total_size": p.bytes_written, "moemerge_version": __version__},
        "weight_map": {n: f for t in p.tensors for n, f, _, _ in t.stored()},
    }


def output_manifest(p: Plan, digests: Mapping[str, str], *, config: Any, seed: int,
                    inputs: Sequence[str] | None = None, extra: Mapping[str, Any] | None = None) -> Manifest:
    """The manifest of a finished output of `p`: every stored tensor's shard, dtype, shape and
    sha256 (`digests`), what made it (`config`, `inputs`: the plan's sources by default,
    `seed`), then the keys of `extra` (`pma`)."""
    return Manifest(
        moemerge_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        method=p.method,
        config_hash=p.config_hash,
        config=config,
        inputs=tuple(p.sources if inputs is None else inputs),
        seed=seed,
        dtype=main_dtype(p),
        files={s.file: s.size for s in p.shards},
        tensors={
            n: TensorEntry(file=f, dtype=d, shape=shape, sha256=digests[n])
            for t in p.tensors for n, f, d, shape in t.stored()
        },
    ).with_extra(extra)


def commit_output(writer: ModelWriter, p: Plan, digests: Mapping[str, str], *, side_files: Mapping[str, bytes],
                  config_copy: bytes, config: Any, seed: int, inputs: Sequence[str] | None = None,
                  extra: Mapping[str, Any] | None = None, checks: Sequence[Callable[[], None]] = ()) -> None:
    """Finish `writer`: `side_files` (config.json retagged with the output's dtype and
    quantization), `config_copy` as the config copy, the index, then the manifest. Each of
    `checks` runs right before (a lease still ours); one that raises leaves nothing committed."""
    dtype = main_dtype(p)
    files = dict(side_files)
    if "config.json" in files:
        files["config.json"] = with_quant_config(
            retag_config_dtype(update_config(files["config.json"], p.config_updates), dtype), p.quantization_config)
    files[CONFIG_COPY_NAME] = config_copy
    manifest = output_manifest(p, digests, config=config, seed=seed, inputs=inputs, extra=extra)
    for check in checks:
        check()
    writer.finish(side_files=files, index=output_index(p), manifest=manifest)
