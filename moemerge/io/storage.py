"""Storage access over fsspec: resolve URLs, and read exact byte ranges into caller buffers.

Local files are read with `os.preadv` straight into the caller's buffer (no mmap: mapped
pages count as resident memory); every other fsspec filesystem reads ranges with `cat_file`.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from moemerge.errors import CheckpointError

__all__ = [
    "ByteSource",
    "resolve",
    "is_local",
    "join",
    "open_source",
    "read_bytes",
    "exists",
    "safe_relative",
]


class ByteSource(Protocol):
    """A readable object: its size, and exact reads of a byte range into a buffer."""

    name: str
    size: int

    def read_into(self, offset: int, out: memoryview) -> None: ...

    def close(self) -> None: ...


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`s3://b/k`, `file:///x`, `./x` -> (filesystem, path within it)."""
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return bool(fs.exists(path))


def safe_relative(name: str, *, where: str) -> str:
    """Reject a file name that would leave its checkpoint directory (`..`, absolute paths)."""
    norm = name.replace("\\", "/")
    parts = norm.split("/")
    if norm.startswith("/") or ".." in parts or (len(norm) > 1 and norm[1] == ":") or not norm:
        raise CheckpointError(
            f"{where}: file name {name!r} points outside the checkpoint directory "
            "(absolute or with '..'); shard names must be plain relative names"
        )
    return norm


class _LocalSource:
    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: file does not exist") from e
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from e
        self.size = os.fstat(self._fd).st_size

    def read_into(self, offset: int, out: memoryview) -> None:
        done = 0
        want = len(out)
        while done < want:
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{self.name}: file ended at byte {offset + done}, expected {offset + want} "
                    "(it shrank while being read?)"
                )
            done += n

    def close(self) -> None:
        os.close(self._fd)


class _FsspecSource:
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.name = fs.unstrip_protocol(path)
        self._fs = fs
        self._path = path
        try:
            self.size = int(fs.size(path))
        except FileNotFoundError as e:
            raise CheckpointError(f"{self.name}: object does not exist") from e

    def read_into(self, offset: int, out: memoryview) -> None:
        data = self._fs.cat_file(self._path, start=offset, end=offset + len(out))
        if len(data) != len(out):
            raise CheckpointError(
                f"{self.name}: asked for bytes {offset}..{offset + len(out)}, got {len(data)}"
            )
        out[:] = data

    def close(self) -> None:
        pass


def open_source(fs: fsspec.AbstractFileSystem, path: str) -> ByteSource:
    """Open a file for exact range reads (local: pread; otherwise: ranged requests)."""
    if is_local(fs):
        return _LocalSource(path)
    return _FsspecSource(fs, path)


def read_bytes(src: ByteSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf))
    return bytes(buf)
