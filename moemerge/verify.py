"""Check a finished output against its manifest: every tensor's sha256, read by byte ranges."""

from __future__ import annotations

import hashlib

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.manifest import MANIFEST_NAME, Manifest

__all__ = ["verify"]

_READ = 64 << 20  # bytes per read: large sequential reads, bounded memory


def verify(out: str) -> int:
    """Re-hash every tensor of `out`; return how many matched, raise naming the first that did not."""
    from moemerge.io.swap import unfinished

    if unfinished(out):  # before opening: an unfinished output is no model directory yet
        raise CheckpointError(f"{out} is unfinished (a run was interrupted or is still running); "
                              "rerun with --resume")
    from moemerge.io.dcp_writer import output_names

    ck = Checkpoint.open(out, names=output_names(out))  # a DCP output: read under the names it was written with
    try:
        raw = ck.side_file(MANIFEST_NAME)
        if raw is None:
            raise CheckpointError(f"{out}: no {MANIFEST_NAME}; the run did not finish (or this is not a moemerge output)")
        where = f"{out}/{MANIFEST_NAME}"
        expected = Manifest.from_json(raw, where=where).listed(where)
        unsummed = [n for n, m in expected.items() if m.sha256 is None]
        if unsummed:
            raise CheckpointError(f"{where}: tensor `{unsummed[0]}` has no sha256; the output is damaged")
        missing = sorted(set(expected) - set(ck.tensors))
        if missing:
            raise CheckpointError(f"{out}: tensor `{missing[0]}` is in the manifest but not in the shards")
        buf = bytearray(_READ)
        for name, meta in expected.items():
            t = ck.tensors[name]
            h = hashlib.sha256()
            for _, view in ck.iter_rows(name, buf):
                h.update(view)
            if h.hexdigest() != meta.sha256:
                raise CheckpointError(f"{out}/{t.file}: tensor `{name}` does not match its manifest checksum (corrupted)")
        return len(expected)
    finally:
        ck.close()
