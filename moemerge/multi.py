"""Several named merges in one YAML file (MergeKit's `mergekit-multi`), run as one job.

Documents are separated by `---`; each may have a `name:`. A named document is written to
`INTERMEDIATE_DIR/NAME`, the one unnamed document (at most one) to `--out-path`; a model
reference equal to an earlier document's name (in `model`, `base_model`, `tokenizer_source`,
a tokenizer `source`) means that document's output. Documents run in dependency order.

Before any work, each document is found to be either kept or to run. A document is kept only
when its output is finished, was made from the same config (hash), and its input files are
unchanged since (sizes, change stamps and header hashes recorded in its manifest, `io.identity`)
— so a rebuilt intermediate always rebuilds what was made from it, where MergeKit's `--lazy`
keeps any output that exists. A stale finished output is replaced only with `--overwrite`; an
unfinished one is continued with `--resume` (or replaced with `--overwrite`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from moemerge.config import MergeConfig, parse_config, read_yaml_documents
from moemerge.errors import ConfigError, OutputError
from moemerge.io import storage

__all__ = ["Document", "Decision", "load_documents", "decide", "run_multi", "MULTI_KEY"]

#: The manifest key recording what a document's output was made from.
MULTI_KEY = "multi"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Keys whose string value is a model reference (MergeKit resolves names in model references only).
_REF_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})
_STATUS_SAID = {"absent": "not made yet", "unfinished": "unfinished", "finished": "finished"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    """One merge of the file, its references to earlier merges resolved to their outputs."""

    name: str | None
    """`name:` of the document; None for the final, unnamed merge."""
    config: MergeConfig
    out: str
    needs: tuple[str, ...]
    """Names of the documents whose outputs it reads."""

    @property
    def label(self) -> str:
        return self.name or "the unnamed (final) merge"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    doc: Document
    action: Literal["keep", "run"]
    why: str
    resume: bool = False


def _resolve_refs(node: Any, names: Mapping[str, str], used: set[str], key: str | None = None) -> Any:
    """A copy of `node` with model references to merge names replaced by their outputs."""
    if isinstance(node, dict):
        return {k: _resolve_refs(v, names, used, k) for k, v in node.items()}
    if isinstance(node, list):
        # `models: [a, b]` (plain strings) are model references too
        return [_resolve_refs(v, names, used, key if key in ("models",) or key in _REF_KEYS else None)
                for v in node]
    if isinstance(node, str) and (key in _REF_KEYS or key == "models"):
        head, plus, rest = node.partition("+")  # `name+lora`: the adapter applies to the merge's output
        if head in names:
            used.add(head)
            return names[head] + plus + rest
    return node


def load_documents(path: str, *, intermediate_dir: str, out_path: str | None,
                   storage_options: dict[str, Any] | None = None) -> list[Document]:
    """The file's merges in an order where each comes after those it reads; every document is
    validated here (schema, names, references, cycles), before anything runs."""
    raw = read_yaml_documents(path, storage_options=storage_options)
    docs: list[tuple[str | None, dict[str, Any]]] = []
    for i, doc in enumerate(raw):
        where = f"{path}: document {i + 1}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a YAML mapping (a merge config with `name:`), got "
                              f"{type(doc).__name__}")
        name = doc.get("name")
        if name is not None:
            name = str(name)
            if not _NAME.match(name) or name in (".", ".."):
                raise ConfigError(f"{where}: `name: {name}` must be a plain directory name (letters, digits, "
                                  "'.', '_', '-'): it names the merge's directory under --intermediate-dir")
        if any(n == name for n, _ in docs):
            raise ConfigError(f"{where}: " + (f"a second merge named `{name}`; names must be unique" if name
                                              else "a second unnamed merge; at most one merge may be unnamed "
                                                   "(the final one, written to --out-path)"))
        docs.append((name, {k: v for k, v in doc.items() if k != "name"}))
    if any(n is None for n, _ in docs) and not out_path:
        raise ConfigError(f"{path}: has an unnamed (final) merge: give --out-path for its output")
    if out_path and all(n is not None for n, _ in docs):
        raise ConfigError(f"{path}: every merge is named (written under --intermediate-dir), so --out-path "
                          "would stay empty; drop it or remove one merge's `name:`")
    if "://" not in intermediate_dir:
        # absolute: a relative `inter/NAME` not made yet would read as the Hub id `inter/NAME`
        intermediate_dir = os.path.abspath(intermediate_dir)
    outs = {n: storage.join(intermediate_dir, n) for n, _ in docs if n is not None}
    parsed: dict[str | None, Document] = {}
    for i, (name, doc) in enumerate(docs):
        used: set[str] = set()
        resolved = _resolve_refs(doc, outs, used)
        if name in used:
            raise ConfigError(f"{path}: merge `{name}` reads its own output")
        where = f"{path}: merge `{name or 'unnamed'}`"
        try:
            cfg = parse_config(resolved, where=where)
        except ConfigError as e:  # key-level messages name only the key: say which file and merge
            if e.message.startswith(where):
                raise
            raise ConfigError(f"{where}: {e.message}") from e
        out = outs[name] if name is not None else str(out_path)
        parsed[name] = Document(name=name, config=cfg, out=out, needs=tuple(sorted(used)))
    order: list[Document] = []
    state: dict[str | None, str] = {}

    def visit(n: str | None, chain: list[str]) -> None:
        if state.get(n) == "done":
            return
        if state.get(n) == "active":
            raise ConfigError(f"{path}: merges read each other in a cycle: {' -> '.join(chain + [str(n)])}")
        state[n] = "active"
        for dep in parsed[n].needs:
            visit(dep, chain + [str(n)])
        state[n] = "done"
        order.append(parsed[n])

    for n, _ in docs:
        visit(n, [])
    return order


def _finished_record(out: str, storage_options: dict[str, Any] | None) -> tuple[str, Any]:
    """('absent' | 'unfinished' | 'finished', manifest or None) of an output location."""
    from moemerge.io.manifest import MANIFEST_NAME, Manifest
    from moemerge.io.swap import unfinished

    if unfinished(out):
        return "unfinished", None
    fs, root = storage.resolve(out, storage_options)
    if not fs.exists(root):
        return "absent", None
    man = storage.join(root, MANIFEST_NAME)
    if not fs.exists(man):
        return "unfinished", None  # files but no commit: some run's leftovers
    return "finished", Manifest.from_json(fs.cat_file(man), where=f"{out}/{MANIFEST_NAME}")


def decide(docs: list[Document], *, lazy: bool, overwrite: bool, resume: bool,
           identity: Callable[[MergeConfig], dict[str, Any]]) -> list[Decision]:
    """Keep or run, for every document, in order; one error listing every output that is in the
    way (stale or unfinished without --overwrite / --resume), raised before anything runs.
    `identity` gives a config's input files as `io.identity` records them."""
    out: list[Decision] = []
    running: set[str] = set()
    blocked: list[str] = []
    for d in docs:
        status, manifest = _finished_record(d.out, d.config.storage_options)
        why = ""
        if status == "finished" and lazy:
            record = (manifest.extra.get(MULTI_KEY) if manifest is not None else None) or {}
            rerun = sorted(set(d.needs) & running)
            if rerun:
                why = f"it reads {', '.join(rerun)}, which runs again"
            elif manifest.config_hash != d.config.config_hash():
                why = "its config changed"
            elif not isinstance(record, dict) or record.get("inputs") != identity(d.config):
                why = "its input files changed since it was made"
            else:
                out.append(Decision(doc=d, action="keep", why="finished, same config and inputs"))
                continue
        elif status == "finished":
            why = "--no-lazy"
        if d.name is not None:
            running.add(d.name)
        if status == "finished" and not overwrite:
            blocked.append(f"{d.label} ({d.out}) is finished but must run again ({why}): pass --overwrite "
                           "to replace it")
        elif status == "unfinished" and not (resume or overwrite):
            blocked.append(f"{d.label} ({d.out}) is unfinished: pass --resume to continue it or --overwrite to "
                           "start it again")
        out.append(Decision(doc=d, action="run", why=why or _STATUS_SAID[status],
                            resume=status == "unfinished" and resume))
    if blocked:
        raise OutputError("nothing was run:\n  " + "\n  ".join(blocked))
    return out


