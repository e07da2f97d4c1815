"""Write a sharded safetensors model directory whose layout was fixed by the plan.

Commit protocol (DESIGN promise 5): shards are pre-laid out (header written, file sized) and
filled by byte-range writes; side files come next; the index and then the manifest are
written last, each by write-to-temp + rename. Until the manifest exists the directory carries
an `.moemerge-incomplete` marker and no index, so nothing loads it as a finished model.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import threading
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from moemerge.errors import OutputError
from moemerge.io import direct, storage
from moemerge.io.checkpoint import INDEX_NAME
from moemerge.io.manifest import MANIFEST_NAME, MARKER_NAME, Manifest
from moemerge.io.safetensors_format import ShardLayout
from moemerge.io.sidefiles import MODEL_FILES, is_tokenizer_file

__all__ = [
    "MANIFEST_NAME", "MARKER_NAME", "CONFIG_COPY_NAME", "CARD_NAME", "MERGEKIT_CONFIG_NAME", "OWN_SIDE_FILES",
    "TensorPlacement", "ModelWriter",
    "SupportsFlush", "SupportsReadBack", "SupportsAdopt", "SupportsComplete", "LocalModelWriter",
    "check_output", "as_manifest", "atomic_write", "close_fds", "flush_fds", "open_laid_out",
]

CONFIG_COPY_NAME = "moemerge-config.yml"
#: The model card (`moemerge.modelcard`): Hugging Face reads its front matter as metadata.
CARD_NAME = "README.md"
#: MergeKit's name for the config copy, written with the card.
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"
#: Side files moemerge itself writes at commit; a new run drops old ones first, so an output
#: written with `--no-write-model-card` never keeps an earlier run's card.
OWN_SIDE_FILES = (CONFIG_COPY_NAME, CARD_NAME, MERGEKIT_CONFIG_NAME)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorPlacement:
    """Where an output tensor goes: its shard file and absolute byte offset, dtype and shape."""

    name: str
    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    row_bytes: int
    """Bytes per row of the row-chunking view (see io.checkpoint.row_geometry)."""

    @property
    def nbytes(self) -> int:
        from moemerge.io.dtypes import itemsize

        return math.prod(self.shape) * itemsize(self.dtype)


class ModelWriter(Protocol):
    """An output being written: lay out, take rows in any order, then commit or abandon.

    `write_rows` may be called from any thread, for any tensor and row range, once per range.
    `finish` writes the side files, then the index, then the manifest (the commit). `close`
    without `finish` abandons the output: it must never look finished. `target` is where the
    output is being built (a sibling of the final location while overwriting, io.swap);
    `describe()` says what the location holds now (for a message after a failure).

    Optional powers are the `Supports*` protocols below (check with `isinstance`).
    """

    target: str

    def prepare(self) -> None: ...

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None: ...

    def finish(self, *, side_files: dict[str, bytes], index: dict[str, Any],
               manifest: Manifest | dict[str, Any]) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


@runtime_checkable
class SupportsFlush(Protocol):
    """Puts what it wrote on disk now (before a journal entry, or before another process
    commits what a Dask worker wrote)."""

    def flush(self) -> None: ...


@runtime_checkable
class SupportsReadBack(Protocol):
    """Reads back the bytes written for a tensor, in order, a bounded block at a time."""

    def read_back(self, name: str) -> Iterator[memoryview]: ...


@runtime_checkable
class SupportsAdopt(Protocol):
    """Takes shards other processes wrote and completed (Dask workers) as part of the output."""

    def adopt(self, files: list[str]) -> None: ...


@runtime_checkable
class SupportsComplete(Protocol):
    """Checks that one shard was written whole and makes it visible (a streamed shard)."""

    def complete(self, file: str) -> None: ...


def as_manifest(manifest: Manifest | dict[str, Any]) -> Manifest:
    """`manifest` as a Manifest; `finish` also takes the JSON object itself, as a dict (the
    conformance tests commit one), checked like one read from disk."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, where=MANIFEST_NAME)


