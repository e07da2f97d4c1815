"""Fingerprint the outputs of a fixed set of merges, to prove a refactor changed no output byte.

Makes small seeded Mixtral-style fine-tunes (and their base), runs every method family, `pma`
(sma / ema), two nights of `pma update`, a Zarr output and a Dask run over them, and prints one
sha256 per case: the hash of the output's per-tensor sha256 list (names, dtypes, shapes and
bytes). Run it before and after a change and diff the two outputs.

Example: python scripts/output_digests.py /tmp/digests > before.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemerge.api import pma_config, run  # noqa: E402
from moemerge.synthetic import make_family  # noqa: E402

__all__ = ["main"]

#: method -> extra parameters; every family of methods.md, each with its statistics passes.
METHODS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.4},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.1},
    "sce": {"select_topk": 0.5},
    "model_stock": {},
    "slerp": {"t": 0.3},
    "nuslerp": {"weight": 1.0},
    "nearswap": {"t": 0.001},
}
#: Methods that take exactly two models (base + one), or a base and the rest.
TWO = {"slerp", "nearswap"}
#: Parameters set once under the config's top-level `parameters`.
GLOBAL = {"select_topk", "t"}
BASED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "sce",
         "model_stock", "slerp", "nearswap"}


def _digest(out: Path) -> str:
    """sha256 of the manifest's tensors (name, dtype, shape, sha256), in name order."""
    man = json.loads((out / "moemerge-manifest.json").read_text())
    rows = sorted((n, t["dtype"], t["shape"], t["sha256"]) for n, t in man["tensors"].items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _config(method: str, models: list[Path], base: Path) -> dict[str, Any]:
    params = METHODS[method]
    chosen = models[:1] if method in TWO else models
    doc: dict[str, Any] = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16"}
    if method in BASED:
        doc["base_model"] = str(base)
    if method in ("slerp", "nearswap"):
        doc["models"] = [{"model": str(base)}, {"model": str(chosen[0])}]
        doc["parameters"] = params
    else:
        if method == "nuslerp":
            chosen = models[:2]
        own = {k: v for k, v in params.items() if k not in GLOBAL}
        from moemerge.methods import REGISTRY

        if "weight" in {q.name for q in REGISTRY[method].params}:
            own = {"weight": 1.0 / len(chosen), **own}
        doc["models"] = [{"model": str(m), "parameters": own} for m in chosen]
        doc["parameters"] = {k: v for k, v in params.items() if k in GLOBAL}
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path, help="scratch directory (replaced)")
    p.add_argument("--no-dask", action="store_true", help="skip the Dask case")
    args = p.parse_args(argv)
    root: Path = args.workdir
    if root.exists():
        shutil.rmtree(root)
    models = make_family(root / "in", 3, base_seed=11, with_base=True, family="mixtral", layers=2,
                         hidden=64, intermediate=96, experts=4, vocab=128, shard_size=200_000)
    base = root / "in" / "base"
    small = {"memory_budget": "1MB", "shard_size": "300KB", "overwrite": True}
    digests: dict[str, str] = {}
    for method in METHODS:
        out = root / f"out-{method}"
        run(_config(method, models, base), str(out), **small)
        digests[method] = _digest(out)
    chunked = root / "out-ties-chunked"
    run(_config("ties", models, base), str(chunked), chunk_rows=3, **small)
    digests["ties (3-row chunks)"] = _digest(chunked)
    for method in ("sma", "ema"):
        doc, _ = pma_config([str(m) for m in models], method=method)
        out = root / f"out-pma-{method}"
        run(doc, str(out), **small)
        digests[f"pma {method}"] = _digest(out)
    zarr_out = root / "out-linear.zarr"
    run(_config("linear", models, base), str(zarr_out), out_format="zarr", **small)
    man = json.loads((zarr_out / "moemerge-manifest.json").read_text())
    rows = sorted((n, t["dtype"], t["shape"], t["sha256"]) for n, t in man["tensors"].items())
    digests["linear (zarr)"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    if not args.no_dask:
        out = root / "out-ties-dask"
        run(_config("ties", models, base), str(out), workers=1, **small)
        digests["ties (dask, 1 worker)"] = _digest(out)
    # two nights of `pma update`: snapshots step-1..3, then step-4 arrives
    from moemerge.pma.update import update

    snaps = root / "snaps"
    for i, m in enumerate(models + [base], start=1):
        shutil.copytree(m, snaps / f"step-{i}")
        if i == 3:
            update(str(root / "state"), str(snaps / "step-*"), str(root / "out-update"), method="sma", last=2,
                   memory_budget="1MB", shard_size="300KB", overwrite=True)
            digests["pma update night 1"] = _digest(root / "out-update")
    update(str(root / "state"), str(snaps / "step-*"), str(root / "out-update"), method="sma", last=2,
           memory_budget="1MB", shard_size="300KB", overwrite=True)
    digests["pma update night 2"] = _digest(root / "out-update")
    for case, d in digests.items():
        print(f"{d}  {case}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
