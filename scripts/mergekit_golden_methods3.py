"""MergeKit 0.1.5 golden outputs of arcee_fusion, ram and ramplus_tl (tests/test_methods_mergekit3.py).

Runs MergeKit's own `mergekit-yaml` (from its virtualenv; see scripts/mergekit_golden.py for
the set-up) on one config per case over the existing tiny float32 Llama inputs in
tests/golden/inputs/ (made by scripts/mergekit_golden.py; not rewritten here), and keeps:

- tests/golden/methods3/configs/CASE.yaml         the configs, model paths relative to tests/golden/
- tests/golden/methods3/outputs/CASE.safetensors  MergeKit's output of each case
- tests/golden/methods3/MANIFEST.json             versions, cases and checksums (inputs included)

All three methods are deterministic on these inputs: arcee_fusion samples only tensors of over
1,000,000 elements, and these have at most a few thousand. Run from the repository root with
the project's Python:

    python scripts/mergekit_golden_methods3.py [--venv /tmp/mkvenv]
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

from mergekit_golden import GOLDEN, MERGEKIT_VERSION, _models, _run_mergekit, _task, mergekit_yaml  # noqa: E402
from mergekit_golden import sha256_file as _sha  # noqa: E402

OUT = GOLDEN / "methods3"

#: Fine-tune deltas of the golden inputs are about 0.2 * 0.05 * N(0, 0.52) on weights (|d| ~ 0.007)
#: and 0.2 * 0.1 * ... on norms: an epsilon of 0.005 leaves some entries moved by no model, some
#: by one and some by both, so every branch of ram / ramplus_tl is exercised.
SPLIT_EPS = 0.005


def cases() -> dict[str, dict[str, Any]]:
    """Case name -> MergeKit config (paths relative to tests/golden/)."""
    c: dict[str, dict[str, Any]] = {}
    for ft in ("ft1", "ft2"):  # ft2 leaves one norm equal to the base: importance all 0 there
        c[f"arcee_fusion_{ft}"] = {
            "merge_method": "arcee_fusion", "base_model": "inputs/base", "dtype": "float32",
            "models": _models([("inputs/base", {}), (f"inputs/{ft}", {})]),
        }
    c["ram"] = _task("ram", [{}, {}])
    c["ram_split"] = _task("ram", [{}, {}], epsilon=SPLIT_EPS)
    c["ramplus_tl"] = _task("ramplus_tl", [{}, {}])
    c["ramplus_tl_split"] = _task("ramplus_tl", [{}, {}], epsilon=SPLIT_EPS, r=0.5, alpha=2.0)
    c["ramplus_tl_clamped"] = _task("ramplus_tl", [{}, {}], epsilon=SPLIT_EPS, r=1.0, alpha=0.05)
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mkvenv"), help="virtualenv with mergekit==0.1.5")
    args = ap.parse_args(argv)

    import yaml
    from safetensors.torch import load_file, save_file

    mergekit_yaml(args.venv)  # exits early when the venv has no MergeKit
    ver = subprocess.run([str(args.venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                         capture_output=True, text=True, check=True).stdout.split()
    if ver[0] != MERGEKIT_VERSION:
        raise SystemExit(f"{args.venv} has mergekit {ver[0]}; the golden files are for {MERGEKIT_VERSION}")
    if not (GOLDEN / "inputs" / "base" / "model.safetensors").exists():
        raise SystemExit("tests/golden/inputs/ is missing: run scripts/mergekit_golden.py first")

    all_cases = cases()
    for sub in ("configs", "outputs"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    inputs: set[str] = set()
    for case, doc in all_cases.items():
        names = sorted(load_file(str(GOLDEN / doc["base_model"] / "model.safetensors")))
        inputs |= {doc["base_model"], *(m["model"] for m in doc["models"])}
        cfg_path = OUT / "configs" / f"{case}.yaml"
        cfg_path.write_text(f"# MergeKit {MERGEKIT_VERSION} golden case `{case}`; paths are relative to "
                            "tests/golden/ (scripts/mergekit_golden_methods3.py)\n" + yaml.safe_dump(doc, sort_keys=False))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            _run_mergekit(args.venv, cfg_path, out, record=None)
            merged: dict[str, Any] = {}
            for f in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(f)))
        if sorted(merged) != names:
            raise SystemExit(f"{case}: MergeKit wrote tensors {sorted(set(merged) ^ set(names))} "
                             "that differ from the inputs' names")
        save_file({k: merged[k].float().contiguous() for k in names}, str(OUT / "outputs" / f"{case}.safetensors"),
                  metadata={"mergekit": MERGEKIT_VERSION})
        print(f"{case}: {len(merged)} tensors")

    files = {str(p.relative_to(OUT)): _sha(p) for p in sorted(OUT.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"}
    files.update({f"../{m}/model.safetensors": _sha(GOLDEN / m / "model.safetensors") for m in sorted(inputs)})
    manifest = {"mergekit": MERGEKIT_VERSION, "mergekit_torch": ver[1], "cases": list(all_cases), "files": files}
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"tests/golden/methods3: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
