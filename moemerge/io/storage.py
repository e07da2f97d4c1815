"""Storage access over fsspec: resolve URLs, and read exact byte ranges into caller buffers.

Local files are read with `os.preadv` straight into the caller's buffer (no mmap: mapped
pages count as resident memory); every other fsspec filesystem reads ranges with `cat_file`,
in pieces of at most REMOTE_PIECE bytes copied into the caller's buffer as they arrive, retrying transient failures (timeouts, dropped connections, 5xx, throttling) with bounded
exponential backoff. Error messages name the object URL, never credentials.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from moemerge.errors import CheckpointError, ConfigError, MoemergeError
from moemerge.io import direct
from moemerge.io.storage_options import check_storage_options

__all__ = [
    "ByteSource",
    "resolve",
    "is_local",
    "join",
    "open_source",
    "read_bytes",
    "REMOTE_PIECE",
    "safe_relative",
    "RetryPolicy",
    "DEFAULT_RETRY",
    "is_transient",
    "with_retries",
    "describe_error",
    "redact",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a transient storage failure is retried."""

    attempts: int = 5
    """Tries in all (the first one included); at least 1."""
    base_delay: float = 0.2
    """Seconds before the second try; each later wait doubles, capped by `max_delay`."""
    max_delay: float = 5.0
    """Longest wait between two tries, in seconds."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(
                f"RetryPolicy delays must be >= 0, got base_delay={self.base_delay}, "
                f"max_delay={self.max_delay}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))


#: Module-wide default; tests swap it for one without waits.
DEFAULT_RETRY = RetryPolicy()

# errno values of a network hiccup, not of a wrong request
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
}
# S3 / botocore error codes that mean "try again later"
_TRANSIENT_CODES = {
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestThrottled", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "PriorRequestNotComplete", "500", "502", "503", "504",
}
# exception class names of transport failures (botocore / aiohttp), matched by name so that
# neither library has to be importable
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "HTTPClientError", "ProxyConnectionError",
    "ClientConnectionError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ClientPayloadError", "ConnectionTimeoutError", "SocketTimeoutError",
}


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        st = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(st) if isinstance(st, int) else None
    st = getattr(e, "status", None)  # aiohttp.ClientResponseError
    return st if isinstance(st, int) else None


def _code(e: BaseException) -> str | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def is_transient(e: BaseException) -> bool:
    """Whether retrying the storage call that raised `e` may succeed.

    Timeouts, dropped connections, HTTP 5xx and 429 and throttling are transient; a missing
    object, a denied permission or any other client error is not. Causes are followed, as
    s3fs wraps botocore errors in builtin ones.
    """
    for x in _chain(e):
        if isinstance(x, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError, FileExistsError, MoemergeError)):
            return False
        code, status = _code(x), _status(x)
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if status is not None and 400 <= status < 500:
            return False
        if isinstance(x, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(x).__mro__):
            return True
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def describe_error(e: BaseException) -> str:
    """A one-line account of a storage failure: its kind and the server's word, if any."""
    for x in _chain(e):
        code, status = _code(x), _status(x)
        if code or status:
            tag = " ".join(t for t in (code, f"HTTP {status}" if status else None) if t)
            return f"{type(e).__name__} [{tag}]: {x}"
    text = str(e) or repr(e)
    return text if type(e).__name__ in text else f"{type(e).__name__}: {text}"


