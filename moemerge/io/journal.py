"""The resume journal: which tensors of an unfinished output are on disk, with their checksums.

A run appends a line per finished tensor to `.moemerge-journal.jsonl` in the output directory,
only after that tensor's bytes were flushed to disk, so a line never speaks for bytes a crash
could lose. The first line identifies the plan (a hash of everything that decides the output
bytes and where they go) and the inputs (`io.identity`: per file size, stamps, header hash).
`--resume` refuses a journal of another plan or of inputs changed since, and keeps a listed
tensor only if its bytes on disk still hash to the journal's sha256 (`check_kept`). The
journal is removed when the output is committed.

Example::

    j = Journal.load(out_dir, plan_id, resume=True, inputs=ids)  # reads only: j.done, {} on a fresh start
    ...                                                          # lay out the output
    check = j.check_kept(writer.read_back, sizes)                # drops what no longer hashes right
    j.begin()                                                    # (re)writes the journal
    j.record({"model.norm.weight": "ab12..."})
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from moemerge.errors import OutputError
from moemerge.io.identity import changed_input
from moemerge.sizes import format_size

__all__ = ["Journal", "JOURNAL_NAME", "ResumeCheck"]

JOURNAL_NAME = ".moemerge-journal.jsonl"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeCheck:
    """What `--resume` kept of an earlier run, after re-reading it."""

    kept: int
    """Journaled tensors whose bytes on disk still hash to the journal: not computed again."""
    kept_bytes: int
    """Bytes re-read to check them."""
    recomputed: int
    """Journaled tensors whose bytes did not match (a shard deleted, truncated or damaged)."""
    left: int
    """Tensors the earlier run had not finished."""

    @property
    def message(self) -> str:
        why = " (their bytes on disk did not match the journal)" if self.recomputed else ""
        return (f"resume: {self.kept:,} tensors kept ({format_size(self.kept_bytes)} re-read and verified), "
                f"{self.recomputed:,} recomputed{why}, {self.left:,} not yet written")


class Journal:
    """Append-only record of finished tensors of one output directory."""

    def __init__(self, path: str, plan_id: str, done: dict[str, str],
                 inputs: dict[str, dict[str, Any]] | None = None) -> None:
        self.path = path
        self.plan_id = plan_id
        self.done = done
        """Tensor name -> sha256 of what an earlier run finished (empty on a fresh start)."""
        self.inputs = inputs or {}
        """The inputs' identity (`io.identity.input_identity`), recorded in the first line."""
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Journal({self.path!r}, done={len(self.done)})"

    @classmethod
    def load(cls, out_dir: str, plan_id: str, *, resume: bool,
             inputs: dict[str, dict[str, Any]] | None = None) -> Journal:
        """The journal for `plan_id` and `inputs`; with `resume`, what an earlier run of it finished.

        Reads only, so a journal of another plan or of changed inputs is refused before the
        output is touched.
        """
        path = os.path.join(out_dir, JOURNAL_NAME)
        done = _read(path, plan_id, inputs or {}) if resume and os.path.exists(path) else {}
        return cls(path, plan_id, done, inputs)

    def check_kept(self, read_back: Callable[[str], Iterable[memoryview]], sizes: Mapping[str, int], *,
                   threads: int = 4, on_bytes: Callable[[int], None] | None = None) -> ResumeCheck:
        """Re-read every tensor `done` lists (`read_back(name)` yields its bytes on disk) and keep
        it only if they still hash to the journal's sha256; the rest leave `done` (recomputed).

        A deleted shard is laid out again as zeros and a damaged one keeps its damage: neither
        hashes right. `sizes` is every planned tensor's byte count.
        """
        names = [n for n in self.done if n in sizes]

        def same(name: str) -> bool:
            h = hashlib.sha256()
            for block in read_back(name):
                h.update(block)  # releases the GIL: threads overlap reads and hashing
                if on_bytes is not None:
                    on_bytes(len(block))
            return h.hexdigest() == self.done[name]

        if len(names) > 1 and threads > 1:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moemerge-recheck") as pool:
                ok = list(pool.map(same, names))
        else:
            ok = [same(n) for n in names]
        kept = {n: self.done[n] for n, good in zip(names, ok) if good}
        bad = len(names) - len(kept)
        self.done = kept
        return ResumeCheck(kept=len(kept), kept_bytes=sum(sizes[n] for n in kept), recomputed=bad,
                           left=len(sizes) - len(kept) - bad)

    def begin(self) -> None:
        """Write the journal anew: the plan and inputs, then what is already done (kept on resume)."""
        try:
            with open(self.path, "w") as f:
                f.write(json.dumps({"plan": self.plan_id, "inputs": self.inputs}) + "\n")
                for name, digest in self.done.items():
                    f.write(json.dumps({"t": name, "sha256": digest}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write the resume journal ({e.strerror or e})") from e

    def record(self, digests: dict[str, str]) -> None:
        """Add tensors whose bytes are already on disk (the caller flushed them first)."""
        if not digests:
            return
        lines = "".join(json.dumps({"t": n, "sha256": d}) + "\n" for n, d in digests.items())
        with self._lock:
            try:
                with open(self.path, "a") as f:
                    f.write(lines)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise OutputError(f"{self.path}: cannot write the resume journal ({e.strerror or e})") from e

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _read(path: str, plan_id: str, inputs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The finished tensors of a journal of `plan_id` and `inputs`; an error for another plan's
    journal or for inputs changed since it began."""
    done: dict[str, str] = {}
    with open(path) as f:
        lines = f.read().split("\n")
    try:
        head = json.loads(lines[0])
    except (ValueError, IndexError):
        head = None
    if not isinstance(head, dict) or "plan" not in head:
        raise OutputError(f"{path}: not a moemerge resume journal; run without --resume to start over")
    if head["plan"] != plan_id:
        raise OutputError(
            f"{path}: the unfinished output was made by another plan (other config, inputs, dtype, "
            "shard size or seed); run without --resume to start over, or rerun with the same settings")
    if not isinstance(head.get("inputs"), dict):
        raise OutputError(f"{path}: the journal does not record its inputs' identity (an older moemerge wrote "
                          "it); run without --resume to start over")
    changed = changed_input(head["inputs"], inputs)
    if changed is not None:
        # its kept tensors were computed from the old bytes: keeping them would mix two models
        raise OutputError(f"{changed}; the tensors the interrupted run finished may come from the old bytes: "
                          "run without --resume to start over")
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            break  # a line cut by a crash: everything before it holds
        if isinstance(entry, dict) and isinstance(entry.get("t"), str) and isinstance(entry.get("sha256"), str):
            done[entry["t"]] = entry["sha256"]
    return done
