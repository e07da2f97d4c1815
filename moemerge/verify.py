"""Check a finished output against its manifest: every tensor's sha256, read by byte ranges."""

from __future__ import annotations

import hashlib
import json

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.writer import MANIFEST_NAME

__all__ = ["verify"]

_READ = 64 << 20  # bytes per read: large sequential reads, bounded memory


def verify(out: str) -> int:
    """Re-hash every tensor of `out`; return how many matched, raise naming the first that did not."""
    from moemerge.io.swap import unfinished

    if unfinished(out):  # before opening: an unfinished output is no model directory yet
        raise CheckpointError(f"{out} is unfinished (a run was interrupted or is still running); "
                              "rerun with --resume")
    ck = Checkpoint.open(out)
    try:
        raw = ck.side_file(MANIFEST_NAME)
        if raw is None:
            raise CheckpointError(f"{out}: no {MANIFEST_NAME}; the run did not finish (or this is not a moemerge output)")
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"{out}/{MANIFEST_NAME}: not valid JSON ({e}); the output is damaged") from e
        expected = manifest.get("tensors") if isinstance(manifest, dict) else None
        if not isinstance(expected, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) for m in expected.values()
        ):
            raise CheckpointError(
                f"{out}/{MANIFEST_NAME}: has no `tensors` map of name -> {{sha256: ...}}; the output is damaged"
            )
        missing = sorted(set(expected) - set(ck.tensors))
        if missing:
            raise CheckpointError(f"{out}: tensor `{missing[0]}` is in the manifest but not in the shards")
        buf = bytearray(_READ)
        for name, meta in expected.items():
            t = ck.tensors[name]
            h = hashlib.sha256()
            for _, view in ck.iter_rows(name, buf):
                h.update(view)
            if h.hexdigest() != meta["sha256"]:
                raise CheckpointError(f"{out}/{t.file}: tensor `{name}` does not match its manifest checksum (corrupted)")
        return len(expected)
    finally:
        ck.close()
