"""Convert a moemerge Zarr output to a Hugging Face safetensors directory, streaming.

Tensors are copied by row ranges through a fixed buffer into shards laid out before the copy
(the same layout code as `moemerge run`), so memory stays bounded and the shards are byte for
byte those a safetensors run of the same merge writes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any

from moemerge.errors import CheckpointError
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.dtypes import itemsize
from moemerge.io.lease import take_lease
from moemerge.io.safetensors_format import ShardLayout
from moemerge.io.sidefiles import read_side_files
from moemerge.io.manifest import MANIFEST_NAME, Manifest, TensorEntry
from moemerge.io.writer import OWN_SIDE_FILES, LocalModelWriter, TensorPlacement, check_output
from moemerge.io.zarr_reader import ZarrCheckpoint
from moemerge.planner.layout import lay_out_shards
from moemerge.settings import DEFAULT_SHARD_SIZE, VERSION
from moemerge.sizes import parse_size

__all__ = ["export", "ExportResult", "COPY_BYTES"]

#: Bytes copied per read/write: large sequential ranges, bounded memory (as in verify).
COPY_BYTES = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportResult:
    out: str
    tensors: int
    shards: tuple[str, ...]
    bytes_written: int


def _layout(order: list[tuple[str, str, tuple[int, ...]]], planned: dict[str, str],
            shard_size: int | None) -> tuple[list[ShardLayout], dict[str, tuple[str, int]]]:
    """Shards for `order`: re-packed to `shard_size`, or (None) the shards the merge planned."""
    if shard_size is not None or not all(planned.get(n) for n, _, _ in order):
        return lay_out_shards(order, shard_size or parse_size(DEFAULT_SHARD_SIZE, what="--shard-size", minimum=1))
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = []
    for t in order:
        if not groups or planned[groups[-1][-1][0]] != planned[t[0]]:
            groups.append([])
        groups[-1].append(t)
    shards: list[ShardLayout] = []
    where: dict[str, tuple[str, int]] = {}
    for group in groups:
        # one group -> one shard (a size limit above its bytes), renamed to the planned name
        limit = sum(itemsize(d) * math.prod(s) for _, d, s in group) + 1
        (shard,), offs = lay_out_shards(group, limit)
        name = planned[group[0][0]]
        shards.append(replace(shard, file=name))
        where.update({n: (name, off) for n, (_, off) in offs.items()})
    return shards, where


def export(store: str, out: str, *, shard_size: str | int | None = None, overwrite: bool = False,
           storage_options: dict[str, Any] | None = None) -> ExportResult:
    """Write the moemerge Zarr output `store` as a sharded safetensors directory `out`.

    `shard_size` None keeps the shards the merge planned (what `moemerge run` with the same
    `--shard-size` writes); a size re-packs the tensors in the same order.

    Example:
        >>> export("merged.zarr", "merged-hf")  # doctest: +SKIP
    """
    check_output(out, overwrite=overwrite, inputs=[store])
    lease = take_lease(out, kind="output", what="moemerge export")  # one writer at a time (io.lease)
    try:
        ck = Checkpoint.open(store, storage_options)
    except BaseException:
        lease.release()
        raise
    try:
        if not isinstance(ck, ZarrCheckpoint):
            raise CheckpointError(f"{store}: not a moemerge Zarr output (no zarr.json); nothing to export")
        where_man = f"{store}/{MANIFEST_NAME}"
        manifest = Manifest.from_json(ck.side_file(MANIFEST_NAME) or b"{}", where=where_man)
        listed = manifest.listed(where_man)
        # the manifest lists tensors in plan order: the order `moemerge run` lays shards out in
        names = [n for n in listed if n in ck.tensors] + sorted(set(ck.tensors) - set(listed))
        order = [(n, ck.tensors[n].dtype, ck.tensors[n].shape) for n in names]
        planned = {n: m.file for n, m in listed.items() if m.file}
        size = None if shard_size is None else parse_size(shard_size, what="--shard-size", minimum=1)
        shards, where = _layout(order, planned, size)
        places = {
            n: TensorPlacement(name=n, file=where[n][0], offset=where[n][1], dtype=d, shape=s,
                               row_bytes=ck.tensors[n].row_bytes)
            for n, d, s in order
        }
        writer = LocalModelWriter(out, tuple(shards), places, overwrite=overwrite)
        from moemerge.io.space import check_space

        check_space(writer, sum(ck.tensors[n].nbytes for n in names))  # before any byte is written
        writer.prepare()
        try:
            digests = _copy(ck, names, writer)
            for n in names:
                want = listed[n].sha256 if n in listed else None
                if want and want != digests[n]:
                    raise CheckpointError(
                        f"{store}/{ck.array(n)}: tensor `{n}` does not match its manifest "
                        "checksum (corrupted store); nothing was exported"
                    )
            files = read_side_files(store, storage_options, model=True, tokenizer=True)
            for own in OWN_SIDE_FILES:  # the config copies and the model card, when the merge wrote them
                raw = ck.side_file(own)
                if raw is not None:
                    files[own] = raw
            total = sum(ck.tensors[n].nbytes for n in names)
            index = {
                "metadata": {"total_size": total, "moemerge_version": VERSION},
                "weight_map": {n: where[n][0] for n in names},
            }
            # the merge's manifest, now of safetensors shards (a Zarr array is no longer named)
            man = manifest.updated(
                format=None, files={s.file: s.size for s in shards},
                tensors={n: replace(listed.get(n, TensorEntry()), file=where[n][0], dtype=ck.tensors[n].dtype,
                                    shape=ck.tensors[n].shape, sha256=digests[n], array=None)
                         for n in names},
                exported_from=store)
            lease.check()  # taken over meanwhile: fail rather than commit
            writer.finish(side_files=files, index=index, manifest=man)
        except BaseException as e:
            writer.close()
            from moemerge.io.swap import note_state

            note_state(e, writer)  # what is on disk now, for the CLI's one line
            raise
    finally:
        ck.close()
        lease.release()
    return ExportResult(out=out, tensors=len(names), shards=tuple(s.file for s in shards), bytes_written=total)


def _copy(ck: Checkpoint, names: list[str], writer: LocalModelWriter) -> dict[str, str]:
    """Copy every tensor by row ranges through one buffer; return each tensor's sha256."""
    buf = bytearray(COPY_BYTES)
    digests: dict[str, str] = {}
    for name in names:
        h = hashlib.sha256()
        for r0, view in ck.iter_rows(name, buf):
            writer.write_rows(name, r0, view)
            h.update(view)
        digests[name] = h.hexdigest()
    return digests

