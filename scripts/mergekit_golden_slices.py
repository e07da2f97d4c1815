"""Regenerate MergeKit 0.1.5's outputs of `slices:` configs under tests/golden/slices/ (read by
tests/test_slices.py).

The inputs are the 4-layer tiny Llamas of tests/golden/inputs/{base,ft1,ft2}_l4/ that
scripts/mergekit_golden.py writes (run it first if they are missing; this script only reads
them). Each case is one MergeKit YAML; MergeKit's own `mergekit-yaml` runs it (CPU, its
defaults, as in scripts/mergekit_golden.py), and we keep:

- tests/golden/slices/CASE.yaml              the config, model paths relative to tests/golden/
- tests/golden/slices/CASE.safetensors       MergeKit's merged tensors (float32)
- tests/golden/slices/CASE.config.json       MergeKit's config.json of the output
- tests/golden/slices/MANIFEST.json          versions, cases and file checksums

    python scripts/mergekit_golden_slices.py [--venv /tmp/mkvenv]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_golden import GOLDEN, MERGEKIT_VERSION, _run_mergekit  # noqa: E402

OUT = GOLDEN / "slices"
B, F1, F2 = "inputs/base_l4", "inputs/ft1_l4", "inputs/ft2_l4"


def _src(model: str, a: int, b: int, **params: Any) -> dict[str, Any]:
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


def cases() -> dict[str, dict[str, Any]]:
    """Case name -> MergeKit config (paths relative to tests/golden/)."""
    c: dict[str, dict[str, Any]] = {}
    # a frankenmerge: a repeated range, the repeated block's o_proj and down_proj scaled to 0
    c["frankenmerge"] = {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [
            {"sources": [_src(F1, 0, 3)]},
            {"sources": [_src(F2, 1, 4)],
             "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0},
                                      {"value": 1.0}]}},
            {"sources": [_src(F1, 2, 3)]},
        ],
    }
    # slerp over two slice lists: per-slice t with filters and gradients, the top-level t below
    c["slerp_slices"] = {
        "merge_method": "slerp", "base_model": B, "dtype": "float32",
        "parameters": {"t": 0.5},
        "slices": [
            {"sources": [_src(B, 0, 2), _src(F1, 0, 2)],
             "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": [0.9, 0.1]}]}},
            {"sources": [_src(B, 2, 4), _src(F1, 1, 3)], "parameters": {"t": [0.2, 0.6]}},
        ],
    }
    # modules: {default: ...}; a gradient across a slice; precedence source > slice > module >
    # top level; the last slice has more sources than the first (MergeKit merges the tensors
    # after the layers from its first two only)
    c["linear_modules"] = {
        "merge_method": "linear", "dtype": "float32",
        "parameters": {"weight": 2.0, "normalize": True},
        "modules": {"default": {
            "parameters": {"weight": 0.5},
            "slices": [
                {"sources": [_src(F1, 0, 3, weight=[0.0, 1.0]), _src(F2, 1, 4)]},
                {"sources": [_src(F2, 2, 4), _src(B, 2, 4, weight=0.25), _src(F1, 0, 2)],
                 "parameters": {"weight": [{"filter": "mlp", "value": 1.5}]}},
            ],
        }},
    }
    return c


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mkvenv"), help="virtualenv with mergekit==0.1.5")
    args = ap.parse_args(argv)
    import yaml
    from safetensors.torch import load_file, save_file

    for m in (B, F1, F2):
        if not (GOLDEN / m / "model.safetensors").exists():
            raise SystemExit(f"tests/golden/{m} is missing: run scripts/mergekit_golden.py first")
    ver = subprocess.run([str(args.venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                         capture_output=True, text=True, check=True).stdout.split()
    if ver[0] != MERGEKIT_VERSION:
        raise SystemExit(f"{args.venv} has mergekit {ver[0]}; the golden files are for {MERGEKIT_VERSION}")
    OUT.mkdir(parents=True, exist_ok=True)
    all_cases = cases()
    for case, doc in all_cases.items():
        cfg_path = OUT / f"{case}.yaml"
        cfg_path.write_text(f"# MergeKit {MERGEKIT_VERSION} golden slices case `{case}`; paths are relative to "
                            "tests/golden/ (scripts/mergekit_golden_slices.py)\n" + yaml.safe_dump(doc, sort_keys=False))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            _run_mergekit(args.venv, cfg_path, out, record=None)
            merged: dict[str, Any] = {}
            for f in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(f)))
            save_file({k: v.float().contiguous() for k, v in sorted(merged.items())},
                      str(OUT / f"{case}.safetensors"), metadata={"mergekit": MERGEKIT_VERSION})
            (OUT / f"{case}.config.json").write_text((out / "config.json").read_text())
        print(f"{case}: {len(merged)} tensors")
    manifest = {
        "mergekit": MERGEKIT_VERSION, "mergekit_torch": ver[1], "cases": list(all_cases),
        "files": {p.name: _sha(p) for p in sorted(OUT.iterdir()) if p.is_file() and p.name != "MANIFEST.json"},
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"tests/golden/slices: {total / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
