"""Regenerate the MergeKit 0.1.5 golden outputs under tests/golden/ (read by test_mergekit_agreement.py).

Builds three tiny dense Llama checkpoints (base + two fine-tunes; float32, untied embeddings,
weights drawn from a seeded torch.Generator per tensor name; 2 layers, plus a 4-layer variant
for the layer-gradient cases), writes one MergeKit YAML per case, runs MergeKit's own
`mergekit-yaml` on each (CPU, no lazy unpickle: its defaults), and keeps:

- tests/golden/inputs/{base,ft1,ft2}[_l4]/  config.json + model.safetensors (the merge inputs)
- tests/golden/configs/CASE.yaml         the configs, model paths relative to tests/golden/
- tests/golden/outputs/CASE.safetensors  MergeKit's output of each deterministic case
- tests/golden/stats/CASE.json           for the random methods (dare_*, della*): per tensor
                                         MergeKit's kept fraction and L1 rescale factor of each
                                         task vector, and the mean and norm of the result
- tests/golden/MANIFEST.json             versions, seeds, cases and file checksums

MergeKit lives in its own virtualenv so the project's environment is untouched. Set-up (once;
torch first, pinned, so pip never pulls a multi-GB CUDA build):

    python -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/mk_constraints.txt
    /tmp/mkvenv/bin/pip install -c /tmp/mk_constraints.txt mergekit==0.1.5

Then, from the repository root, with the project's own Python (torch, safetensors, pyyaml;
transformers optional, used to check that the inputs load):

    python scripts/mergekit_golden.py [--venv /tmp/mkvenv]

Rerunnable: every file is rewritten from the seeds, so a rerun with the same MergeKit gives
the same bytes for inputs, configs and deterministic outputs (statistics of the random methods
use MergeKit's `--random-seed`). The statistics are recorded by running `mergekit-yaml`'s entry
point in the venv with two read-only hooks installed (`--_record`, an internal mode of this
script): one notes the tensor name and input order of each generalized-task-arithmetic group,
the other the mask and L1 norms in `mergekit.sparsify.rescaled_masked_tensor`.
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

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
MERGEKIT_VERSION = "0.1.5"
SEED = 1234
#: MergeKit's --random-seed for the random methods (one global stream in its schedule order).
MERGEKIT_RANDOM_SEED = 7

#: The tiny model: hidden 32, intermediate 32, 2 layers, vocab 64; 4 heads of 8, 2 KV heads; untied lm_head.
LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
)
#: A 4-layer variant (hidden 16, vocab 32) for the layer-gradient cases: with 2 layers a gradient
#: is only ever read at its end points; with 4 its interior points are interpolated.
LLAMA_L4 = dict(LLAMA, vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1)
#: Model families: suffix of the input directories (base, ft1, ft2 + suffix) -> shape.
FAMILIES = {"": LLAMA, "_l4": LLAMA_L4}
#: Fine-tune deltas are this fraction of the base weights' scale; 60% of a delta is shared by
#: both fine-tunes so that task vectors are correlated (model_stock, nuslerp see real angles).
DELTA = 0.2
SHARED = 0.6
#: Both fine-tunes leave this tensor equal to the base (a frozen parameter: zero task vectors).
FROZEN_BOTH = "model.layers.0.post_attention_layernorm.weight"
#: ft2 leaves this one equal to the base (one zero task vector).
FROZEN_FT2 = "model.layers.1.input_layernorm.weight"
#: Base and deltas of this tensor are on a coarse grid (deltas are non-zero multiples of 2^-9),
#: so |d| has many ties, as bf16 fine-tunes do: selection methods must break ties somehow.
QUANTIZED = "model.layers.1.mlp.up_proj.weight"
_QSTEP = 2.0**-9


def tensor_shapes(cfg: dict[str, Any] = LLAMA) -> dict[str, tuple[int, ...]]:
    """Names and shapes of LlamaForCausalLM's state dict (transformers' on-disk names)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def _gen(name: str, what: str):  # -> torch.Generator
    import torch

    digest = hashlib.sha256(f"{SEED}/{name}/{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def build_models(suffix: str = "") -> dict[str, dict[str, Any]]:
    """{"base", "ft1", "ft2"} + suffix -> state dict (float32), drawn per tensor name (order-free)."""
    import torch

    models: dict[str, dict[str, Any]] = {"base": {}, "ft1": {}, "ft2": {}}
    for name, shape in tensor_shapes(FAMILIES[suffix]).items():
        is_norm = len(shape) == 1
        scale = 0.1 if is_norm else 0.05
        base = torch.randn(shape, generator=_gen(name, "base" + suffix)) * scale + (1.0 if is_norm else 0.0)
        shared = torch.randn(shape, generator=_gen(name, "shared" + suffix))
        deltas = []
        for ft in ("ft1", "ft2"):
            own = torch.randn(shape, generator=_gen(name, ft + suffix))
            deltas.append(DELTA * scale * (SHARED * shared + (1 - SHARED) * own))
        if name == QUANTIZED:
            base = torch.round(base * 2**16) / 2**16  # exact sums: x - b == d bit for bit
            # never exactly 0 (a zero delta would hide a kept entry from the test's probes)
            deltas = [torch.sign(d) * torch.clamp(torch.round(d.abs() / _QSTEP), min=1) * _QSTEP for d in deltas]
        if name == FROZEN_BOTH:
            deltas = [torch.zeros(shape), torch.zeros(shape)]
        if name == FROZEN_FT2:
            deltas[1] = torch.zeros(shape)
        models["base"][name] = base.float().contiguous()
        for ft, d in zip(("ft1", "ft2"), deltas):
            models[ft][name] = (base + d).float().contiguous()
    return {role + suffix: sd for role, sd in models.items()}


def llama_config_json(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "rope_theta": 10000.0, "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "use_cache": True, **cfg,
    }


# -- the cases -----------------------------------------------------------------------------------

_TWO = [("inputs/ft1", 0.6), ("inputs/ft2", 0.4)]


def _models(entries: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"model": m, "parameters": p} if p else {"model": m} for m, p in entries]