def check_output(url: str, *, overwrite: bool, inputs: Sequence[str] = (),
                 storage_options: dict[str, Any] | None = None) -> str:
    """Check before any work that `url` can take the output; return its path (local: absolute).

    Refuses: a file, a finished output (unless `overwrite`), a non-empty directory that is not
    a moemerge output, an input location, and a place with no writable parent. Remote: a
    missing bucket, denied access, an object where the prefix should be, a finished output.
    """
    try:
        fs, path = storage.resolve(url, storage_options)
    except Exception as e:  # bad protocol, missing driver, bad options
        raise OutputError(storage.redact(f"{url}: cannot use this output location ({e})", storage_options)) from e
    if not storage.is_local(fs):
        return _check_remote_output(url, fs, path, overwrite=overwrite, inputs=inputs,
                                    storage_options=storage_options)
    path = os.path.abspath(path)
    for src in inputs:
        sfs, spath = storage.resolve(src)
        # a symlink (or bind mount) to an input is that input: compare real paths and inodes
        if storage.is_local(sfs) and (
            os.path.realpath(spath) == os.path.realpath(path)
            or (os.path.exists(spath) and os.path.exists(path) and os.path.samefile(spath, path))
        ):
            raise OutputError(f"{url}: the output directory is also an input; choose another output")
    if os.path.isfile(path):
        raise OutputError(f"{url}: is a file; the output must be a directory (new or empty)")
    if os.path.isdir(path):
        entries = set(os.listdir(path))
        if MANIFEST_NAME in entries and not overwrite:
            raise OutputError(
                f"{url}: already holds a finished merge ({MANIFEST_NAME}); pass --overwrite to "
                "replace it or choose another directory"
            )
        if entries and MANIFEST_NAME not in entries and MARKER_NAME not in entries:
            raise OutputError(
                f"{url}: directory is not empty and is not a moemerge output; choose a new or "
                "empty directory"
            )
        if not os.access(path, os.W_OK):
            raise OutputError(f"{url}: directory is not writable (check permissions)")
        return path
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent or "."):
        raise OutputError(f"{url}: {parent} is a file, so the output directory cannot be created")
    if not os.access(parent or ".", os.W_OK):
        raise OutputError(f"{url}: cannot create the directory here ({parent} is not writable)")
    return path


def _check_remote_output(url: str, fs: Any, path: str, *, overwrite: bool, inputs: Sequence[str],
                         storage_options: dict[str, Any] | None) -> str:
    root = path.rstrip("/")
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    for src in inputs:
        try:
            sfs, spath = storage.resolve(src, storage_options)
        except Exception:
            continue  # reported by the input checks
        sproto = sfs.protocol if isinstance(sfs.protocol, str) else sfs.protocol[0]
        if sproto == proto and spath.rstrip("/") == root:
            raise OutputError(f"{url}: the output location is also an input; choose another output")

    def check(call: Any, what: str) -> Any:
        return storage.with_retries(call, what=what, url=url, error=OutputError)

    if proto == "s3" and hasattr(fs, "call_s3"):
        bucket = root.split("/", 1)[0]
        try:
            check(lambda: fs.call_s3("head_bucket", Bucket=bucket), f"reach bucket {bucket!r}")
        except OutputError as e:
            cause = e.__cause__
            if isinstance(cause, FileNotFoundError):
                raise OutputError(f"{url}: bucket s3://{bucket} does not exist; create it first or "
                                  "choose another bucket") from cause
            if isinstance(cause, PermissionError):
                raise OutputError(
                    f"{url}: access to bucket s3://{bucket} was denied; check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage_options) and "
                    "the bucket's permissions") from cause
            raise
    if root and check(lambda: fs.isfile(root), "check the output location"):
        raise OutputError(f"{url}: is an object (a file); the output must be a prefix (directory)")
    def listing() -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        except FileNotFoundError:
            return []

    entries = set(check(listing, "list the output location")) if root else set()
    if MANIFEST_NAME in entries and not overwrite:
        raise OutputError(
            f"{url}: already holds a finished merge ({MANIFEST_NAME}); pass --overwrite to "
            "replace it or choose another location"
        )
    if MANIFEST_NAME not in entries and MARKER_NAME not in entries and (
            INDEX_NAME in entries or any(e.endswith(".safetensors") for e in entries)):
        raise OutputError(
            f"{url}: holds a model that is not a moemerge output; choose a new or empty location"
        )
    return root


