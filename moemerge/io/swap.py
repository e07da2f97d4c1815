"""`--overwrite` that never loses the old output: the new one is built beside it and swapped in.

Local (a directory OUT holding a finished output): the new output is written into the sibling
`<parent>/<basename>.moemerge-new`; at commit, after its manifest is written, it is exchanged
with OUT in one step (Linux `renameat2(RENAME_EXCHANGE)`), or, where that is not available,
OUT is renamed to `<basename>.moemerge-old` and the new one to OUT. The old output is then
renamed to `.moemerge-old` and deleted. A crash at any point leaves the old finished output at
OUT or the new finished one; `recover` (run by the next writer of OUT) tidies what is left.

Object storage has no rename: the new output is built under the prefix `OUT.moemerge-new/`;
at commit OUT's manifest and index are deleted first (OUT stops looking finished), the new
objects are copied over server-side, the index and manifest last, then the sibling prefix is
deleted. The old output survives any failure before the commit starts; a commit cut short
leaves OUT unfinished and the sibling finished, and the next run completes the commit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from typing import Any

from moemerge.errors import OutputError
from moemerge.io import storage
from moemerge.io.checkpoint import INDEX_NAME
from moemerge.io.manifest import MANIFEST_NAME, MARKER_NAME

__all__ = ["NEW_SUFFIX", "OLD_SUFFIX", "staging_path", "finished", "recover", "target_for",
           "commit", "describe", "recover_remote", "remote_target_for", "commit_remote", "unfinished", "note_state"]

NEW_SUFFIX = ".moemerge-new"
OLD_SUFFIX = ".moemerge-old"
#: The root metadata of a Zarr store: holds the consolidated metadata, written just before the
#: manifest (the Zarr counterpart of the safetensors index).
_ZARR_ROOT = "zarr.json"


def staging_path(path: str) -> str:
    """Where the new output of an overwrite of `path` is built: `/a/out` -> `/a/out.moemerge-new`."""
    return path.rstrip("/") + NEW_SUFFIX


def _trash_path(path: str) -> str:
    return path.rstrip("/") + OLD_SUFFIX


def finished(path: str) -> bool:
    """A local directory holding a committed output (its manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def _note(msg: str) -> None:
    # now, on stderr, like the lock's notes (io.lease): the run that follows may take hours
    print(f"moemerge: note: {msg}", file=sys.stderr)


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap the names `a` and `b` in one atomic step; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel, or a filesystem without RENAME_EXCHANGE (some network ones)
    raise OSError(err, os.strerror(err), a)


def recover(path: str) -> None:
    """Tidy what an interrupted overwrite of the local output `path` left, with a note each.

    Called under the output's lock, before anything else looks at `path`. Keeps an unfinished
    new output beside a finished OUT (for `--resume --overwrite`); everything else resolves to
    one finished output at `path`, or to `path` as it was.
    """
    new, old = staging_path(path), _trash_path(path)
    if not os.path.lexists(path):
        if finished(new):  # cut between the two renames: the new output was complete
            _rename(new, path)
            _note(f"{path}: completed an overwrite that was interrupted while swapping in the new output")
        elif finished(old):
            _rename(old, path)
            _note(f"{path}: restored the previous output from {old} (an overwrite was interrupted)")
    if os.path.lexists(old):
        _rmtree(old)
        _note(f"{path}: removed {old}, the previous output left by an interrupted overwrite")
    if os.path.lexists(new) and (finished(new) or not finished(path)):
        # a finished sibling is either the old output after the exchange or a new one whose
        # swap never happened; an unfinished one means nothing without a finished OUT
        _rmtree(new)
        _note(f"{path}: removed {new}, left by an interrupted overwrite; {path} is unchanged")


def target_for(path: str, *, overwrite: bool) -> str:
    """The directory to write: `path`, or its staging sibling when overwriting a finished output
    (call `recover` first)."""
    if not (overwrite and finished(path)):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: --overwrite builds the new output beside the old one, but {parent} is "
                          "not writable; make it writable, or delete the old output and run without --overwrite")
    return staging_path(path)


def commit(staging: str, path: str) -> None:
    """Swap the finished output `staging` in at `path`, then delete the old one."""
    parent = os.path.dirname(os.path.abspath(path))
    old = _trash_path(path)
    if os.path.lexists(old):
        _rmtree(old)
    if _exchange(staging, path):
        _fsync_dir(parent)
        _rename(staging, old)  # the old output, now under the staging name
    else:
        _rename(path, old)
        # a crash here leaves no `path`: `recover` finishes the swap from the finished staging
        _rename(staging, path)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def describe(path: str, target: str, *, swapped: bool, resumable: bool) -> str:
    """What an interrupted writer left at `path` (writing into `target`), read from disk."""
    again = "rerun with --resume to keep its finished tensors" if resumable else "rerun"
    if target != path:
        if swapped:
            return f"{path} holds the new finished output"
        more = ("; rerun with --overwrite --resume to continue it" if resumable else "")
        return f"the previous output at {path} is untouched (the unfinished new one is in {target}{more})"
    if finished(path):
        return f"{path} holds a finished output"
    if not os.path.lexists(path):
        return f"nothing was written to {path}"
    if os.path.isfile(os.path.join(path, INDEX_NAME)) or _zarr_consolidated(path):
        return f"{path} has its index but no manifest; it is not finished; {again}"
    return f"{path} has no index or manifest; it is not finished; {again}"