def _task(method: str, per: list[dict[str, Any]], **glob: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "merge_method": method, "base_model": "inputs/base",
        "models": _models([(m, p) for (m, _), p in zip(_TWO, per)]),
        "dtype": "float32",
    }
    if glob:
        doc["parameters"] = glob
    return doc


def cases() -> dict[str, dict[str, Any]]:
    """Case name -> MergeKit config (paths relative to tests/golden/)."""
    c: dict[str, dict[str, Any]] = {}
    c["linear"] = {
        "merge_method": "linear", "dtype": "float32",
        "models": _models([("inputs/base", {"weight": 0.2}), ("inputs/ft1", {"weight": 0.5}),
                           ("inputs/ft2", {"weight": 0.3})]),
    }
    c["linear_unnormalized"] = {
        "merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
        "models": _models([("inputs/ft1", {"weight": 0.7}), ("inputs/ft2", {"weight": 0.5})]),
    }
    c["task_arithmetic"] = _task("task_arithmetic", [{"weight": 0.6}, {"weight": 0.4}], **{"lambda": 0.8})
    c["ties"] = _task("ties", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}])
    c["ties_gradient"] = _task("ties", [{"weight": 1.0, "density": [0.2, 0.9]},
                                        {"weight": [0.5, 1.0], "density": 0.7}], normalize=False)
    c["ties_gradient"] = {**c["ties_gradient"], "base_model": "inputs/base_l4",
                          "models": [{**m, "model": m["model"] + "_l4"} for m in c["ties_gradient"]["models"]]}
    c["breadcrumbs"] = _task("breadcrumbs", [{"weight": 0.6, "density": 0.7, "gamma": 0.05},
                                             {"weight": 0.4, "density": 0.5}])
    c["breadcrumbs_ties"] = _task("breadcrumbs_ties", [{"weight": 0.6, "density": 0.7, "gamma": 0.05},
                                                       {"weight": 0.4, "density": 0.5, "gamma": 0.1}])
    c["slerp"] = {
        "merge_method": "slerp", "base_model": "inputs/base", "dtype": "float32",
        "models": _models([("inputs/base", {}), ("inputs/ft1", {})]), "parameters": {"t": 0.3},
    }
    # the README example of MergeKit: t per module type, a gradient over layers (4 layers)
    c["slerp_filters"] = {
        "merge_method": "slerp", "base_model": "inputs/base_l4", "dtype": "float32",
        "models": _models([("inputs/base_l4", {}), ("inputs/ft2_l4", {})]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
    }
    c["nearswap"] = {
        "merge_method": "nearswap", "base_model": "inputs/base", "dtype": "float32",
        "models": _models([("inputs/base", {}), ("inputs/ft1", {})]), "parameters": {"t": 0.004},
    }
    c["nuslerp"] = _task("nuslerp", [{"weight": 0.6}, {"weight": 0.4}])
    c["nuslerp_rows"] = _task("nuslerp", [{"weight": 0.3}, {"weight": 0.7}], nuslerp_flatten=False)
    c["nuslerp_nobase"] = {
        "merge_method": "nuslerp", "dtype": "float32",
        "models": _models([("inputs/ft1", {"weight": 0.5}), ("inputs/ft2", {"weight": 0.5})]),
    }
    c["model_stock"] = _task("model_stock", [{}, {}])
    c["model_stock_filter_wise"] = _task("model_stock", [{}, {}], filter_wise=True)
    c["sce"] = _task("sce", [{}, {}], select_topk=0.7)
    c["sce_all"] = _task("sce", [{}, {}], select_topk=1.0)
    c["multislerp"] = _task("multislerp", [{"weight": 0.6}, {"weight": 0.4}])
    c["multislerp_nobase"] = {
        "merge_method": "multislerp", "dtype": "float32",
        "models": _models([("inputs/base", {"weight": 1.0}), ("inputs/ft1", {"weight": 0.5}),
                           ("inputs/ft2", {"weight": 0.25})]),
    }
    c["karcher"] = {
        "merge_method": "karcher", "dtype": "float32", "parameters": {"max_iter": 20, "tol": 1e-6},
        "models": _models([("inputs/base", {}), ("inputs/ft1", {}), ("inputs/ft2", {})]),
    }
    c["passthrough"] = {
        "merge_method": "passthrough", "dtype": "float32",
        "models": _models([("inputs/ft1", {"scale": 0.5})]),
    }
    # random methods: statistics only
    c["dare_linear"] = _task("dare_linear", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}])
    c["dare_ties"] = _task("dare_ties", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}])
    c["della"] = _task("della", [{"weight": 0.6, "density": 0.5, "epsilon": 0.2},
                                 {"weight": 0.4, "density": 0.4}])
    c["della_linear"] = _task("della_linear", [{"weight": 0.6, "density": 0.5},
                                               {"weight": 0.4, "density": 0.6, "epsilon": 0.3}])
    return c


RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")


# -- running MergeKit ----------------------------------------------------------------------------

def _run_mergekit(venv: Path, config: Path, out: Path, *, record: Path | None) -> None:
    flags = ["--no-copy-tokenizer", "--no-write-model-card",
             "--random-seed", str(MERGEKIT_RANDOM_SEED)]
    if record is None:
        cmd = [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), *flags]
    else:
        cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--_record", str(record),
               "--", str(config), str(out), *flags]
    proc = subprocess.run(cmd, cwd=GOLDEN, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _record_main(record: str, argv: list[str]) -> None:
    """Inside the venv: run mergekit-yaml with hooks that note masks and L1 norms."""
    import threading

    import mergekit.sparsify as sp
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.scripts.run_yaml import main

    local = threading.local()
    notes: dict[str, list[dict[str, Any]]] = {}
    orig_group = GeneralizedTaskArithmeticMerge.merge_group
    orig_rescale = sp.rescaled_masked_tensor

    def merge_group(self, group, /, **parameters):  # type: ignore[no-untyped-def]
        local.name = group.metadata.name
        local.ids = [str(e.id) for e in group.non_base]
        local.calls = []
        try:
            return orig_group(self, group, **parameters)
        finally:
            if len(local.calls) != len(local.ids):
                raise RuntimeError(f"{local.name}: {len(local.calls)} sparsify calls for {local.ids}")
            notes[local.name] = [{"input": i, **c} for i, c in zip(local.ids, local.calls)]

    def rescaled_masked_tensor(tensor, mask, norm, eps=1e-7):  # type: ignore[no-untyped-def]
        full = float(tensor.double().abs().sum())
        kept = float((tensor.double() * mask.double()).abs().sum())
        factor = full / kept if norm is not None and full >= eps and kept >= eps else 1.0
        local.calls.append({"kept_fraction": float((mask != 0).double().mean()), "l1_full": full,
                            "l1_kept": kept, "factor": factor, "numel": mask.numel()})
        return orig_rescale(tensor, mask, norm, eps)

    GeneralizedTaskArithmeticMerge.merge_group = merge_group  # type: ignore[method-assign]
    sp.rescaled_masked_tensor = rescaled_masked_tensor
    try:
        main(argv, standalone_mode=False)
    finally:
        Path(record).write_text(json.dumps(notes, indent=1, sort_keys=True))


# -- main ------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (golden manifests record one per file)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mergekit_yaml(venv: Path) -> Path:
    """The venv's `mergekit-yaml`; exits naming the set-up (this docstring) when it is missing."""
    mk = venv / "bin" / "mergekit-yaml"
    if not mk.exists():
        raise SystemExit(f"{mk} not found: set up the venv as scripts/mergekit_golden.py's docstring says")
    return mk


def _write_inputs() -> dict[str, dict[str, Any]]:
    from safetensors.torch import save_file

    models: dict[str, dict[str, Any]] = {}
    for suffix, shape in FAMILIES.items():
        family = build_models(suffix)
        models.update(family)
        for name, sd in family.items():
            d = GOLDEN / "inputs" / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps(llama_config_json(shape), indent=2, sort_keys=True) + "\n")
    try:  # the layout must be what transformers saves: every name loads, none is missing
        from transformers import AutoModelForCausalLM

        for name in models:
            m, info = AutoModelForCausalLM.from_pretrained(str(GOLDEN / "inputs" / name), output_loading_info=True)
            bad = {k: v for k, v in info.items() if v and k != "mismatched_keys"} | (
                {"mismatched_keys": info["mismatched_keys"]} if info.get("mismatched_keys") else {})
            if bad:
                raise SystemExit(f"inputs/{name}: transformers reports {bad}")
    except ImportError:
        print("transformers not installed here: skipping the load check of the inputs")
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mkvenv"), help="virtualenv with mergekit==0.1.5")
    ap.add_argument("--only", nargs="*", help="regenerate only these cases (inputs are always rewritten)")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file, save_file

    mk = mergekit_yaml(args.venv)
    ver = subprocess.run([str(args.venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                         capture_output=True, text=True, check=True).stdout.split()
    if ver[0] != MERGEKIT_VERSION:
        raise SystemExit(f"{args.venv} has mergekit {ver[0]}; the golden files are for {MERGEKIT_VERSION}")

    models = _write_inputs()
    all_cases = cases()
    todo = args.only or list(all_cases)
    for sub in ("configs", "outputs", "stats"):
        (GOLDEN / sub).mkdir(parents=True, exist_ok=True)
    import yaml

    for case in todo:
        doc = all_cases[case]
        names = list(models[Path(doc["models"][0]["model"]).name])
        cfg_path = GOLDEN / "configs" / f"{case}.yaml"
        cfg_path.write_text(f"# MergeKit {MERGEKIT_VERSION} golden case `{case}`; paths are relative to "
                            "tests/golden/ (scripts/mergekit_golden.py)\n" + yaml.safe_dump(doc, sort_keys=False))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            record = Path(tmp) / "record.json" if case in RANDOM else None
            _run_mergekit(args.venv, cfg_path, out, record=record)
            files = sorted(out.glob("*.safetensors"))
            merged: dict[str, Any] = {}
            for f in files:
                merged.update(load_file(str(f)))
            if sorted(merged) != sorted(names):
                raise SystemExit(f"{case}: MergeKit wrote tensors {sorted(set(merged) ^ set(names))} "
                                 "that differ from the inputs' names")
            merged = {k: merged[k].float().contiguous() for k in names}
            if record is None:
                save_file(merged, str(GOLDEN / "outputs" / f"{case}.safetensors"), metadata={"mergekit": MERGEKIT_VERSION})
                print(f"{case}: {len(merged)} tensors")
                continue
            notes = json.loads(record.read_text())
            order = [m["model"] for m in doc["models"]]
            stats: dict[str, Any] = {}
            base = models[Path(doc["base_model"]).name]
            for name in names:
                t = merged[name].double()
                entry: dict[str, Any] = {"mean": float(t.mean()), "norm": float(t.norm()),
                                         "delta_mean": float((t - base[name].double()).mean()),
                                         "delta_norm": float((t - base[name].double()).norm())}
                inputs = []
                for n in notes.get(name, []):
                    idx = [i for i, m in enumerate(order) if Path(m).name in n["input"]]
                    if len(idx) != 1:
                        raise SystemExit(f"{case}: cannot tell which input {n['input']!r} is")
                    inputs.append({"index": idx[0], **{k: v for k, v in n.items() if k != "input"}})
                entry["inputs"] = sorted(inputs, key=lambda x: x["index"])
                stats[name] = entry
            missing = [n for n in names if not stats[n]["inputs"]]
            if missing:
                raise SystemExit(f"{case}: no sparsify record for {missing}")
            (GOLDEN / "stats" / f"{case}.json").write_text(json.dumps(
                {"mergekit": MERGEKIT_VERSION, "random_seed": MERGEKIT_RANDOM_SEED, "tensors": stats},
                indent=1, sort_keys=True) + "\n")
            print(f"{case}: statistics of {len(stats)} tensors")

    manifest = {
        "mergekit": MERGEKIT_VERSION, "mergekit_torch": ver[1], "seed": SEED,
        "random_seed": MERGEKIT_RANDOM_SEED, "models": FAMILIES, "cases": list(all_cases), "random": list(RANDOM),
        "special_tensors": {"frozen_both": FROZEN_BOTH, "frozen_ft2": FROZEN_FT2, "quantized": QUANTIZED},
        "files": {str(p.relative_to(GOLDEN)): sha256_file(p) for p in sorted(GOLDEN.rglob("*"))
                  if p.is_file() and p.name != "MANIFEST.json"},
    }
    (GOLDEN / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"tests/golden: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_record":
        rest = sys.argv[3:]
        _record_main(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
    else:
        sys.exit(main())
