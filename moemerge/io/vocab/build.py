"""Build the output vocabulary at plan time, as MergeKit 0.1.5 does (mergekit/tokenizer/build.py
and embed.py): the output tokenizer (`base`, `union` or a model's), then, for every input, which
of its rows each output token takes, and how the rows a model lacks are made.

Tokenizers are read and written with `transformers` (files fetched from any fsspec location into
a temporary directory first); nothing of their formats is parsed here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemerge.errors import CheckpointError, ConfigError
from moemerge.io.sidefiles import read_side_files
from moemerge.io.vocab.settings import TokenizerSettings

if TYPE_CHECKING:
    from moemerge.io.checkpoint import Checkpoint

__all__ = ["VOCAB_TENSOR_SUFFIXES", "Recipe", "Vocabulary", "vocab_tensors", "load_tokenizer", "build_vocabulary",
           "tokenizer_files"]

#: Names (suffixes after a `.`, or whole names) of the tensors indexed by token along dim 0: the
#: tensors MergeKit's architecture files give a `vocabulary_axis` (always 0).
VOCAB_TENSOR_SUFFIXES = (
    "embed_tokens.weight", "lm_head.weight", "lm_head.bias", "embed_out.weight", "embed_in.weight",
    "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "shared.weight", "output.weight",
    "backbone.embeddings.weight", "vocab_projector.weight", "vocab_projector.bias",
    "cls.predictions.decoder.weight", "cls.predictions.bias", "lm_head.decoder.weight",
    "lm_head.linear.weight", "lm_head.linear.bias", "transformer.output_layer.weight",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """A row a model does not supply itself: the mean of `terms` ((source index, row) pairs, in
    MergeKit's model order); one term is a copy; none is a zero row."""

    terms: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Vocabulary:
    """The output vocabulary and how every input's vocabulary tensors map onto it."""

    sources: tuple[str, ...]
    """Locations of the inputs (the order of `own` and of recipe terms: MergeKit's model order)."""
    n_tokens: int
    """Tokens of the output tokenizer."""
    size: int
    """Rows of every vocabulary tensor in the output (`n_tokens` padded; config.json `vocab_size`)."""
    own: tuple[tuple[int, ...], ...]
    """Per source, per output token: the source's own row, or -1 (then `recipes` says)."""
    recipes: Mapping[int, Recipe]
    """Output token id -> its row for every source lacking it (or every source: `force`)."""
    tensors: Mapping[str, tuple[str, ...]]
    """Source location -> its vocabulary tensors (rows indexed by token)."""
    files: Mapping[str, bytes]
    """The output tokenizer as `transformers` saves it (file name -> bytes)."""
    notes: tuple[str, ...] = ()


def _is_vocab_name(name: str) -> bool:
    # C-speed tests: this runs for every tensor of every input (92k each for DeepSeek-V3)
    return name in _VOCAB_NAMES or name.endswith(_VOCAB_ENDINGS)


_VOCAB_NAMES = frozenset(VOCAB_TENSOR_SUFFIXES)
_VOCAB_ENDINGS = tuple("." + s for s in VOCAB_TENSOR_SUFFIXES)


def vocab_tensors(ck: Checkpoint) -> tuple[dict[str, int], int]:
    """({vocabulary tensor: rows}, the model's vocabulary size: config.json's `vocab_size`, else
    the rows of its embedding). Named tensors with fewer rows are not indexed by token (an
    `output.weight` inside a layer, say) and are left out; rows past the vocabulary size
    (padding) are never read, as in MergeKit."""
    cfg = ck.config() or {}
    declared = cfg.get("vocab_size")
    if not isinstance(declared, int):
        text = cfg.get("text_config")
        declared = text.get("vocab_size") if isinstance(text, dict) else None
    named = {n: t.shape[0] for n, t in ck.tensors.items() if _is_vocab_name(n) and t.shape}
    if not isinstance(declared, int) or isinstance(declared, bool):
        embeds = [r for n, r in named.items() if "embed" in n or "wte" in n]
        if not embeds:
            return {}, 0
        declared = max(embeds)
    short = {n: r for n, r in named.items() if r < declared and ("embed" in n or "lm_head" in n or "wte" in n)}
    if short:
        n, r = next(iter(short.items()))
        raise CheckpointError(f"{ck.url}: tensor `{n}` has {r} rows, below config.json's vocab_size {declared}; "
                              "fix vocab_size or the checkpoint")
    return {n: r for n, r in named.items() if r >= declared}, declared


def load_tokenizer(url: str, storage_options: dict[str, Any] | None, tmp: str) -> Any:
    """The tokenizer at `url` (any fsspec location) via transformers' AutoTokenizer, its files
    copied into a fresh directory under `tmp` first; None when `url` has no tokenizer files."""
    import transformers

    files = read_side_files(url, storage_options, model=False, tokenizer=True)
    if not any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return None
    d = Path(tempfile.mkdtemp(dir=tmp))
    for name, data in files.items():
        (d / name).write_bytes(data)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(d), use_fast=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds; one message names the model
        raise CheckpointError(f"{url}: its tokenizer files cannot be loaded by transformers ({type(e).__name__}: "
                              f"{e}); fix them, or leave tokenizer_source / tokenizer: out") from e


def tokenizer_files(tok: Any, chat_template: str | None = None) -> dict[str, bytes]:
    """`tok` saved by transformers (`save_pretrained`), with `chat_template` set first."""
    if chat_template is not None:
        tok.chat_template = chat_template
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def _copy_tokenizer(tok: Any, tmp: str) -> Any:
    """A fresh copy of `tok` (saved and reloaded), so adding tokens leaves `tok` as read."""
    import transformers

    d = tempfile.mkdtemp(dir=tmp)
    tok.save_pretrained(d)
    return transformers.AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False)


