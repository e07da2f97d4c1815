"""Regenerate MergeKit 0.1.5's tokenizer-merge goldens under tests/golden/tokenizer/ (read by
tests/test_tokenizer_merge.py).

Builds three tiny float32 Llama checkpoints whose tokenizers differ (WordLevel tokenizers over
generated words, built with `tokenizers` and saved by transformers, plus added tokens; the
embedding rows match each tokenizer), writes one MergeKit YAML per case, runs
`/tmp/mkvenv/bin/mergekit-yaml` on each and keeps:

- tests/golden/tokenizer/inputs/{base,ft1,ft2}/  config.json, model.safetensors, tokenizer files
- tests/golden/tokenizer/configs/CASE.yaml       paths relative to tests/golden/tokenizer/
- tests/golden/tokenizer/outputs/CASE/           MergeKit's model.safetensors (float32),
                                                 config.json and tokenizer files
- tests/golden/tokenizer/MANIFEST.json           versions, cases, checksums

The vocabularies are laid out so that MergeKit's output does not depend on its model order
(it iterates a `set` of models when it builds a union): ft1 and ft2 add the same new tokens in
the same order. Model helpers come from scripts/mergekit_golden.py. Run from the repository
root with the project's Python:

    python scripts/mergekit_golden_tokenizer.py [--venv /tmp/mkvenv]
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
GOLDEN = ROOT / "tests" / "golden" / "tokenizer"
SEED = 4321
#: The tiny model: scripts/mergekit_golden.py's, vocabulary set per input.
SHAPE = dict(mg.LLAMA, hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)

#: Plain words per input: base has w0..w39; ft1 and ft2 drop some base words and add x0..x7 (same order).
WORDS = {
    "base": [f"w{i}" for i in range(40)],
    "ft1": [f"w{i}" for i in range(40) if i % 7 != 3] + [f"x{i}" for i in range(8)],
    "ft2": [f"w{i}" for i in range(32)] + [f"x{i}" for i in range(8)],
}
#: Added tokens per input: (text, special).
ADDED = {
    "base": [("<|im_start|>", True), ("<|im_end|>", True)],
    "ft1": [("<|im_start|>", True), ("<tool>", False), ("<extra>", False)],
    "ft2": [("<|im_start|>", True), ("<tool>", False), ("<extra>", False)],
}
#: Sentences each test encodes with both tokenizers.
SAMPLES = ("w1 w3 x2 <tool> <|im_start|> w39", "x7 <extra> w10 <|im_end|> w3 zz", "<new_tok> w5 x0")


def build_tokenizer(words: list[str], added: list[tuple[str, bool]]) -> Any:
    """A WordLevel tokenizer over `words` (+ `<unk>` first), whitespace-split, with `added`
    tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<unk>", eos_token="<unk>")
    for text, special in added:
        fast.add_tokens([AddedToken(text, special=special, normalized=not special)], special_tokens=special)
    return fast


def write_model(d: Path, tokenizer: Any, seed: str, shape: dict[str, Any] = SHAPE) -> dict[str, Any]:
    """A tiny Llama at `d` with one embedding row per token of `tokenizer` (float32, random,
    drawn per tensor name from `seed`), its config.json and tokenizer files."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(shape, vocab_size=len(tokenizer.get_vocab()))
    sd = {}
    for name, shp in mg.tensor_shapes(cfg).items():
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{SEED}/{seed}/{name}".encode()).digest()[:8],
                                                         "little"))
        sd[name] = (torch.randn(shp, generator=g) * (0.1 if len(shp) == 1 else 0.05) + (1.0 if len(shp) == 1 else 0.0))
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(mg.llama_config_json(cfg), indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(d))
    return sd


def cases() -> dict[str, dict[str, Any]]:
    """Case name -> MergeKit config (paths relative to tests/golden/tokenizer/)."""
    models = [{"model": "inputs/base", "parameters": {"weight": 0.2}},
              {"model": "inputs/ft1", "parameters": {"weight": 0.5}},
              {"model": "inputs/ft2", "parameters": {"weight": 0.3}}]
    return {
        # every model's tokens; x* are in ft1 and ft2 only (a mean), w39 in base only (a copy)
        "union": {"merge_method": "linear", "base_model": "inputs/base", "dtype": "float32",
                  "models": models, "tokenizer_source": "union", "chat_template": "chatml"},
        # the tokenizer: block: a new token from another token's row, a forced zero row, a
        # token's source named, padding to a multiple (padding rows: the mean row)
        "tokens": {"merge_method": "task_arithmetic", "base_model": "inputs/base", "dtype": "float32",
                   "models": [{"model": "inputs/ft1", "parameters": {"weight": 0.6}},
                              {"model": "inputs/ft2", "parameters": {"weight": 0.5}}],
                   "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                       "<new_tok>": {"source": {"kind": "model_token", "model": "inputs/base", "token": "w3"}},
                       "w5": {"source": {"kind": "zero"}, "force": True},
                       "<extra>": {"source": "inputs/ft2"},
                   }}},
        # the output vocabulary is ft1's (more tokens than the base): embeddings resized
        "model_source": {"merge_method": "linear", "base_model": "inputs/base", "dtype": "float32",
                         "models": models[:2], "tokenizer_source": "inputs/ft1", "chat_template": "llama3"},
    }



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mkvenv"), help="virtualenv with mergekit==0.1.5")
    args = ap.parse_args(argv)
    import yaml
    from safetensors.torch import load_file, save_file

    mk = mg.mergekit_yaml(args.venv)
    for name in WORDS:
        write_model(GOLDEN / "inputs" / name, build_tokenizer(WORDS[name], ADDED[name]), name)
    for sub in ("configs", "outputs"):
        (GOLDEN / sub).mkdir(parents=True, exist_ok=True)
    for case, doc in cases().items():
        cfg_path = GOLDEN / "configs" / f"{case}.yaml"
        cfg_path.write_text(f"# MergeKit {mg.MERGEKIT_VERSION} golden case `{case}`; paths are relative to "
                            "tests/golden/tokenizer/ (scripts/mergekit_golden_tokenizer.py)\n"
                            + yaml.safe_dump(doc, sort_keys=False))
        dest = GOLDEN / "outputs" / case
        if dest.exists():
            shutil.rmtree(dest)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            cmd = [str(mk), str(cfg_path), str(out), "--no-write-model-card"]
            proc = subprocess.run(cmd, cwd=GOLDEN, capture_output=True, text=True, env={"PYTHONHASHSEED": "0", "HOME": tmp,
                                  "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            dest.mkdir(parents=True)
            merged: dict[str, Any] = {}
            for f in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(f)))
            save_file({k: v.float().contiguous() for k, v in merged.items()}, str(dest / "model.safetensors"),
                      metadata={"mergekit": mg.MERGEKIT_VERSION})
            for f in sorted(out.iterdir()):
                if f.suffix != ".safetensors" and not f.name.endswith(".index.json") and f.is_file():
                    shutil.copy(f, dest / f.name)
        print(f"{case}: {len(merged)} tensors, files {sorted(p.name for p in dest.iterdir())}")
    manifest = {
        "mergekit": mg.MERGEKIT_VERSION, "seed": SEED, "cases": list(cases()), "samples": list(SAMPLES),
        "files": {str(p.relative_to(GOLDEN)): mg.sha256_file(p) for p in sorted(GOLDEN.rglob("*"))
                  if p.is_file() and p.name != "MANIFEST.json"},
    }
    (GOLDEN / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"tests/golden/tokenizer: {total / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
