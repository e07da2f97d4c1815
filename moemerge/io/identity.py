"""What an input's files are, cheaply: per file its size, change stamps and header hash.

The resume journal records it when a run starts; `--resume` refuses to keep work made from
inputs that changed since (rewritten in place with the same names and shapes, the plan alone
would not tell). One metadata call per file, no data read: headers were hashed at open.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.checkpoint import INDEX_NAME, Checkpoint
from moemerge.io.formats import unwrap
from moemerge.io.hub import revision_stamp

__all__ = ["input_identity", "changed_input"]

#: Object-storage `info` keys that change whenever an object's bytes do (S3, GCS, Azure).
_STAMP_KEYS = ("ETag", "etag", "VersionId", "generation", "LastModified", "last_modified", "updated", "mtime")


class _Absent(Exception):
    """An optional file (the index) is not there."""


def _files(ck: Checkpoint) -> list[tuple[str, bool]]:
    """(file relative to the checkpoint root, whether it may be absent): those whose bytes
    decide what the checkpoint serves."""
    from moemerge.io.dcp import METADATA_NAME, DcpCheckpoint
    from moemerge.io.zarr_reader import ZarrCheckpoint

    names = [(n, False) for n in sorted(ck.files)]
    if getattr(ck, "_bare", False):
        return names
    if isinstance(ck, DcpCheckpoint):
        return [(METADATA_NAME, False), *names]
    if isinstance(ck, ZarrCheckpoint):  # chunk objects are not listed: only the root metadata is
        return [("zarr.json", False), ("moemerge-manifest.json", False)]
    return [(INDEX_NAME, True), *names]  # a single-file checkpoint has no index


def _stamp(fs: Any, path: str) -> dict[str, Any]:
    if storage.is_local(fs):
        # ctime too: `os.utime` can put mtime back after an in-place rewrite, nothing puts ctime back
        st = os.stat(path)
        # a Hub file from the hub cache: its commit too (a branch that moved is another input)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                **revision_stamp(fs, path)}
    pinned = revision_stamp(fs, path)  # a Hub file at a commit: immutable, its listing stays true
    if not pinned:
        fs.invalidate_cache(path)  # s3fs answers `info` from its listings cache: ask the store itself
    info = fs.info(path)
    return {"size": info.get("size"), **{k: str(info[k]) for k in _STAMP_KEYS if info.get(k) is not None},
            **pinned}


def input_identity(ckpts: list[Checkpoint]) -> dict[str, dict[str, Any]]:
    """`{file url: {size, mtime/ETag..., header sha256}}` for every file of every input.

    Example: `{"/m/model.safetensors": {"size": 98, "mtime_ns": ..., "ctime_ns": ..., "header": "ab12..."}}`
    """
    jobs: list[tuple[str, Any, str, str | None, bool]] = []
    for ck in ckpts:
        inner = unwrap(ck)  # a dequantizing view: the files of the checkpoint it wraps
        headers = inner.header_digests
        for name, optional in _files(inner):
            path = storage.join(inner.root, name) if inner.root else name
            shown = inner.url if getattr(inner, "_bare", False) else f"{inner.url.rstrip('/')}/{name}"
            jobs.append((shown, inner.fs, path, headers.get(name), optional))
        view: Any = ck
        while view is not inner:  # views that read files of their own (a LoRA adapter, io.lora)
            extra = getattr(view, "identity_files", None)
            jobs.extend((shown, fs, path, header, False) for shown, fs, path, header in (extra() if extra else ()))
            view = view.inner

    def one(job: tuple[str, Any, str, str | None, bool]) -> tuple[str, dict[str, Any] | None]:
        shown, fs, path, header, optional = job
        try:
            stamp = storage.with_retries(
                lambda: _stamp(fs, path), what="look up its size and stamps", url=shown,
                not_found=lambda e: _Absent() if optional else CheckpointError(
                    f"{shown}: disappeared while the run was starting"))
        except _Absent:
            return shown, None
        return shown, {**stamp, **({"header": header} if header else {})}

    if all(storage.is_local(j[1]) for j in jobs) or len(jobs) <= 1:
        got = list(map(one, jobs))
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:  # remote: round trips side by side
            got = list(pool.map(one, jobs))
    return {shown: stamp for shown, stamp in got if stamp is not None}


def changed_input(then: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> str | None:
    """A one-line account of the first input file that differs between two identities, or None."""
    for name in sorted(set(then) | set(now)):
        a, b = then.get(name), now.get(name)
        if a == b:
            continue
        if a is None:
            return f"{name}: is an input file now but was not when the interrupted run started"
        if b is None:
            return f"{name}: was an input file of the interrupted run and is not now"
        keys = [k.removesuffix("_ns") for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return f"{name}: changed since the interrupted run ({', '.join(keys)} {'differs' if len(keys) == 1 else 'differ'})"
    return None