def _union(base: Any, toks: Sequence[tuple[Any, int]], tmp: str) -> Any:
    """MergeKit's union: the base tokenizer, plus every other token of every model (ids below
    the model's vocab_size), plain tokens first in model order, then added tokens (first
    settings seen win)."""
    out_vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, limit in toks:
        decoder = tok.added_tokens_decoder
        added_text = {info.content for info in decoder.values()}
        # in id order: MergeKit walks the tokenizer library's hash map, whose order changes from
        # run to run, so its union numbers the new tokens differently each time (methods.md)
        for text, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < limit and text not in added_text:
                out_vocab.setdefault(text, None)
        for idx, info in decoder.items():
            if idx < limit:
                added.setdefault(info.content, info)
    res = _copy_tokenizer(base, tmp)
    base_vocab = base.get_vocab()
    for text in out_vocab:
        if text not in added and text not in base_vocab:
            res.add_tokens(text)
    for info in added.values():
        res.add_tokens(info)
    return res


def _group(cfg_models: Sequence[str], base: str | None) -> tuple[str, ...]:
    """MergeKit's model order for a tensor: the listed models, then the base if not listed."""
    out: list[str] = []
    for m in cfg_models:
        if m not in out:
            out.append(m)
    if base is not None and base not in out:
        out.append(base)
    return tuple(out)


