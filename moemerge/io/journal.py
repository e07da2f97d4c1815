"""The resume journal: which tensors of an unfinished output are on disk, with their checksums.

A run appends a line per finished tensor to `.moemerge-journal.jsonl` in the output directory,
only after that tensor's bytes were flushed to disk, so a line never speaks for bytes a crash
could lose. The first line identifies the plan (a hash of everything that decides the output
bytes and where they go); `--resume` skips the tensors listed when the plan is the same, and
refuses a journal of another plan. The journal is removed when the output is committed.

Example::

    j = Journal.load(out_dir, plan_id, resume=True)   # reads only: j.done, {} on a fresh start
    ...                                               # lay out the output
    j.begin()                                         # (re)writes the journal
    j.record({"model.norm.weight": "ab12..."})
"""

from __future__ import annotations

import json
import os
import threading

from moemerge.errors import OutputError

__all__ = ["Journal", "JOURNAL_NAME"]

JOURNAL_NAME = ".moemerge-journal.jsonl"


class Journal:
    """Append-only record of finished tensors of one output directory."""

    def __init__(self, path: str, plan_id: str, done: dict[str, str]) -> None:
        self.path = path
        self.plan_id = plan_id
        self.done = done
        """Tensor name -> sha256 of what an earlier run finished (empty on a fresh start)."""
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Journal({self.path!r}, done={len(self.done)})"

    @classmethod
    def load(cls, out_dir: str, plan_id: str, *, resume: bool) -> Journal:
        """The journal for `plan_id`; with `resume`, what an earlier run of it finished.

        Reads only, so a journal of another plan is refused before the output is touched.
        """
        path = os.path.join(out_dir, JOURNAL_NAME)
        done = _read(path, plan_id) if resume and os.path.exists(path) else {}
        return cls(path, plan_id, done)

    def begin(self) -> None:
        """Write the journal anew: the plan, then what is already done (kept on resume)."""
        try:
            with open(self.path, "w") as f:
                f.write(json.dumps({"plan": self.plan_id}) + "\n")
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


def _read(path: str, plan_id: str) -> dict[str, str]:
    """The finished tensors of a journal of `plan_id`; an error for another plan's journal."""
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
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            break  # a line cut by a crash: everything before it holds
        if isinstance(entry, dict) and isinstance(entry.get("t"), str) and isinstance(entry.get("sha256"), str):
            done[entry["t"]] = entry["sha256"]
    return done
