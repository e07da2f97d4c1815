"""Tokenizer merging (`tokenizer_source`, `tokenizer:`, `chat_template:`), MergeKit 0.1.5's meaning.

The goldens (tests/golden/tokenizer, scripts/mergekit_golden_tokenizer.py) are MergeKit's own
outputs on tiny Llamas whose tokenizers differ. MergeKit numbers a union's new tokens in its
tokenizer library's hash-map order, which changes from run to run (moemerge: id order), so
tensors are compared row by token: our row for token T against MergeKit's row for T.
Other tests build tokenizers and models on the fly and compare with a plain float64
reference written from MergeKit's rule (mergekit/tokenizer/embed.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import moemerge
from moemerge.errors import CheckpointError, ConfigError, MismatchError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tokenizer"
MANIFEST = json.loads((GOLDEN / "MANIFEST.json").read_text())
ATOL = 1e-5

_spec = importlib.util.spec_from_file_location("mergekit_golden_tokenizer", ROOT / "scripts" / "mergekit_golden_tokenizer.py")
assert _spec is not None and _spec.loader is not None
gold = importlib.util.module_from_spec(_spec)
sys.modules["mergekit_golden_tokenizer"] = gold
_spec.loader.exec_module(gold)

transformers = pytest.importorskip("transformers")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w1 x2"},
                {"role": "assistant", "content": "w3"}, {"role": "user", "content": "x0 "}]


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _tok(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _absolute(doc: dict[str, Any], root: Path) -> dict[str, Any]:
    """A golden config with its model paths (relative to `root`) made absolute (a copy)."""
    doc = json.loads(json.dumps(doc))

    def fix(v: Any) -> Any:
        return str(root / v) if isinstance(v, str) and v.startswith("inputs/") else v

    doc["base_model"] = fix(doc.get("base_model"))
    for m in doc["models"]:
        m["model"] = fix(m["model"])
    if "tokenizer_source" in doc:
        doc["tokenizer_source"] = fix(doc["tokenizer_source"])
    for rule in (doc.get("tokenizer") or {}).get("tokens", {}).values():
        src = rule.get("source")
        rule["source"] = fix(src) if isinstance(src, str) else src
        if isinstance(src, dict) and "model" in src:
            src["model"] = fix(src["model"])
    return doc


def _golden_case(case: str) -> dict[str, Any]:
    return _absolute(yaml.safe_load((GOLDEN / "configs" / f"{case}.yaml").read_text()), GOLDEN)


# -- agreement with MergeKit ----------------------------------------------------------------------

@pytest.mark.parametrize("case", MANIFEST["cases"])
def test_matches_mergekit_golden(tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    moemerge.run(_golden_case(case), str(out), chunk_rows=5)
    ref_dir = GOLDEN / "outputs" / case
    ours, theirs = _tensors(out), load_file(str(ref_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    tok_ours, tok_theirs = _tok(out), _tok(ref_dir)
    v_ours, v_theirs = tok_ours.get_vocab(), tok_theirs.get_vocab()
    assert set(v_ours) == set(v_theirs)
    n = max(v_theirs.values()) + 1
    perm = torch.tensor([v_ours[t] for t, _ in sorted(v_theirs.items(), key=lambda kv: kv[1])])
    for name, ref in theirs.items():
        got = ours[name].float()
        assert got.shape == ref.shape, name
        if ref.shape[0] == theirs["model.embed_tokens.weight"].shape[0] and name in (
                "model.embed_tokens.weight", "lm_head.weight"):
            pad = torch.arange(n, ref.shape[0])  # padding rows: one mean row, same in both
            got = torch.cat([got[perm], got[pad]])
        err = (got - ref).abs().max().item()
        assert err <= ATOL, f"{case}: {name} differs from MergeKit by {err}"
    cfg_ours = json.loads((out / "config.json").read_text())
    cfg_theirs = json.loads((ref_dir / "config.json").read_text())
    # MergeKit's config.json passes through transformers' config class, which adds its defaults
    # and moves rope_theta into rope_parameters; every other field must agree
    rewritten = {"transformers_version", "torch_dtype", "dtype", "rope_theta", "rope_parameters", "pretraining_tp"}
    assert {k: v for k, v in cfg_ours.items() if k not in rewritten} == {
        k: v for k, v in cfg_theirs.items() if k not in rewritten}
    assert cfg_ours["vocab_size"] == cfg_theirs["vocab_size"]
    assert cfg_ours["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]
    for text in MANIFEST["samples"]:  # the same tokens (ids too, where MergeKit's are reproducible)
        ids_ours, ids_theirs = tok_ours(text)["input_ids"], tok_theirs(text)["input_ids"]
        assert tok_ours.convert_ids_to_tokens(ids_ours) == tok_theirs.convert_ids_to_tokens(ids_theirs)
        if case == "model_source":
            assert ids_ours == ids_theirs
    added = {i.content: i.special for i in tok_theirs.added_tokens_decoder.values()}
    assert {i.content: i.special for i in tok_ours.added_tokens_decoder.values()} == added
    if tok_theirs.chat_template is not None:
        render = {t: t.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
                  for t in (tok_ours, tok_theirs)}
        assert render[tok_ours] == render[tok_theirs]
    else:
        assert tok_ours.chat_template is None


# -- on-the-fly models ------------------------------------------------------------------------------

def _model(root: Path, name: str, words: list[str], added: list[tuple[str, bool]], *, tied: bool = False) -> Path:
    d = root / name
    gold.write_model(d, gold.build_tokenizer(words, added), f"fly/{name}/{root.name}",
                     dict(gold.SHAPE, tie_word_embeddings=tied))
    if tied:  # what transformers saves for a tied model: no lm_head
        from safetensors.torch import save_file

        sd = load_file(str(d / "model.safetensors"))
        del sd["lm_head.weight"]
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _reference(models: list[Path], weights: list[float], out_vocab: dict[str, int], name: str) -> torch.Tensor:
    """A normalized linear merge of the models' rows matched by token (float64), MergeKit's rule
    for a row a model lacks: present in one model: its row; else the mean of those with it."""
    toks = [_tok(m).get_vocab() for m in models]
    rows = [load_file(str(m / "model.safetensors"))[name].double() for m in models]
    out = torch.zeros(len(out_vocab), rows[0].shape[1], dtype=torch.float64)
    for text, t in out_vocab.items():
        have = [rows[i][toks[i][text]] for i in range(len(models)) if text in toks[i]]
        default = sum(have) / len(have) if have else torch.zeros(rows[0].shape[1], dtype=torch.float64)
        own = [rows[i][toks[i][text]] if text in toks[i] else default for i in range(len(models))]
        out[t] = sum(w * r for w, r in zip(weights, own)) / sum(weights)
    return out


def test_tokenizer_source_with_more_tokens_resizes_and_runs(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(30)]
    a = _model(tmp_path, "a", words, [])
    b = _model(tmp_path, "b", words + ["n0", "n1"], [("<|im_start|>", True)])
    doc = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": str(b),
           "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]}
    out = tmp_path / "out"
    moemerge.run(doc, str(out))
    vocab = _tok(out).get_vocab()
    assert vocab == _tok(b).get_vocab() and len(vocab) == 34
    sd = _tensors(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 34
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert sd[name].shape == (34, gold.SHAPE["hidden_size"])
        ref = _reference([a, b], [0.3, 0.7], vocab, name)
        assert (sd[name].double() - ref).abs().max() < ATOL
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = _tok(out)("w1 n1 <|im_start|> n0", return_tensors="pt")["input_ids"]
    assert int(ids.max()) >= 31  # the new tokens are in the prompt
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 34) and torch.isfinite(logits).all()


def test_union_of_three_vocabularies_matches_reference_and_tied_embeddings(tmp_path: Path) -> None:
    a = _model(tmp_path, "a", [f"w{i}" for i in range(20)], [("<s1>", True)], tied=True)
    b = _model(tmp_path, "b", [f"w{i}" for i in range(5, 25)], [("<s1>", True), ("<t>", False)], tied=True)
    c = _model(tmp_path, "c", [f"w{i}" for i in range(10)] + ["y0", "y1"], [("<t>", False)], tied=True)
    doc = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in ((a, 1.0), (b, 2.0), (c, 0.5))]}
    out = tmp_path / "out"
    moemerge.run(doc, str(out), chunk_rows=3)
    vocab = _tok(out).get_vocab()
    assert set(vocab) == set(_tok(a).get_vocab()) | set(_tok(b).get_vocab()) | set(_tok(c).get_vocab())
    sd = _tensors(out)
    assert "lm_head.weight" not in sd  # tied: the head is the embedding, as in the inputs
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab) == sd["model.embed_tokens.weight"].shape[0]
    ref = _reference([a, b, c], [1.0, 2.0, 0.5], vocab, "model.embed_tokens.weight")
    assert (sd["model.embed_tokens.weight"].double() - ref).abs().max() < ATOL
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings
    ids = _tok(out)("y1 w22 <t> <s1>", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_chunk_size_and_read_runs_do_not_change_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _golden_case("union")
    digests = []
    for i, rows in enumerate((1, 7, None)):
        moemerge.run(doc, str(tmp_path / f"o{i}"), chunk_rows=rows)
        digests.append({f.name: f.read_bytes() for f in (tmp_path / f"o{i}").glob("*.safetensors")})
    import moemerge.io.vocab.view as view
    from moemerge.io.checkpoint import Checkpoint

    monkeypatch.setattr(view, "BAND_BYTES", 40)  # below one row (64 bytes): every run is one row
    runs: list[int] = []
    plain = Checkpoint.read_rows

    def spy(self: Checkpoint, name: str, r0: int, r1: int, out: memoryview) -> None:
        if name == "model.embed_tokens.weight" and type(self) is Checkpoint:
            runs.append(r1 - r0)
        plain(self, name, r0, r1, out)

    monkeypatch.setattr(Checkpoint, "read_rows", spy)
    moemerge.run(doc, str(tmp_path / "o3"))
    digests.append({f.name: f.read_bytes() for f in (tmp_path / "o3").glob("*.safetensors")})
    assert all(d == digests[0] for d in digests)
    assert runs and max(runs) == 1  # the stored embedding is only ever read a run at a time


def test_tokenizer_source_base_reindexes_other_vocabularies(tmp_path: Path) -> None:
    a = _model(tmp_path, "a", [f"w{i}" for i in range(20)], [("<s1>", True)])
    b = _model(tmp_path, "b", [f"w{i}" for i in range(24, 4, -1)] + ["q"], [])  # other ids, other size
    doc = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base", "base_model": str(a),
           "models": [{"model": str(a), "parameters": {"weight": 0.4}}, {"model": str(b), "parameters": {"weight": 0.6}}]}
    out = tmp_path / "out"
    moemerge.run(doc, str(out), chunk_rows=2)
    vocab = _tok(out).get_vocab()
    assert vocab == _tok(a).get_vocab()
    sd = _tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ref = _reference([a, b], [0.4, 0.6], vocab, name)  # w0..w4 and <s1>: b takes a's rows
        assert (sd[name].double() - ref).abs().max() < ATOL


def test_vocabulary_mismatch_without_tokenizer_setting_is_an_error_before_work(tmp_path: Path) -> None:
    a = _model(tmp_path, "a", [f"w{i}" for i in range(30)], [])
    b = _model(tmp_path, "b", [f"w{i}" for i in range(32)], [])
    doc = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                {"model": str(b), "parameters": {"weight": 1.0}}]}
    with pytest.raises(MismatchError, match=r"embed_tokens.weight.*tokenizer_source: union"):
        moemerge.plan(doc)
    with pytest.raises(MismatchError, match="vocabularies differ"):
        moemerge.run(doc, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("doc_change, needle", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"tokenizer": {"tokens": {"<z>": {"source": "/elsewhere"}}}}, "not one of the merged models"),
    ({"tokenizer": {"tokens": {"<z>": {}}}}, "no `source` given"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"tokenizer": {"tokens": {"<z>": {"source": {"kind": "model_token", "model": "M"}}}}}, "exactly one of"),
    ({"chat_template": "chatmlx"}, "neither a template name"),
    ({"chat_template": "exaone"}, "not built in"),
])
def test_bad_tokenizer_settings_fail_before_work(tmp_path: Path, doc_change: dict[str, Any], needle: str) -> None:
    doc = {**_golden_case("union"), **doc_change}
    doc.pop("tokenizer_source", None) if "tokenizer" in doc_change and "tokenizer_source" not in doc_change else None
    for rule in (doc.get("tokenizer") or {}).get("tokens", {}).values():
        if isinstance(rule.get("source"), dict) and rule["source"].get("model") == "M":
            rule["source"]["model"] = doc["base_model"]
    with pytest.raises((ConfigError, CheckpointError), match=needle):
        moemerge.run(doc, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_chat_template_without_tokenizer_merge_resaves_the_donor_tokenizer(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(12)]
    a, b = _model(tmp_path, "a", words, []), _model(tmp_path, "b", words, [])
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for template, expect in (("chatml", "<|im_start|>user\nw1 x2<|im_end|>\n"), (jinja, "[user] w1 x2\n")):
        doc = {"merge_method": "linear", "chat_template": template, "models": [
            {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]}
        out = tmp_path / f"out{len(template)}"
        moemerge.run(doc, str(out))
        tok = _tok(out)
        assert tok.get_vocab() == _tok(a).get_vocab()
        assert tok.apply_chat_template(CONVERSATION[1:2], tokenize=False) == expect
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 13  # not rewritten: as the base


def test_example_tokenizer_yml_runs_on_tiny_models(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "tokenizer.yml").read_text()
    llama = _model(tmp_path, "llama", [f"w{i}" for i in range(40)], [("<|begin|>", True)])
    hermes = _model(tmp_path, "hermes", [f"w{i}" for i in range(36)] + ["h0"],
                    [("<|begin|>", True), ("<|im_start|>", True), ("<|im_end|>", True)])
    text = text.replace("meta-llama/Llama-3.1-8B-Instruct", str(llama)).replace(
        "NousResearch/Hermes-3-Llama-3.1-8B", str(hermes))
    assert "Llama-3.1" not in text and "Hermes" not in text
    (tmp_path / "tokenizer.yml").write_text(text)
    out = tmp_path / "out"
    moemerge.run(str(tmp_path / "tokenizer.yml"), str(out))
    tok = _tok(out)
    assert len(tok.get_vocab()) == 45 and {"<|im_start|>", "<|im_end|>", "h0"} <= set(tok.get_vocab())
    sd = _tensors(out)
    assert sd["model.embed_tokens.weight"].shape[0] == 64 == json.loads((out / "config.json").read_text())["vocab_size"]
    hermes_rows = load_file(str(hermes / "model.safetensors"))["model.embed_tokens.weight"].double()
    t, h = tok.get_vocab()["<|im_start|>"], _tok(hermes).get_vocab()["<|im_start|>"]
    # llama lacks it and takes Hermes's row: 0.6 * hermes + 0.4 * hermes, in bfloat16
    assert torch.allclose(sd["model.embed_tokens.weight"][t].double(), hermes_rows[h], atol=1e-2)
    assert "<|im_start|>user" in tok.apply_chat_template(CONVERSATION[1:2], tokenize=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("<|im_start|> h0 w39 <|im_end|>", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_golden_inputs_are_what_the_script_builds(tmp_path: Path) -> None:
    """The golden inputs are reproducible from the script (weights and tokenizers)."""
    for name in gold.WORDS:
        sd = gold.write_model(tmp_path / name, gold.build_tokenizer(gold.WORDS[name], gold.ADDED[name]), name)
        stored = load_file(str(GOLDEN / "inputs" / name / "model.safetensors"))
        assert all(torch.equal(sd[k], stored[k]) for k in stored)
        assert _tok(tmp_path / name).get_vocab() == _tok(GOLDEN / "inputs" / name).get_vocab()
    shutil.rmtree(tmp_path)


def test_chat_template_auto_takes_the_most_common_template(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(10)]
    common, other = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "{{ messages[0]['content'] }}!"
    paths = []
    for name, template in (("a", other), ("b", common), ("c", common)):
        tok = gold.build_tokenizer(words, [])
        tok.chat_template = template
        gold.write_model(tmp_path / name, tok, f"auto/{name}")
        paths.append(tmp_path / name)
    doc = {"merge_method": "linear", "chat_template": "auto", "tokenizer_source": "base", "base_model": str(paths[0]),
           "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}
    moemerge.run(doc, str(tmp_path / "out"))
    assert _tok(tmp_path / "out").apply_chat_template(CONVERSATION[1:2], tokenize=False) == "<user>w1 x2"


def test_a_union_vocabulary_with_slices(tmp_path: Path) -> None:
    """Slices read the same re-indexed embeddings as `models:` (the view is below the planner):
    the embedding of a slices merge over a union vocabulary is the first slice's merge of the
    rows matched by token, the layers are renumbered, and the model loads and runs."""
    a = _model(tmp_path, "a", [f"w{i}" for i in range(24)], [("<s1>", True)])
    b = _model(tmp_path, "b", [f"w{i}" for i in range(4, 30)], [("<t>", False)])
    n = json.loads((a / "config.json").read_text())["num_hidden_layers"]
    doc = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "slices": [{"sources": [{"model": str(a), "layer_range": [0, n], "parameters": {"weight": 0.25}},
                                   {"model": str(b), "layer_range": [0, n], "parameters": {"weight": 0.75}}]},
                      {"sources": [{"model": str(a), "layer_range": [n - 1, n], "parameters": {"weight": 0.25}},
                                   {"model": str(b), "layer_range": [n - 1, n], "parameters": {"weight": 0.75}}]}]}
    out = tmp_path / "out"
    moemerge.run(doc, str(out), chunk_rows=2)
    vocab = _tok(out).get_vocab()
    assert set(vocab) == set(_tok(a).get_vocab()) | set(_tok(b).get_vocab())
    sd = _tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) and config["num_hidden_layers"] == n + 1
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ref = _reference([a, b], [0.25, 0.75], vocab, name)
        assert sd[name].shape == ref.shape and (sd[name].double() - ref).abs().max() < ATOL
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = _tok(out)("w1 w29 <t> <s1>", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
