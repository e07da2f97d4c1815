"""Tokenizer merging wired into a run (the hooks `api` calls): inputs re-indexed to the output
vocabulary (moemerge.io.vocab) when the config builds one, config.json's `vocab_size`, and the
tokenizer files written (the built tokenizer, or the donor's with `chat_template:`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from moemerge.errors import CheckpointError, MismatchError

if TYPE_CHECKING:
    from moemerge.config import MergeConfig
    from moemerge.io.checkpoint import Checkpoint
    from moemerge.io.vocab.build import Vocabulary
    from moemerge.planner.plan import Plan

__all__ = ["with_vocabulary", "vocabulary_of", "plan_with_vocabulary", "output_tokenizer_files"]


def with_vocabulary(cfg: MergeConfig, opened: list[Checkpoint]) -> list[Checkpoint]:
    """The opened inputs (in `cfg.model_locations()` order), re-indexed to the output vocabulary
    when the config builds one (`tokenizer_source` / `tokenizer:`). Without one, inputs whose
    vocabularies differ in size are refused here, before any work: merged row by row they
    would give a model whose tokenizer and embeddings disagree.

    On error nothing is closed: the caller owns `opened`."""
    settings = cfg.tokenizer
    if settings is None:
        _check_same_vocab_size(opened)
        return opened
    from moemerge.io.vocab.build import build_vocabulary
    from moemerge.io.vocab.chat import resolve_chat_template
    from moemerge.io.vocab.view import VocabView

    by_url = {c.url: c for c in opened}
    template = resolve_chat_template(cfg.chat_template, cfg.model_locations(), cfg.storage_options)
    vocab = build_vocabulary(settings, by_url, models=[m.model for m in cfg.models], base=cfg.base_model,
                             storage_options=cfg.storage_options, chat_template=template)
    peers = [by_url[s] for s in vocab.sources]
    _check_recipe_rows(vocab, peers)
    return [VocabView(c, vocab.sources.index(c.url), vocab, peers) if c.url in vocab.sources else c
            for c in opened]


def _check_recipe_rows(vocab: Vocabulary, peers: Sequence[Checkpoint]) -> None:
    """Every row a lacking model borrows exists: the lending input has that tensor (a tied model
    has no lm_head to lend), with the same row shape. Checked here, before any work."""
    lenders = {i for r in vocab.recipes.values() for i, _ in r.terms}
    for src, names in vocab.tensors.items():
        for n in names:
            want = peers[vocab.sources.index(src)].tensors[n].shape[1:]
            for i in sorted(lenders):
                t = peers[i].tensors.get(n)
                if t is None or t.shape[1:] != want:
                    what = "has no tensor" if t is None else f"has {list(t.shape)} for"
                    raise MismatchError(f"{peers[i].url}: {what} `{n}`, whose rows fill tokens other models lack "
                                        f"({src} has it as {[vocab.size, *want]}); merge models of one architecture")


def _check_same_vocab_size(opened: Sequence[Checkpoint]) -> None:
    from moemerge.io.vocab.build import vocab_tensors

    rows: dict[str, tuple[str, int]] = {}
    for c in opened:
        try:
            named, _ = vocab_tensors(c)
        except CheckpointError:
            continue  # the planner reports shape problems in full
        for n, r in sorted(named.items(), key=lambda kv: ("embed" not in kv[0], kv[0])):  # the embedding first
            first = rows.setdefault(n, (c.url, r))
            if first[1] != r:
                raise MismatchError(
                    f"tensor `{n}` has {r} rows (tokens) in {c.url} and {first[1]} in {first[0]}: the "
                    "vocabularies differ, so merging row by row would pair unrelated tokens; set "
                    "`tokenizer_source: union` (every model's tokens), `base`, or a model location, so rows "
                    "are matched by token (MergeKit's meaning); inputs must share one architecture otherwise")


def vocabulary_of(ckpts: Sequence[Checkpoint]) -> Vocabulary | None:
    """The vocabulary the inputs were re-indexed to (None: none was built)."""
    for c in ckpts:
        vocab = getattr(c, "vocab", None)
        if vocab is not None:
            return vocab  # type: ignore[no-any-return]
    return None


def plan_with_vocabulary(p: Plan, ckpts: Sequence[Checkpoint], side_config: dict[str, Any] | None) -> Plan:
    """`p` with what a built vocabulary changes: config.json's `vocab_size` (MergeKit writes the
    padded size; inside `text_config` for models that keep it there) and a note for `plan`."""
    vocab = vocabulary_of(ckpts)
    if vocab is None:
        return p
    cfg = side_config or {}
    text = cfg.get("text_config")
    if "vocab_size" not in cfg and isinstance(text, dict) and "vocab_size" in text:
        update: tuple[str, Any] = ("text_config", {**json.loads(json.dumps(text)), "vocab_size": vocab.size})
    else:
        update = ("vocab_size", vocab.size)
    lacking = sum(1 for row in vocab.own for r in row if r < 0)
    said = (f"output vocabulary: {vocab.n_tokens} tokens"
            + (f" + {vocab.size - vocab.n_tokens} padding rows (the mean row)" if vocab.size > vocab.n_tokens else "")
            + f"; embedding rows matched by token, {lacking} row(s) filled for inputs lacking a token")
    return replace(p, config_updates=p.config_updates + (update,), notes=p.notes + vocab.notes + (said,))


def output_tokenizer_files(cfg: MergeConfig, ckpts: Sequence[Checkpoint], *, copy_tokenizer: bool,
                           donor: str) -> dict[str, bytes] | None:
    """The tokenizer files to write when they are not a plain copy (None: copy as before): the
    built tokenizer when there is one; else, with `chat_template:`, the `donor`'s tokenizer
    re-saved with it (as MergeKit, which then does not copy files)."""
    vocab = vocabulary_of(ckpts)
    if vocab is not None:
        return dict(vocab.files)
    if cfg.chat_template is None or not copy_tokenizer:
        return None
    import tempfile

    from moemerge.io.vocab.build import load_tokenizer, tokenizer_files
    from moemerge.io.vocab.chat import resolve_chat_template

    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(donor, cfg.storage_options, tmp)
        if tok is None:
            raise CheckpointError(f"{donor}: has no tokenizer files to write `chat_template:` into; "
                                  "remove chat_template or set tokenizer_source")
        return tokenizer_files(tok, resolve_chat_template(cfg.chat_template, cfg.model_locations(),
                                                          cfg.storage_options))