_SYNC_FILE_RANGE = direct.linux_libc("sync_file_range", ctypes.c_int,
                                     (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these bytes to disk now, without waiting (Linux `sync_file_range`).

    Dirty pages otherwise pile up until the kernel throttles every writer at once and the
    final fsync flushes gigabytes; starting writeback per chunk keeps the disk busy from the
    first chunk on. A hint only: failures are ignored (fsync at the end is the guarantee).
    """
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def open_laid_out(fds: dict[str, int], lock: threading.Lock, directory: str, file: str, *, url: str,
                  what: str) -> int:
    """The cached descriptor of `file`, a file laid out by `prepare` (perhaps by another process:
    a Dask worker opens what the client laid out), opened once for positional writes."""
    fd = fds.get(file)
    if fd is None:
        with lock:
            fd = fds.get(file)
            if fd is None:
                try:
                    fd = fds[file] = os.open(os.path.join(directory, file), os.O_RDWR)
                except OSError as e:
                    raise OutputError(
                        f"{url}/{file}: cannot open the laid-out {what} ({e.strerror}); every "
                        "worker must see the output directory (a shared filesystem)") from e
    return fd


def flush_fds(fds: dict[str, int], *, url: str, what: str) -> None:
    """fsync every open file of a writer; a failure names the file (usually a full disk)."""
    for file, fd in list(fds.items()):
        try:
            os.fsync(fd)
        except OSError as e:
            raise OutputError(f"{url}/{file}: cannot flush the {what} ({e.strerror}); is the disk full?") from e


def close_fds(fds: dict[str, int], lock: threading.Lock) -> None:
    """Close a writer's open shard files (errors ignored: closing follows a flush or a failure)."""
    with lock:
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()


def atomic_write(path: str, data: bytes) -> None:
    """Write `path` so that a reader sees the old bytes or the new ones, never a mix.

    The directory is synced after the rename so that the switch survives a power cut too.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalModelWriter:
    """Shard files on a local (or shared) filesystem, filled by `write_rows(name, row_start, data)`.

    Thread-safe: writes are positional (`pwrite`), so units may finish in any order.
    """

    def __init__(self, url: str, shards: tuple[ShardLayout, ...], placements: dict[str, TensorPlacement],
                 *, overwrite: bool) -> None:
        self.url = url
        if not storage.is_local(storage.resolve(url)[0]):
            # check_output accepts remote URLs now; this writer would create a local "bucket/key"
            raise OutputError(f"{url}: not a local path; remote outputs take RemoteModelWriter "
                              "(moemerge.io.output.open_writer picks the writer)")
        from moemerge.io import swap

        path = os.path.abspath(storage.resolve(url)[1])
        if not os.path.isfile(path):
            swap.recover(path)  # a crash mid-swap left siblings: one finished output at `path` first
        self.final = check_output(url, overwrite=overwrite)
        # overwriting a finished output: build beside it, swap in at commit (io.swap)
        self.path = swap.target_for(self.final, overwrite=overwrite)
        self.target = self.path
        self.swapped = False
        self.shards = shards
        self.placements = placements
        self._fds: dict[str, int] = {}
        self._dfds: dict[str, int] = {}  # O_DIRECT descriptors for large writes (io.direct)
        self._no_direct = not direct.enabled()
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, url: str, shards: tuple[ShardLayout, ...], placements: dict[str, TensorPlacement]) -> LocalModelWriter:
        """A writer into shards another process laid out (`prepare`d): for Dask workers.

        It only writes rows (and reads them back); the process that prepared the output
        finishes it.
        """
        self = cls.__new__(cls)
        self.url = url
        self.path = self.final = self.target = os.path.abspath(storage.resolve(url)[1])
        self.swapped = False
        self.shards = shards
        self.placements = placements
        self._fds = {}
        self._dfds = {}
        self._no_direct = not direct.enabled()
        self._lock = threading.Lock()
        return self

    def __repr__(self) -> str:
        return f"LocalModelWriter({self.url!r}, shards={len(self.shards)})"

    def _fd(self, file: str) -> int:
        return open_laid_out(self._fds, self._lock, self.path, file, url=self.url, what="shard")

    def flush(self) -> None:
        """Put what this writer wrote on disk (a worker's part, before another process commits)."""
        flush_fds(self._fds, url=self.url, what="shard")

    def read_back(self, name: str, block: int = 64 << 20) -> Iterator[memoryview]:
        """The bytes written for tensor `name`, in order, `block` bytes at a time."""
        p = self.placements[name]
        fd = self._fd(p.file)
        total = p.nbytes
        buf = bytearray(min(block, max(1, total)))
        pos = 0
        while pos < total:
            n = os.preadv(fd, [memoryview(buf)[:min(block, total - pos)]], p.offset + pos)
            if n <= 0:
                raise OutputError(f"{self.url}/{p.file}: tensor `{name}` ends early when read back")
            yield memoryview(buf)[:n]
            pos += n

    def prepare(self) -> None:
        """Mark the directory incomplete, drop any old commit files, lay out every shard."""
        try:
            os.makedirs(self.path, exist_ok=True)
            open(os.path.join(self.path, MARKER_NAME), "w").close()
            # an old finished output stops looking finished before anything else changes
            for name in (MANIFEST_NAME, INDEX_NAME):
                p = os.path.join(self.path, name)
                if os.path.exists(p):
                    os.remove(p)
            # what an earlier run wrote must not outlive it: stale shards, and side files the
            # new inputs may not have (an old tokenizer would silently pass for the new one's)
            keep = {s.file for s in self.shards}
            for name in os.listdir(self.path):
                stale_shard = name.endswith(".safetensors") and name not in keep
                side = name in MODEL_FILES or name in OWN_SIDE_FILES or is_tokenizer_file(name)
                if (stale_shard or side) and os.path.isfile(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
            for s in self.shards:
                fd = os.open(os.path.join(self.path, s.file), os.O_RDWR | os.O_CREAT, 0o644)
                os.ftruncate(fd, s.size)
                self._fds[s.file] = fd
                self._pwrite(fd, memoryview(s.header), 0, s.file)
        except OSError as e:
            self.close()
            raise OutputError(f"{self.url}: cannot lay out the output ({e.strerror or e}); check space and permissions") from e

    def _pwrite(self, fd: int, data: memoryview, offset: int, name: str) -> None:
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(fd, data[done:], offset + done)
            except OSError as e:
                raise OutputError(f"{self.url}/{name}: write failed at byte {offset + done} ({e.strerror}); is the disk full?") from e
            done += n

    def _direct_fd(self, file: str) -> int | None:
        """`file`'s O_DIRECT descriptor (io.direct), or None where direct writes are off."""
        if self._no_direct:
            return None
        dfd = self._dfds.get(file)
        if dfd is None:
            with self._lock:
                dfd = self._dfds.get(file)
                if dfd is None:
                    dfd = direct.open_direct(os.path.join(self.path, file), os.O_WRONLY)
                    if dfd is None:
                        self._no_direct = True
                        return None
                    self._dfds[file] = dfd
        return dfd

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
        p = self.placements[name]
        fd = self._fd(p.file)
        offset = p.offset + row_start * p.row_bytes
        dfd = self._direct_fd(p.file) if len(data) >= direct.DIRECT_MIN else None
        if dfd is not None:
            try:
                direct.write_direct(fd, dfd, data, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise OutputError(f"{self.url}/{p.file}: write failed at bytes {offset}..{offset + len(data)} "
                                      f"({e.strerror}); is the disk full?") from e
                self._no_direct = True  # the device wants another alignment: buffered from now on
        self._pwrite(fd, data, offset, p.file)
        start_writeback(fd, offset, len(data))

    def finish(self, *, side_files: dict[str, bytes], index: dict[str, Any],
               manifest: Manifest | dict[str, Any]) -> None:
        """Flush shards, write side files, then the index, then the manifest (the commit)."""
        manifest = as_manifest(manifest)
        try:
            for fd in self._fds.values():
                os.fsync(fd)
            self.close()
            for name, data in side_files.items():
                atomic_write(os.path.join(self.path, name), data)
            atomic_write(os.path.join(self.path, INDEX_NAME), json.dumps(index, indent=2).encode())
            atomic_write(os.path.join(self.path, MANIFEST_NAME), manifest.to_json())
            os.remove(os.path.join(self.path, MARKER_NAME))
            if self.path != self.final:
                from moemerge.io import swap
                from moemerge.io.journal import JOURNAL_NAME

                # committed: nothing left to resume (the journal's path would not follow the swap)
                if os.path.exists(os.path.join(self.path, JOURNAL_NAME)):
                    os.remove(os.path.join(self.path, JOURNAL_NAME))
                swap.commit(self.path, self.final)
                self.swapped = True
        except OSError as e:
            raise OutputError(f"{self.url}: cannot finish the output ({e.strerror or e})") from e

    def describe(self) -> str:
        """What is on disk now, for a message after an interruption or failure."""
        from moemerge.io import swap

        return swap.describe(self.final, self.path, swapped=self.swapped, resumable=True)

    def close(self) -> None:
        close_fds(self._dfds, self._lock)
        close_fds(self._fds, self._lock)
