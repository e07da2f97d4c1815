"""`model+adapter` (MergeKit's LoRA reference): the PEFT adapter's delta W + alpha/r * B @ A is
added as weights are read. The output equals merging a model whose weights were merged in
float64 in the test, loads in transformers, and bad adapters are refused before any output."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moemerge
from moemerge.io import lora as loramod
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import to_torch
from tests.conftest import write_checkpoint, write_yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

R, ALPHA = 4, 8
PREFIX = "base_model.model."
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
TOKENS = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 7], [2, 9, 8, 7, 6, 5, 4, 3]])


def _llama(seed: int) -> AutoModelForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _adapter_config(**extra: object) -> dict:
    return {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, **extra}


def _write_adapter(path: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(_adapter_config(**config)))
    return path


def _random_lora(state: dict[str, torch.Tensor], seed: int, r: int = R) -> dict[str, torch.Tensor]:
    """Random A (r x in) and B (out x r) for every targeted weight (PEFT initializes B to 0;
    a trained adapter's is not)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in state.items():
        if name.endswith(".weight") and any(f".{t}." in name for t in TARGETS):
            module = name.removesuffix(".weight")
            out[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g)
            out[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.1
    return out


def _merged_state(state: dict[str, torch.Tensor], ad: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W + scale * B @ A in float64, cast back: the reference."""
    merged = dict(state)
    for key, a in ad.items():
        if ".lora_A." in key:
            name = key.removeprefix(PREFIX).replace(".lora_A.weight", ".weight")
            b = ad[key.replace(".lora_A.", ".lora_B.")]
            merged[name] = (state[name].double() + scale * (b.double() @ a.double())).to(state[name].dtype)
    return merged


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A base Llama, a LoRA adapter for it, its weights merged in float64, and another Llama."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    base = _llama(seed % 1000)
    base.save_pretrained(str(tmp_path / "base"))
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    ad = _random_lora(state, seed)
    _write_adapter(tmp_path / "adapter", ad)
    merged = _llama(0)
    merged.load_state_dict(_merged_state(state, ad, ALPHA / R))
    merged.save_pretrained(str(tmp_path / "merged"))
    _llama(seed % 1000 + 1).save_pretrained(str(tmp_path / "other"))
    return {k: tmp_path / k for k in ("base", "adapter", "merged", "other")}


def _cfg(first: str, other: Path) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": first, "parameters": {"weight": 0.6}}, {"model": str(other), "parameters": {"weight": 0.4}}]}


def _out(path: Path) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


def test_lora_merge_equals_merging_the_merged_weights(models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    monkeypatch.setattr(loramod, "BAND_BYTES", 3 * 32 * 8)  # several bands per chunk
    ref = moemerge.run(_cfg(str(models["merged"]), models["other"]), str(tmp_path / "ref"))
    cfg = write_yaml(tmp_path / "c.yml", _cfg(f"{models['base']}+{models['adapter']}", models["other"]))
    code, out, err = run_cli("run", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    got, want = _out(tmp_path / "out"), _out(tmp_path / "ref")
    assert got.keys() == want.keys() and len(ref.plan.tensors) == len(got)
    changed = 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
        changed += not torch.equal(got[k], _out(models["base"])[k] * 0.6 + _out(models["other"])[k] * 0.4)
    assert changed >= 2 * len(TARGETS)  # the adapted weights did change
    # the output is a working model: same logits as the reference merge
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    refm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, refm(TOKENS).logits, rtol=0, atol=1e-5)


def _read(ck: Checkpoint, name: str, step: int) -> torch.Tensor:
    """Tensor `name` read `step` rows at a time."""
    t = ck.tensors[name]
    buf = bytearray(t.nbytes)
    for r0 in range(0, t.rows, step):
        r1 = min(t.rows, r0 + step)
        ck.read_rows(name, r0, r1, memoryview(buf)[r0 * t.row_bytes:r1 * t.row_bytes])
    return torch.frombuffer(buf, dtype=to_torch(t.dtype)).view(t.shape).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rslora_fan_in_fan_out_and_embedding_lora(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    conv = torch.randn(32, 96, generator=g).to(dtype)  # GPT-2 Conv1D: stored (in, out)
    emb = torch.randn(80, 32, generator=g).to(dtype)  # (vocab, hidden)
    plain = torch.randn(24, 32, generator=g).to(dtype)
    base = write_checkpoint(tmp_path / "base", {"h.0.attn.c_attn.weight": conv, "wte.weight": emb,
                                                "h.0.mlp.weight": plain, "h.0.ln.weight": torch.randn(32, generator=g)})
    r = 8
    ad = {f"{PREFIX}h.0.attn.c_attn.lora_A.weight": torch.randn(r, 32, generator=g),
          f"{PREFIX}h.0.attn.c_attn.lora_B.weight": torch.randn(96, r, generator=g),
          f"{PREFIX}wte.lora_embedding_A": torch.randn(r, 80, generator=g),
          f"{PREFIX}wte.lora_embedding_B": torch.randn(32, r, generator=g)}
    _write_adapter(tmp_path / "ad", ad, r=r, lora_alpha=16, use_rslora=True, fan_in_fan_out=True)
    scale = 16 / math.sqrt(r)  # rsLoRA
    ck = Checkpoint.open(f"{base}+{tmp_path / 'ad'}")
    try:
        assert set(ck.targets) == {"h.0.attn.c_attn.weight", "wte.weight"}
        for name, w, a, b in (("h.0.attn.c_attn.weight", conv, "h.0.attn.c_attn.lora_A.weight", "h.0.attn.c_attn.lora_B.weight"),
                              ("wte.weight", emb, "wte.lora_embedding_A", "wte.lora_embedding_B")):
            want = (w.double() + scale * (ad[PREFIX + b].double() @ ad[PREFIX + a].double()).T).to(dtype)
            for step in (1, 7, 1000):
                assert torch.equal(_read(ck, name, step), want), (name, step)
        assert torch.equal(_read(ck, "h.0.mlp.weight", 5), plain)  # not targeted: as stored
    finally:
        ck.close()


def test_a_changed_adapter_is_a_changed_input(models: dict[str, Path]) -> None:
    from moemerge.io.identity import changed_input, input_identity

    ref = f"{models['base']}+{models['adapter']}"
    ck = Checkpoint.open(ref)
    try:
        before = input_identity([ck])
    finally:
        ck.close()
    f = models["adapter"] / "adapter_model.safetensors"
    t = load_file(str(f))
    save_file({k: v + 1 for k, v in t.items()}, str(f))
    ck = Checkpoint.open(ref)
    try:
        said = changed_input(before, input_identity([ck]))
    finally:
        ck.close()
    assert said is not None and "adapter_model.safetensors" in said, said


def _bad(models: dict[str, Path], case: str) -> Path:
    """A broken copy of the adapter, broken as `case` says."""
    ad = load_file(str(models["adapter"] / "adapter_model.safetensors"))
    q = f"{PREFIX}model.layers.0.self_attn.q_proj"
    config: dict[str, object] = {}
    if case == "shape":
        ad[f"{q}.lora_A.weight"] = torch.randn(R, 31)
    elif case == "target":
        ad[f"{PREFIX}model.layers.0.self_attn.nope_proj.lora_A.weight"] = torch.randn(R, 32)
        ad[f"{PREFIX}model.layers.0.self_attn.nope_proj.lora_B.weight"] = torch.randn(32, R)
    elif case == "half":
        del ad[f"{q}.lora_B.weight"]
    elif case == "rank":
        config = {"r": 8}
    elif case == "dora":
        config = {"use_dora": True}
    elif case == "magnitude":
        ad[f"{q}.lora_magnitude_vector"] = torch.randn(32)
    elif case == "modules_to_save":
        config = {"modules_to_save": ["lm_head"]}
    elif case == "kind":
        config = {"peft_type": "IA3"}
    elif case == "alpha":
        config = {"lora_alpha": 0}
    return _write_adapter(models["adapter"].parent / f"bad_{case}", ad, **config)


@pytest.mark.parametrize(("case", "said"), [
    ("shape", "module `model.layers.0.self_attn.q_proj`: A is [4, 31]"),
    ("target", "the model has no tensor `model.layers.0.self_attn.nope_proj.weight`"),
    ("half", "has lora_A without lora_B"),
    ("rank", "rank 4, but adapter_config.json says r = 8"),
    ("dora", "DoRA"),
    ("magnitude", "a DoRA magnitude"),
    ("modules_to_save", "modules_to_save"),
    ("kind", "moemerge adds LoRA adapters only"),
    ("alpha", "`lora_alpha` must be a positive number"),
])
def test_bad_adapters_are_refused_before_work(models: dict[str, Path], tmp_path: Path, run_cli,
                                              case: str, said: str) -> None:
    bad = _bad(models, case)
    cfg = write_yaml(tmp_path / "c.yml", _cfg(f"{models['base']}+{bad}", models["other"]))
    code, out, err = run_cli("run", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert code != 0 and said in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_missing_adapter_files_are_refused(models: dict[str, Path], tmp_path: Path, run_cli) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "adapter_config.json").write_text(json.dumps(_adapter_config()))
    for adapter, said in ((empty, "a LoRA reference is MODEL+ADAPTER"),
                          (tmp_path / "no_weights", "adapter_model.safetensors: does not exist")):
        cfg = write_yaml(tmp_path / "c.yml", _cfg(f"{models['base']}+{adapter}", models["other"]))
        code, out, err = run_cli("run", str(cfg), str(tmp_path / "out"), "--no-progress")
        assert code != 0 and said in " ".join(err.split()), err
        assert not (tmp_path / "out").exists()


GOLDEN = Path(__file__).parent / "golden" / "lora"


@pytest.mark.parametrize("case", ["lora_linear", "lora_task_arithmetic"])
def test_mergekit_lora_golden(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MergeKit 0.1.5 (PEFT's merge_and_unload, then the merge) on the same adapters
    (scripts/mergekit_golden_lora.py): same tensors within 1e-5; rank_pattern, rsLoRA and
    embedding LoRA included."""
    import yaml

    monkeypatch.chdir(GOLDEN)  # the configs' paths are relative to it
    doc = yaml.safe_load((GOLDEN / "configs" / f"{case}.yaml").read_text())
    moemerge.run(doc, str(tmp_path / "out"), chunk_rows=5)
    got, want = _out(tmp_path / "out"), load_file(str(GOLDEN / "outputs" / case / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], rtol=0, atol=1e-5, msg=k)
    # the adapter mattered: without it the targeted weights come out otherwise
    plain = yaml.safe_load(yaml.safe_dump(doc).replace("+inputs/plain", "").replace("+inputs/rslora", ""))
    moemerge.run(plain, str(tmp_path / "plain"))
    differ = [k for k, v in _out(tmp_path / "plain").items() if not torch.allclose(v, want[k], atol=1e-4)]
    assert len(differ) >= 4, differ
