"""Regenerate MergeKit 0.1.5's `model+lora` goldens under tests/golden/lora/ (read by
tests/test_lora.py).

Builds two tiny float32 Llama checkpoints (scripts/mergekit_golden.py's model, one layer
pair smaller) and two PEFT-format LoRA adapters for the first, written in PEFT's file layout
with random A and B (a trained adapter's B is not zero): `plain` (r 4, alpha 8, q/v/down_proj
plus embedding LoRA on embed_tokens, v_proj at rank 2 through `rank_pattern`) and `rslora`
(`use_rslora`, alpha 6). MergeKit merges each adapter with PEFT (`merge_and_unload`, its
`--lora-merge-cache`) and then the models; its outputs are the goldens:

- tests/golden/lora/inputs/{base,other}/        config.json, model.safetensors
- tests/golden/lora/inputs/{plain,rslora}/      adapter_config.json, adapter_model.safetensors
- tests/golden/lora/configs/CASE.yaml           paths relative to tests/golden/lora/
- tests/golden/lora/outputs/CASE/model.safetensors   MergeKit's output (float32)
- tests/golden/lora/MANIFEST.json               versions, cases, checksums

Run from the repository root with the project's Python:

    python scripts/mergekit_golden_lora.py [--venv /tmp/mkvenv]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mergekit_golden as mg  # noqa: E402  (scripts/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "lora"
SEED = 2468
SHAPE = dict(mg.LLAMA, vocab_size=32, hidden_size=16, intermediate_size=24, num_attention_heads=2,
             num_key_value_heads=1)
#: adapter -> (adapter_config.json fields, per-module ranks)
ADAPTERS: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {"v_proj": 2},
              "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
    "rslora": {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {},
               "target_modules": ["q_proj", "o_proj", "up_proj"]},
}


def _gen(what: str) -> Any:
    import torch

    digest = hashlib.sha256(f"{SEED}/{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def write_model(d: Path, role: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, shape in mg.tensor_shapes(SHAPE).items():
        norm = len(shape) == 1
        sd[name] = (torch.randn(shape, generator=_gen(f"{role}/{name}")) * (0.1 if norm else 0.05)
                    + (1.0 if norm else 0.0)).float().contiguous()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(mg.llama_config_json(SHAPE), indent=1) + "\n")
    return sd


def write_adapter(d: Path, name: str, base: dict[str, Any]) -> None:
    """PEFT's layout: `base_model.model.<module>.lora_A.weight` (r x in), `lora_B.weight` (out x r);
    embedding LoRA as bare `lora_embedding_A` (r x vocab) and `lora_embedding_B` (hidden x r)."""
    import torch
    from safetensors.torch import save_file

    spec = ADAPTERS[name]
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for weight, w in base.items():
        module = weight.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in spec["target_modules"] or w.ndim != 2:
            continue
        r = spec["rank_pattern"].get(leaf, spec["r"])
        g = _gen(f"{name}/{module}")
        if leaf == "embed_tokens":
            out[f"base_model.model.{module}.lora_embedding_A"] = torch.randn(r, w.shape[0], generator=g) * 0.3
            out[f"base_model.model.{module}.lora_embedding_B"] = torch.randn(w.shape[1], r, generator=g) * 0.3
        else:
            out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g) * 0.3
            out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.3
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "bias": "none",
              "fan_in_fan_out": False, "lora_dropout": 0.0, "modules_to_save": None, "use_dora": False,
              "alpha_pattern": {}, "inference_mode": True, **spec}
    (d / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")


def cases() -> dict[str, dict[str, Any]]:
    return {
        "lora_linear": {"merge_method": "linear", "dtype": "float32",
                        "models": [{"model": "inputs/base+inputs/plain", "parameters": {"weight": 0.6}},
                                   {"model": "inputs/other", "parameters": {"weight": 0.4}}]},
        "lora_task_arithmetic": {"merge_method": "task_arithmetic", "dtype": "float32",
                                 "base_model": "inputs/other",
                                 "models": [{"model": "inputs/base+inputs/rslora", "parameters": {"weight": 0.7}}]},
    }



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mkvenv"), help="virtualenv with mergekit==0.1.5 and peft")
    args = ap.parse_args(argv)
    import yaml
    from safetensors.torch import load_file, save_file

    mk = mg.mergekit_yaml(args.venv)
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    base = write_model(GOLDEN / "inputs" / "base", "base")
    write_model(GOLDEN / "inputs" / "other", "other")
    for name in ADAPTERS:
        write_adapter(GOLDEN / "inputs" / name, name, base)
    for sub in ("configs", "outputs"):
        (GOLDEN / sub).mkdir(parents=True, exist_ok=True)
    for case, doc in cases().items():
        cfg_path = GOLDEN / "configs" / f"{case}.yaml"
        cfg_path.write_text(f"# MergeKit {mg.MERGEKIT_VERSION} golden case `{case}`; paths are relative to "
                            "tests/golden/lora/ (scripts/mergekit_golden_lora.py)\n"
                            + yaml.safe_dump(doc, sort_keys=False))
        dest = GOLDEN / "outputs" / case
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            cmd = [str(mk), str(cfg_path), str(out), "--no-write-model-card", "--lora-merge-cache", str(Path(tmp) / "lc")]
            proc = subprocess.run(cmd, cwd=GOLDEN, capture_output=True, text=True, env={
                "PYTHONHASHSEED": "0", "HOME": tmp, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            if "were not used" in proc.stderr or "missing" in proc.stderr.lower():
                raise SystemExit(f"PEFT did not load every adapter tensor:\n{proc.stderr}")
            dest.mkdir(parents=True)
            merged: dict[str, Any] = {}
            for f in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(f)))
            save_file({k: v.float().contiguous() for k, v in merged.items()}, str(dest / "model.safetensors"),
                      metadata={"mergekit": mg.MERGEKIT_VERSION})
        print(f"{case}: {len(merged)} tensors")
    manifest = {
        "mergekit": mg.MERGEKIT_VERSION, "seed": SEED, "cases": list(cases()),
        "files": {str(p.relative_to(GOLDEN)): mg.sha256_file(p) for p in sorted(GOLDEN.rglob("*"))
                  if p.is_file() and p.name != "MANIFEST.json"},
    }
    (GOLDEN / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"tests/golden/lora: {total / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