def run_multi(path: str, *, intermediate_dir: str, out_path: str | None = None, lazy: bool = True,
              overwrite: bool = False, resume: bool = False, storage_options: dict[str, Any] | None = None,
              on_decision: Callable[[Decision], None] | None = None, **run_kwargs: Any) -> list[tuple[Decision, Any]]:
    """Run every merge of the multi-document file at `path` (see the module docstring); returns
    each decision with its `api.RunResult` (None when kept). `run_kwargs` go to every `api.run`
    (memory budget, shard size, seed, ...). `on_decision` hears of each one as it starts."""
    from moemerge.api import input_files, run

    docs = load_documents(path, intermediate_dir=intermediate_dir, out_path=out_path, storage_options=storage_options)
    plan = decide(docs, lazy=lazy, overwrite=overwrite, resume=resume, identity=input_files)
    done: list[tuple[Decision, Any]] = []
    for d in plan:
        if on_decision is not None:
            on_decision(d)
        if d.action == "keep":
            done.append((d, None))
            continue
        # what it is made from, as of now (earlier merges of this job are finished by now)
        record = {"name": d.doc.name, "inputs": input_files(d.doc.config)}
        res = run(d.doc.config, d.doc.out, overwrite=overwrite and not d.resume, resume=d.resume,
                  manifest_extra={MULTI_KEY: record}, **run_kwargs)
        done.append((d, res))
    return done
