"""Tensor names of DCP checkpoints: which keys are model weights, and what they are called.

Pure functions: stored key list in, {stored key: output name} out. A DCP state dict holds the
whole training state (`model.*`, `optimizer.*`, `lr_scheduler.*`, ...); only model weights are
merged, named as in an HF-style directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moemerge.errors import CheckpointError, ConfigError

__all__ = ["MODEL_PREFIX", "DcpNames", "is_training_state", "parse_dcp_names", "select_names", "stored_keys"]

#: The key of the model in the usual `{"model": ..., "optimizer": ...}` DCP state dict.
MODEL_PREFIX = "model"

# First key component of training state that is never a model weight (torch's optimizer and
# scheduler state dicts, torchtitan's dataloader / train_state, saved RNG states).
_TRAINING_STATE = re.compile(r"^(optim|lr_scheduler|scheduler|rng|dataloader|train_state)", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class DcpNames:
    """How DCP keys become tensor names (YAML: `dcp: {prefix: model, rename: {old: new}}`).

    Example: with `prefix="model"` and `rename=(("layers.", "model.layers."),)` the key
    `model.layers.0.w` is read as `model.layers.0.w` and `model.tok.w` as `tok.w`;
    `optimizer.state.layers.0.w.exp_avg` is not read.
    """

    prefix: str | None = None
    """Read only keys under this dotted prefix (`model` reads `model.*`), stripped from the
    names; "" reads every key but training state. None (default): `model` when any key has
    it, otherwise every key but training state (`optim*`, `lr_scheduler*`, `scheduler*`,
    `rng*`, `dataloader*`, `train_state*`)."""
    rename: tuple[tuple[str, str], ...] = ()
    """(old prefix, new prefix) pairs tried in order on the stripped name; the first pair
    whose old prefix matches is applied, once."""

    def __post_init__(self) -> None:
        if self.prefix is not None and not isinstance(self.prefix, str):
            raise ConfigError(f"dcp.prefix: expected a string, got {self.prefix!r}")
        for pair in self.rename:
            if (not isinstance(pair, tuple) or len(pair) != 2
                    or not all(isinstance(p, str) for p in pair) or not pair[0]):
                raise ConfigError(
                    f"dcp.rename: each entry must map a non-empty old prefix to a new prefix "
                    f"(strings), got {pair!r}"
                )


def parse_dcp_names(doc: Any, *, where: str = "dcp") -> DcpNames:
    """The YAML `dcp:` mapping -> DcpNames; `rename` is a mapping (kept in order) or a list
    of `[old, new]` pairs."""
    if doc is None:
        return DcpNames()
    if not isinstance(doc, dict):
        raise ConfigError(f"`{where}` must be a mapping with `prefix` and/or `rename`, got {doc!r}")
    unknown = sorted(set(map(str, doc)) - {"prefix", "rename"})
    if unknown:
        raise ConfigError(f"`{where}`: unknown key(s) {unknown}; allowed: prefix, rename")
    prefix = doc.get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"`{where}.prefix`: expected a string such as `model`, got {prefix!r}")
    raw = doc.get("rename") or {}
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        pairs = [tuple(p) for p in raw]
    else:
        raise ConfigError(f"`{where}.rename`: expected a mapping of old prefix -> new prefix, got {raw!r}")
    for old, new in pairs:
        if not isinstance(old, str) or not old or not isinstance(new, str):
            raise ConfigError(
                f"`{where}.rename`: {old!r} -> {new!r}: old and new prefixes must be strings "
                "(old non-empty); quote them in YAML"
            )
    return DcpNames(prefix=prefix, rename=tuple((str(o), str(n)) for o, n in pairs))


def is_training_state(key: str) -> bool:
    """Whether `key` belongs to optimizer / scheduler / loader state (never a weight)."""
    return bool(_TRAINING_STATE.match(key.split(".", 1)[0]))


def _under(key: str, prefix: str) -> str | None:
    """`key` without the dotted `prefix`, or None when the key is not under it."""
    if key.startswith(prefix + ".") and len(key) > len(prefix) + 1:
        return key[len(prefix) + 1:]
    return None


def _renamed(name: str, rename: tuple[tuple[str, str], ...]) -> str:
    for old, new in rename:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def select_names(keys: Iterable[str], names: DcpNames | None, *, where: str) -> dict[str, str]:
    """{stored key: output name} of the model keys among `keys` (in the given order).

    Raises CheckpointError when nothing is selected or two keys map to one name.
    """
    keys = list(keys)
    names = names or DcpNames()
    prefix = names.prefix
    if prefix is None:
        prefix = MODEL_PREFIX if any(_under(k, MODEL_PREFIX) for k in keys) else ""
    prefix = prefix.rstrip(".")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        if prefix:
            stripped = _under(key, prefix)
            if stripped is None:
                continue
        elif is_training_state(key):
            continue
        else:
            stripped = key
        name = _renamed(stripped, names.rename)
        if not name:
            raise CheckpointError(f"{where}: key `{key}` is renamed to an empty name; fix `dcp.rename`")
        if name in seen:
            raise CheckpointError(
                f"{where}: keys `{seen[name]}` and `{key}` both become `{name}`; "
                "fix `dcp.prefix` / `dcp.rename` so that names stay distinct"
            )
        seen[name] = key
        out[key] = name
    if not out:
        tops = sorted({k.split(".", 1)[0] for k in keys})
        shown = ", ".join(tops[:12]) + (", ..." if len(tops) > 12 else "")
        what = f"under the prefix `{prefix}.`" if prefix else "outside optimizer/scheduler state"
        raise CheckpointError(
            f"{where}: no model tensors {what}; its keys start with: {shown or '(none)'}; "
            "set `dcp: {prefix: ...}` to the key that holds the model"
        )
    return out


def stored_keys(names_out: Iterable[str], names: DcpNames | None, *, where: str) -> dict[str, str]:
    """{output name: DCP key} for writing a DCP checkpoint: the inverse of `select_names`, so
    reading the written keys back with the same `names` gives `names_out` again.

    The prefix is `names.prefix`, or `model` (MODEL_PREFIX) when None; "" writes bare keys.
    A name a `rename` pair produced goes back through the first pair that round-trips (the
    training model's key), else it is kept. Example: with prefix `model` and rename
    `(("layers.", "model.layers."),)`, `model.layers.0.w` -> `model.layers.0.w` (stored key) and
    `tok.w` -> `model.tok.w`.
    """
    names = names or DcpNames()
    prefix = (MODEL_PREFIX if names.prefix is None else names.prefix).rstrip(".")
    out: dict[str, str] = {}
    for name in names_out:
        found = None
        for old, new in names.rename:
            if name.startswith(new):
                key = old + name[len(new):]
                if _renamed(key, names.rename) == name:
                    found = key
                    break
        if found is None:
            if _renamed(name, names.rename) != name:
                raise ConfigError(
                    f"{where}: tensor `{name}` has no DCP key that `dcp.rename` maps to it (a rename "
                    "pair's old prefix matches it); fix --rename or the tensor names")
            found = name
        if not prefix and is_training_state(found):
            raise ConfigError(
                f"{where}: tensor `{name}` would be stored as `{found}`, which reads as optimizer/scheduler "
                "state; give --dcp-prefix (e.g. model.) so that model keys stay distinct")
        out[name] = f"{prefix}.{found}" if prefix else found
    return out
