"""The YAML's tokenizer keys (`tokenizer_source`, `tokenizer:`, `chat_template:`) parsed into
records, with MergeKit 0.1.5's meaning. Pure: no tokenizer is read here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from moemerge.errors import ConfigError

__all__ = ["TokenSource", "TokenRule", "TokenizerSettings", "parse_tokenizer_settings", "parse_chat_template",
           "NAMED_TEMPLATES"]

#: The chat templates a name selects (MergeKit's `chat_template: chatml` ...), plus `auto`.
NAMED_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSource:
    """Where a token's embedding row comes from (`tokenizer.tokens.T.source`).

    `kind` is `model` (that model's row for the same token), `model_token` (that model's row of
    another token, by text `token` or by id `token_id`) or `zero` (a zero row)."""

    kind: Literal["model", "model_token", "zero"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRule:
    """One entry of `tokenizer.tokens`: the token (added to the vocabulary if new), its row's
    source, and `force` (use the source even where a model has the token)."""

    token: str
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenizerSettings:
    """How the output vocabulary is built (None of these in a config: embeddings merged by row)."""

    source: str
    """`base`, `union`, or a model location whose tokenizer is the output's."""
    tokens: tuple[TokenRule, ...] = ()
    pad_to_multiple_of: int | None = None
    """Round the output vocabulary up to a multiple of this (extra rows: the mean embedding)."""


def _token_source(v: Any, where: str, model_ref: Callable[[Any, str], str]) -> TokenSource | None:
    if v is None:
        return None
    if isinstance(v, str):
        return TokenSource(kind="model", model=model_ref(v, where))
    if isinstance(v, dict):
        kind = v.get("kind")
        if kind == "zero" and set(v) == {"kind"}:
            return TokenSource(kind="zero")
        if kind == "model_token" and set(v) <= {"kind", "model", "token", "token_id"} and "model" in v:
            token, token_id = v.get("token"), v.get("token_id")
            if (token is None) == (token_id is None):
                raise ConfigError(f"`{where}`: give exactly one of `token` or `token_id`")
            if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
                raise ConfigError(f"`{where}.token_id`: expected a token id (an integer >= 0), got {token_id!r}")
            if token is not None and not isinstance(token, str):
                raise ConfigError(f"`{where}.token`: expected the token's text, got {token!r}")
            return TokenSource(kind="model_token", model=model_ref(v["model"], f"{where}.model"),
                               token=token, token_id=token_id)
        if set(v) <= {"model", "path"}:  # a model reference written as a mapping
            return TokenSource(kind="model", model=model_ref(v, where))
    raise ConfigError(f"`{where}`: expected a model, {{kind: zero}} or {{kind: model_token, model: M, token: T}} "
                      f"(or token_id: N), got {v!r}")


def parse_tokenizer_settings(doc: dict[str, Any], where: str,
                             model_ref: Callable[[Any, str], str]) -> TokenizerSettings | None:
    """`tokenizer_source` or the `tokenizer:` block (not both, as MergeKit) -> settings; None
    when neither is given. `model_ref` parses a model reference (config.py's rules)."""
    src, block = doc.get("tokenizer_source"), doc.get("tokenizer")
    if src is not None and block is not None:
        raise ConfigError(f"{where}: give `tokenizer_source` or the `tokenizer:` block, not both "
                          "(the block's `source` is the same setting)")
    if block is None:
        if src is None:
            return None
        return TokenizerSettings(source=_source(src, "tokenizer_source", model_ref))
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: `tokenizer` must be a mapping with `source`, `tokens`, `pad_to_multiple_of`")
    extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if extra:
        raise ConfigError(f"{where}: `tokenizer` has unknown key(s) {extra}; allowed: source, tokens, pad_to_multiple_of")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(f"{where}: `tokenizer.pad_to_multiple_of` must be a positive integer, got {pad!r}")
    tokens_doc = block.get("tokens") or {}
    if not isinstance(tokens_doc, dict):
        raise ConfigError(f"{where}: `tokenizer.tokens` must map token text -> {{source: ..., force: ...}}")
    rules = []
    for tok, spec in tokens_doc.items():
        at = f"tokenizer.tokens.{tok}"
        spec = {} if spec is None else spec
        if not isinstance(spec, dict) or set(spec) - {"source", "force"}:
            raise ConfigError(f"`{at}`: expected a mapping with `source` and/or `force`, got {spec!r}")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"`{at}.force`: expected true or false, got {force!r}")
        rules.append(TokenRule(token=str(tok), source=_token_source(spec.get("source"), f"{at}.source", model_ref),
                               force=force))
    return TokenizerSettings(source=_source(block.get("source", "union"), "tokenizer.source", model_ref),
                             tokens=tuple(rules), pad_to_multiple_of=pad)


def _source(v: Any, key: str, model_ref: Callable[[Any, str], str]) -> str:
    if v in ("base", "union"):
        return str(v)
    if not isinstance(v, str | dict):
        raise ConfigError(f"`{key}`: expected 'base', 'union' or a model location, got {v!r}")
    return model_ref(v, key)


def parse_chat_template(v: Any, where: str) -> str | None:
    """`chat_template:` checked as MergeKit checks it: `auto`, a template name, or a Jinja text."""
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: `chat_template` must be a template name ({', '.join(NAMED_TEMPLATES)}), "
                          f"`auto`, or a Jinja template string, got {v!r}")
    if v == "auto" or v in NAMED_TEMPLATES:
        return v
    if v == "exaone":  # MergeKit's exaone.jinja renders its own indentation into every prompt
        raise ConfigError(f"{where}: `chat_template: exaone` is not built in; give the template's Jinja text instead")
    if len(v) < 20 or "{" not in v:  # MergeKit refuses these too: a misspelt name, not a template
        raise ConfigError(f"{where}: `chat_template: {v}` is neither a template name "
                          f"({', '.join(NAMED_TEMPLATES)}, auto) nor a Jinja template")
    return v
