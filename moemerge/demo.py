"""The demo behind README command 1: three small MoE checkpoints, merged and averaged."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from moemerge.api import pma_config, run
from moemerge.sizes import format_size
from moemerge.synthetic import make_family

__all__ = ["run_demo"]


def run_demo(directory: str = "moemerge-demo", *, console: Console | None = None) -> dict[str, Path]:
    """Make three Mixtral-style fine-tunes of one base, merge them with `linear` and `ema`.

    Returns the paths written: the three inputs, the linear merge and the EMA average.
    """
    con = console or Console()
    root = Path(directory)
    if root.exists():
        shutil.rmtree(root)  # the demo owns this directory: start fresh every time
    con.print(f"making three small Mixtral-style checkpoints under {root}/ ...")
    models = make_family(root / "ckpt", 3, base_seed=7, family="mixtral", layers=4, hidden=256,
                         intermediate=512, experts=8, vocab=1024, shard_size=2_000_000)
    linear = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.5, 0.3, 0.2))],
        "dtype": "bfloat16",
    }
    # a small budget on purpose: the demo streams every tensor in several chunks
    res = run(linear, str(root / "merged-linear"), memory_budget="4MB", shard_size="10MB", overwrite=True)
    con.print(
        f"linear merge -> {res.out}: {len(res.plan.tensors)} tensors, {len(res.plan.shards)} shards, "
        f"{format_size(res.plan.bytes_written)}, buffers {format_size(res.plan.peak_bytes)} "
        f"(budget 4 MB), {res.seconds:.2f}s"
    )
    doc, weights = pma_config([str(m) for m in models], method="ema", alpha=0.2)
    res2 = run(doc, str(root / "pma-ema"), memory_budget="4MB", shard_size="10MB", overwrite=True,
               manifest_extra={"pma": {"method": "ema", "alpha": 0.2, "weights": weights}})
    con.print(
        f"EMA (alpha 0.2, weights {', '.join(f'{w:.2f}' for w in weights)}) -> {res2.out}: "
        f"{format_size(res2.plan.bytes_written)}, {res2.seconds:.2f}s"
    )
    con.print("inspect them with: moemerge inspect " + str(root / "merged-linear"))
    return {"inputs": root / "ckpt", "linear": root / "merged-linear", "ema": root / "pma-ema"}