def build_vocabulary(settings: TokenizerSettings, ckpts: Mapping[str, Checkpoint], *, models: Sequence[str],
                     base: str | None, storage_options: dict[str, Any] | None,
                     chat_template: str | None = None) -> Vocabulary:
    """The output vocabulary of `settings` over the opened inputs `ckpts` (location ->
    checkpoint; `models` the config's models in order, `base` its base_model).

    Every problem is a ConfigError or CheckpointError raised here, at plan time."""
    group = _group(models, base)
    base_loc = base or models[0]
    notes: list[str] = []
    sizes: dict[str, int] = {}
    tensors: dict[str, tuple[str, ...]] = {}
    for loc in group:
        named, size = vocab_tensors(ckpts[loc])
        if not named:
            raise CheckpointError(f"{loc}: no embedding tensor found (looked for names ending in "
                                  "embed_tokens.weight, lm_head.weight, wte.weight, ...); a tokenizer merge needs one")
        sizes[loc] = size
        tensors[loc] = tuple(sorted(named))
    with tempfile.TemporaryDirectory() as tmp:
        named_source = None
        if settings.source not in ("base", "union"):  # read first: a wrong location is named at once
            named_source = load_tokenizer(settings.source, storage_options, tmp)
            if named_source is None:
                raise CheckpointError(f"{settings.source}: has no tokenizer files; tokenizer_source needs a "
                                      "tokenizer.json (or tokenizer.model) there")
        toks: dict[str, Any] = {}
        for loc in (base_loc, *[g for g in group if g != base_loc]):
            tok = load_tokenizer(loc, storage_options, tmp)
            if tok is None:
                if loc == base_loc:
                    raise CheckpointError(f"{loc}: has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                          "...); with tokenizer_source / tokenizer: the output vocabulary is built "
                                          "from the base model's tokenizer and every model's")
                notes.append(f"{loc}: no tokenizer files; its vocabulary is taken to be the base model's (as MergeKit)")
                continue
            toks[loc] = tok
        base_tok = toks[base_loc]
        beyond = sorted(t for t, i in base_tok.get_vocab().items() if i >= sizes[base_loc])
        if beyond:
            # MergeKit strips such tokens from a BPE tokenizer's JSON by hand; we do not edit tokenizers
            raise ConfigError(f"{base_loc}: its tokenizer has {len(beyond)} token(s) with ids at or above config.json's "
                              f"vocab_size {sizes[base_loc]} (e.g. {beyond[0]!r}); they have no embedding row. "
                              "Remove them from the tokenizer, or use a tokenizer_source whose tokens all have rows")
        if settings.source == "base":
            out = _copy_tokenizer(base_tok, tmp)
        elif settings.source == "union":
            order = (base_loc, *[g for g in group if g != base_loc])  # MergeKit: the base's tokenizer first
            out = _union(base_tok, [(toks[g], sizes[g]) for g in order if g in toks], tmp)
        else:
            out = named_source
        have = set(out.get_vocab())
        for rule in settings.tokens:
            if rule.token not in have:
                out.add_tokens(rule.token)
                have.add(rule.token)
        vocab = out.get_vocab()
        n_tokens = len(vocab)
        if vocab and max(vocab.values()) != n_tokens - 1:  # ids must number the rows 0..n-1
            raise ConfigError(f"the output tokenizer ({settings.source}) has {n_tokens} tokens but ids up to "
                              f"{max(vocab.values())}; its ids have gaps, so they cannot index embedding rows")
        pad = settings.pad_to_multiple_of
        size = -(-n_tokens // pad) * pad if pad else n_tokens
        model_vocab = {loc: (toks.get(loc) or base_tok).get_vocab() for loc in group}
        own: list[tuple[int, ...]] = []
        for loc in group:
            mv, limit = model_vocab[loc], sizes[loc]
            row = [-1] * n_tokens
            for text, new in vocab.items():
                old = mv.get(text)
                if old is not None and old < limit:
                    row[new] = old
            own.append(tuple(row))
        recipes = _recipes(settings, group, base, vocab, own, model_vocab, sizes)
        zero = sorted(t for t, r in recipes.items() if not r.terms and all(o[t] < 0 for o in own))
        if zero:
            inv = {i: text for text, i in vocab.items()}
            notes.append(f"{len(zero)} token(s) of the output tokenizer are in no merged model and get zero "
                         f"embedding rows, as in MergeKit (e.g. {inv[zero[0]]!r}); give them a `source` under "
                         "tokenizer.tokens to copy another token's row")
        forced = {vocab[r.token] for r in settings.tokens if r.force}
        if forced:  # `force`: every model takes the configured row, its own row or not
            own = [tuple(-1 if t in forced else r for t, r in enumerate(row)) for row in own]
        files = tokenizer_files(out, chat_template)
    return Vocabulary(sources=group, n_tokens=n_tokens, size=size, own=tuple(own), recipes=recipes,
                      tensors=tensors, files=files, notes=tuple(notes))


def _recipes(settings: TokenizerSettings, group: tuple[str, ...], base: str | None, vocab: Mapping[str, int],
             own: Sequence[Sequence[int]], model_vocab: Mapping[str, Mapping[str, int]],
             sizes: Mapping[str, int]) -> dict[int, Recipe]:
    """MergeKit's default rows (mergekit/tokenizer/embed.py): for a token some model lacks (or a
    forced one), the row every lacking model takes. Its rule, in order: the token's configured
    source; present in one model: that model's row; in none: zero; the base has it: the base's
    row; else the mean over the models that have it."""
    rules = {r.token: r for r in settings.tokens}
    out: dict[int, Recipe] = {}
    for text, t in vocab.items():
        present = [i for i in range(len(group)) if own[i][t] >= 0]
        rule = rules.get(text)
        if (rule is None or not rule.force) and len(present) == len(group):
            continue
        if rule is None:
            b = group.index(base) if base is not None else -1
            if len(present) == 1:
                out[t] = Recipe(terms=((present[0], own[present[0]][t]),))
            elif b in present:
                out[t] = Recipe(terms=((b, own[b][t]),))
            else:  # the mean over the models that have it (none: an empty mean, a zero row)
                out[t] = Recipe(terms=tuple((i, own[i][t]) for i in present))
            continue
        src = rule.source
        where = f"tokenizer.tokens.{text}"
        if src is None:
            lacking = [group[i] for i in range(len(group)) if i not in present]
            raise ConfigError(f"`{where}`: no `source` given, and {', '.join(lacking) or 'no model'} "
                              f"{'lacks' if len(lacking) == 1 else 'lack'} the token"
                              f"{' (force: true needs a source)' if rule.force else ''}; give its `source`")
        if src.kind == "zero":
            out[t] = Recipe(terms=())
            continue
        if src.model not in group:
            raise ConfigError(f"`{where}.source`: model {src.model} is not one of the merged models "
                              f"({', '.join(group)})")
        i = group.index(src.model)
        if src.kind == "model":
            if own[i][t] < 0:
                raise ConfigError(f"`{where}.source`: {src.model} has no token {text!r}")
            out[t] = Recipe(terms=((i, own[i][t]),))
            continue
        row = src.token_id if src.token_id is not None else model_vocab[src.model].get(src.token or "")
        if row is None:
            raise ConfigError(f"`{where}.source.token`: {src.model}'s tokenizer has no token {src.token!r}")
        if row >= sizes[src.model]:
            raise ConfigError(f"`{where}.source`: token id {row} is out of range for {src.model} "
                              f"(vocab_size {sizes[src.model]})")
        out[t] = Recipe(terms=((i, row),))
    return out