def redact(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """`text` with every secret-looking storage option and AWS / Hub secret from the environment masked."""
    secrets: set[str] = set()

    def walk(opts: Any) -> None:
        if isinstance(opts, dict):
            for k, v in opts.items():
                if isinstance(v, (dict, list)):
                    walk(v)
                elif isinstance(v, str) and len(v) >= 4 and any(
                    w in str(k).lower() for w in ("key", "secret", "token", "password", "credential")
                ):
                    secrets.add(v)
        elif isinstance(opts, list):
            for v in opts:
                walk(v)

    walk(storage_options or {})
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if len(os.environ.get(var, "")) >= 4:
            secrets.add(os.environ[var])
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def with_retries(call: Callable[[], _T], *, what: str, url: str,
                 policy: RetryPolicy | None = None,
                 not_found: Callable[[BaseException], BaseException] | None = None,
                 error: type[Exception] = CheckpointError) -> _T:
    """`call()`, retried with backoff while it fails transiently; then an `error` (a
    `CheckpointError` unless told) naming `url` and `what` was attempted ("read bytes 0..8").

    A `FileNotFoundError` becomes `not_found(e)` when given (so callers can word it).
    """
    pol = policy or DEFAULT_RETRY
    for attempt in range(1, pol.attempts + 1):
        try:
            return call()
        except (MoemergeError, TypeError, AttributeError, NameError, AssertionError):
            raise  # ours, or a bug: not a storage failure to reword
        except Exception as e:
            if isinstance(e, FileNotFoundError) and not_found is not None:
                raise not_found(e) from e
            if not is_transient(e):
                hint = ("; check the credentials (AWS_* variables, AWS_PROFILE or storage_options) "
                        "and permissions") if isinstance(e, PermissionError) else ""
                raise error(redact(f"{url}: cannot {what} ({describe_error(e)}){hint}")) from e
            if attempt == pol.attempts:
                raise error(redact(
                    f"{url}: cannot {what}: still failing after {pol.attempts} attempts "
                    f"({describe_error(e)}); the storage service is unreachable or overloaded"
                )) from e
            wait = pol.delay(attempt)
            # INFO, not WARNING: the CLI's contract is one clear message, and only on failure
            _log.info("%s: %s failed (%s); retry %d/%d in %.2fs", url, what,
                         redact(describe_error(e)), attempt, pol.attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class ByteSource(Protocol):
    """A readable object: its size, and exact reads of a byte range into a buffer."""

    name: str
    size: int

    def read_into(self, offset: int, out: memoryview) -> None: ...

    def close(self) -> None: ...


#: botocore's retries under s3fs's and ours (`with_retries`): nested three deep, an unreachable
#: endpoint took a minute to report. Options the user gives win.
_S3_BOTO_RETRIES = {"max_attempts": 2, "mode": "standard"}


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`s3://b/k`, `file:///x`, `./x` -> (filesystem, path within it).

    `hf://org/name@rev` and `model+adapter` references resolve through `io.hub` (a Hub commit
    read in place or from the hub cache; a LoRA reference's model)."""
    if str(url).startswith("hf://") or "+" in str(url):
        from moemerge.io.hub import resolve_reference

        hooked = resolve_reference(str(url), storage_options)
        if hooked is not None:
            return hooked
    check_storage_options(url, storage_options)
    options = dict(storage_options or {})
    if str(url).startswith(("s3://", "s3a://")):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(_S3_BOTO_RETRIES))
        options["config_kwargs"] = config
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **options)
    except (TypeError, ValueError) as e:  # an option the filesystem does not take, or a bad value
        if isinstance(e, MoemergeError) or not options:
            raise
        raise ConfigError(f"{redact(str(url), options)}: `storage_options` not accepted "
                          f"({redact(str(e).splitlines()[0] if str(e) else type(e).__name__, options)})") from e
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


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
        self._dfd: int | None = None  # the O_DIRECT descriptor, opened by the first large read
        self._direct = direct.enabled()
        self._lock = threading.Lock()

    def read_into(self, offset: int, out: memoryview) -> None:
        done = 0
        want = len(out)
        if want >= direct.DIRECT_MIN and self._direct:
            done = self._read_large(offset, out)
        while done < want:
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{self.name}: file ended at byte {offset + done}, expected {offset + want} "
                    "(it shrank while being read?)"
                )
            done += n

    def _read_large(self, offset: int, out: memoryview) -> int:
        """Direct reads (io.direct) unless the range is mostly cached; returns how many
        leading bytes of `out` are filled (the caller reads the rest buffered)."""
        if direct.mostly_cached(self._fd, offset, len(out)):
            return 0
        dfd = self._dfd
        if dfd is None:
            with self._lock:  # read threads share a source: one descriptor
                if self._dfd is None:
                    self._dfd = direct.open_direct(self.name, os.O_RDONLY)
                dfd = self._dfd
            if dfd is None:
                self._direct = False
                return 0
        try:
            return direct.read_direct(dfd, offset, out)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = False  # the device wants another alignment: buffered from now on
            return 0

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading [offset, offset + nbytes) into the page cache now
        (a hint: returns at once; a later `read_into` finds the bytes there or on their way)."""
        if nbytes > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self._fd)
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None


#: A remote range is fetched in pieces of at most this many bytes, each copied into the
#: caller's buffer as soon as it arrives: fsspec's `cat_file` returns a new bytes object per
#: request, so the memory a remote read takes beyond the caller's buffer is one piece per
#: reading thread, whatever the size of the range. 16 MiB keeps the per-request latency small
#: beside the transfer (S3 serves one stream at ~100 MB/s: ~160 ms per piece).
REMOTE_PIECE = 16 << 20


class _FsspecSource:
    """An object on any fsspec filesystem, read by exact ranges (in REMOTE_PIECE requests)
    with retries, each piece retried on its own."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, *, retry: RetryPolicy | None = None) -> None:
        self.name = fs.unstrip_protocol(path)
        self._fs = fs
        self._path = path
        self._retry = retry
        self.size = int(with_retries(
            lambda: fs.size(path), what="get its size", url=self.name, policy=retry,
            not_found=lambda e: CheckpointError(f"{self.name}: object does not exist"),
        ))

    def __repr__(self) -> str:
        return f"_FsspecSource({self.name!r}, size={self.size})"

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with bytes offset.. of the object, one ranged request per REMOTE_PIECE."""
        for a in range(0, len(out), REMOTE_PIECE):
            self._read_piece(offset + a, out[a:a + REMOTE_PIECE])

    def _read_piece(self, offset: int, out: memoryview) -> None:
        end = offset + len(out)
        if end == offset:  # an empty range: S3 would answer a bad Range with the whole object
            return
        data = with_retries(
            lambda: self._fs.cat_file(self._path, start=offset, end=end),
            what=f"read bytes {offset}..{end}", url=self.name, policy=self._retry,
            not_found=lambda e: CheckpointError(
                f"{self.name}: object disappeared while being read (bytes {offset}..{end})"),
        )
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
