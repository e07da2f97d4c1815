"""Write seeded synthetic checkpoints: one model, or fine-tunes of a shared base.

Example: python scripts/make_checkpoints.py /data/mix --family mixtral --models 3 --with-base --size 2GB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemerge.errors import MoemergeError  # noqa: E402
from moemerge.sizes import format_size, parse_size  # noqa: E402
from moemerge.synthetic import FAMILIES, CheckpointSpec, make_checkpoint, make_family  # noqa: E402

__all__ = ["main"]

_SHAPE_FIELDS = ("layers", "hidden", "intermediate", "experts", "top_k", "vocab", "heads", "kv_heads")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="model directory, or the root of model_0.. (and base/)")
    p.add_argument("--family", choices=FAMILIES, default="mixtral")
    p.add_argument("--models", type=int, default=1, help="fine-tunes of one base (1: a lone model)")
    p.add_argument("--with-base", action="store_true", help="also write the shared base to OUT/base")
    p.add_argument("--size", help="target bytes per model, e.g. 2GB; picks hidden/intermediate")
    p.add_argument("--dtype", choices=("BF16", "F16", "F32"), default="BF16")
    p.add_argument("--shard-size", default="5GB", help="bytes per safetensors shard (default 5GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lone model, or of the shared base")
    p.add_argument("--delta-scale", type=float, default=0.1, help="fine-tune delta / weight std")
    p.add_argument("--chunk-size", default="16MiB", help="bytes produced per write (bounds memory)")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights in OUT")
    for field in _SHAPE_FIELDS:
        p.add_argument(f"--{field.replace('_', '-')}", type=int, dest=field)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fields = {f: getattr(args, f) for f in _SHAPE_FIELDS if getattr(args, f) is not None}
        fields.update(family=args.family, dtype=args.dtype,
                      shard_size=parse_size(args.shard_size, what="--shard-size"))
        if args.size:
            spec = CheckpointSpec.sized(parse_size(args.size, what="--size"), **fields)
        else:
            spec = CheckpointSpec(**fields)
        chunk_bytes = parse_size(args.chunk_size, what="--chunk-size")
        common = {"chunk_bytes": chunk_bytes, "overwrite": args.overwrite}
        experts = "" if spec.family == "dense" else f"{spec.experts} experts, "
        print(f"{spec.family}: {spec.layers} layers, hidden {spec.hidden}, intermediate "
              f"{spec.intermediate}, {experts}vocab {spec.vocab}, {spec.dtype}, "
              f"{len(spec.tensors())} tensors, {format_size(spec.total_bytes)} per model")
        if args.models == 1 and not args.with_base:
            paths = [make_checkpoint(args.out, spec, seed=args.seed, **common)]
        else:
            paths = make_family(args.out, args.models, args.seed, with_base=args.with_base, spec=spec,
                                delta_scale=args.delta_scale, **common)
            paths = [args.out / "base", *paths] if args.with_base else paths
    except MoemergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        shards = len(list(path.glob("*.safetensors")))
        print(f"wrote {path}  ({shards} shard{'s' * (shards != 1)}, {format_size(spec.total_bytes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
