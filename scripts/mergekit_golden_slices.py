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

Module cases (`modules:` of a multi-part model, read by tests/test_modules.py) merge two tiny
random Qwen2.5-VL models that this script writes to tests/golden/inputs/qwen25vl_{a,b}/ when
missing, with the tensor names MergeKit 0.1.5's definitions use (`model.layers.N.`,
`visual.blocks.N.`: transformers < 4.52's names, which transformers still loads). They are
listed under `module_cases` in the manifest.

    python scripts/mergekit_golden_slices.py [--venv /tmp/mkvenv]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_golden import GOLDEN, MERGEKIT_VERSION, _run_mergekit  # noqa: E402
from mergekit_golden import sha256_file as _sha  # noqa: E402

OUT = GOLDEN / "slices"
B, F1, F2 = "inputs/base_l4", "inputs/ft1_l4", "inputs/ft2_l4"
VA, VB = "inputs/qwen25vl_a", "inputs/qwen25vl_b"


def _write_vl(rel: str, seed: int) -> None:
    """A tiny random Qwen2.5-VL (3 text layers, 3 vision blocks, block 1 full-attention)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=16, out_hidden_size=16, num_heads=2,
                           patch_size=2, spatial_merge_size=2, in_channels=3, temporal_patch_size=2,
                           window_size=8, fullatt_block_indexes=[1]))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."):
          torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    out = GOLDEN / rel
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(sd.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))


def module_cases() -> dict[str, dict[str, Any]]:
    """`modules:` of a multi-part model (MergeKit's qwen2_5_vl definition): text layers sliced
    (a repeated layer, a gradient), the vision tower merged whole with per-model weights, the
    projector with a module-level weight under the top level's."""
    return {"qwen25vl_modules": {
        "merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [_src(VA, 0, 2, weight=[0.2, 0.9]), _src(VB, 1, 3)], "parameters": {"weight": 0.5}},
                {"sources": [_src(VB, 1, 2), _src(VA, 2, 3, weight=0.25)]},
            ]},
            "vision_tower": {"models": [{"model": VA, "parameters": {"weight": 0.3}},
                                        {"model": VB, "parameters": {"weight": 0.7}}]},
            "multi_modal_projector": {"models": [{"model": VA}, {"model": VB, "parameters": {"weight": 3.0}}],
                                      "parameters": {"weight": 0.5}},
        },
    }}


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
    for rel, seed in ((VA, 11), (VB, 12)):
        if not (GOLDEN / rel / "model.safetensors").exists():
            _write_vl(rel, seed)
    all_cases = {**cases(), **module_cases()}
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
        "mergekit": MERGEKIT_VERSION, "mergekit_torch": ver[1], "cases": list(cases()),
        "module_cases": list(module_cases()),
        "files": {p.name: _sha(p) for p in sorted(OUT.iterdir()) if p.is_file() and p.name != "MANIFEST.json"},
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"tests/golden/slices: {total / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