def _zarr_consolidated(path: str) -> bool:
    import json

    try:
        with open(os.path.join(path, _ZARR_ROOT)) as f:
            return bool(json.load(f).get("consolidated_metadata"))
    except (OSError, ValueError, AttributeError):
        return False


def unfinished(out: str) -> bool:
    """`out` is an output some run has not finished: a marker and no manifest, a staging
    sibling, or nothing but a staging sibling beside it (local paths and fsspec URLs)."""
    try:
        fs, root = storage.resolve(out)
    except Exception:
        return False
    root = root.rstrip("/")
    try:
        if root.endswith(NEW_SUFFIX) and fs.isdir(root):
            return True
        if fs.exists(storage.join(root, MARKER_NAME)) and not fs.exists(storage.join(root, MANIFEST_NAME)):
            return True
        return not fs.exists(root) and fs.isdir(root + NEW_SUFFIX)
    except Exception:
        return False


# -- object storage ------------------------------------------------------------------------------


def _names(fs: Any, root: str) -> list[str]:
    """Every object under `root`, as paths relative to it."""
    try:
        fs.invalidate_cache(root)
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(p[len(root):].lstrip("/") for p in found if p.startswith(root + "/"))


def _remote_finished(fs: Any, root: str) -> bool:
    try:
        fs.invalidate_cache(root)
        return bool(fs.isfile(storage.join(root, MANIFEST_NAME)))
    except FileNotFoundError:
        return False


def recover_remote(fs: Any, root: str, url: str) -> bool:
    """Tidy what an interrupted overwrite of the prefix `root` left (see the module docstring);
    True when that completed a commit (`root` then holds a finished output)."""
    new = root + NEW_SUFFIX
    if not _names(fs, new):
        return False
    if _remote_finished(fs, root):
        fs.rm(new, recursive=True)
        _note(f"{url}: removed {url}{NEW_SUFFIX}/, left by an interrupted overwrite; {url} is unchanged")
    elif _remote_finished(fs, new):  # a commit was cut short: OUT is a mix, the new one complete
        commit_remote(fs, new, root)
        _note(f"{url}: completed an overwrite whose commit was interrupted")
        return True
    else:  # an unfinished new output: nothing resumes it on object storage
        fs.rm(new, recursive=True)
        _note(f"{url}: removed {url}{NEW_SUFFIX}/, the unfinished output of an interrupted overwrite")
    return False


def remote_target_for(fs: Any, root: str, url: str, *, overwrite: bool) -> str:
    """The prefix to write: `root`, or its staging sibling when overwriting a finished output
    (call `recover_remote` first)."""
    return root + NEW_SUFFIX if overwrite and _remote_finished(fs, root) else root


def _copy(fs: Any, src: str, dst: str) -> None:
    fs.copy(src, dst)  # server-side on S3 (CopyObject; multipart copy above 5 GB): no bytes pass here


def commit_remote(fs: Any, staging: str, root: str) -> None:
    """Replace the output at `root` by the finished one at `staging`, by server-side copies.

    Idempotent: a commit cut short is completed by running it again. OUT stops looking finished
    first; the old output's objects that the new one lacks are deleted before any is copied, so
    the finished result never mixes the two.
    """
    new = _names(fs, staging)
    fs.pipe_file(storage.join(root, MARKER_NAME), b"")
    for name in (MANIFEST_NAME, INDEX_NAME, _ZARR_ROOT):
        if fs.exists(storage.join(root, name)):
            fs.rm(storage.join(root, name))
    keep = set(new) | {MARKER_NAME}
    for name in _names(fs, root):
        if name not in keep:
            fs.rm(storage.join(root, name))
    last = (INDEX_NAME, _ZARR_ROOT, MANIFEST_NAME)
    order = [n for n in new if n not in last and n != MARKER_NAME] + [n for n in last if n in new]
    for name in order:
        _copy(fs, storage.join(staging, name), storage.join(root, name))
    fs.rm(storage.join(root, MARKER_NAME))
    fs.rm(storage.join(staging, MANIFEST_NAME))  # the sibling stops looking finished first
    fs.rm(staging, recursive=True)
    fs.invalidate_cache(root)


def note_state(exc: BaseException, writer: Any) -> None:
    """Attach to `exc` what `writer` left on disk (its `describe()`), for the CLI's message."""
    describe_fn = getattr(writer, "describe", None)
    if describe_fn is None:
        return
    try:
        setattr(exc, "moemerge_state", describe_fn())  # read back by the CLI with getattr
    except Exception:  # a message helper must never mask the failure being reported
        pass
