"""One writer at a time: a lock file (local disk) or a lease object (object storage) per output
and per PMA state, taken before anything is changed and held until after the commit.

Where the lock lives (`lock_location`): beside a local output OUT, `<parent>/.<name>.moemerge-lock`
(a sibling, so it survives OUT being swapped for a rebuilt copy); `<OUT>.moemerge-lease` for a
remote output; `STATE/pma-state.lock` / `STATE/pma-state.lease` for a PMA state.

Local: the lock file appears complete (owner, host, pid, start, command) by one `link` of a
written temporary file, which fails if a lock exists: the exclusive create that other hosts on a
shared filesystem see. Its holder also keeps an `flock` on it, so on one host a dead holder is
told apart from a live one (the kernel drops the flock with the process) even after its pid was
reused. A lock whose holder is gone on this host is taken over with a note; one from another
host is only ever removed by hand.

Object storage: the lease object is created only if absent (S3 `If-None-Match: *`) and holds an
expiry that a thread of the live job renews every third of its lifetime (`If-Match` the ETag it
wrote, so a renewal never overwrites a lease someone else took). An expired lease is taken over
with a note. A job that lost its lease, or could not renew it in time, fails before its commit.
"""

from __future__ import annotations

import datetime as _dt
import errno
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from moemerge.errors import OutputError
from moemerge.io import storage

__all__ = [
    "DEFAULT_TTL", "LOCK_SUFFIX", "LEASE_SUFFIX", "STATE_LOCK", "STATE_LEASE", "Holder", "Lease",
    "lock_location", "take_lease", "hold_lease", "is_lock_name",
]

#: Seconds a remote lease lives without renewal: long enough to ride out a storage hiccup of a
#: minute or two, short enough that a crashed job's output is free again in minutes.
DEFAULT_TTL = 300.0
LOCK_SUFFIX = ".moemerge-lock"
LEASE_SUFFIX = ".moemerge-lease"
STATE_LOCK = "pma-state.lock"
STATE_LEASE = "pma-state.lease"

Kind = Literal["output", "state"]


def is_lock_name(name: str) -> bool:
    """Whether a directory entry is a lock or lease (or the temporary file of one being made)."""
    return name.startswith((STATE_LOCK, STATE_LEASE)) or LOCK_SUFFIX in name or LEASE_SUFFIX in name


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """Who holds a lock: what the lock file or lease object says."""

    owner: str
    host: str
    pid: int
    started: str
    """UTC, ISO 8601 (`2026-12-01T03:14:00Z`)."""
    what: str
    """The command, e.g. `moemerge run`."""
    token: str
    """Random id of this holding: a renewal or release touches only its own lease."""
    expires: float | None = None
    """Remote leases: UNIX time after which the lease may be taken over."""

    def describe(self) -> str:
        """'alice@node7 pid 1234 (moemerge run) since 2026-12-01T03:14:00Z'."""
        return f"{self.owner}@{self.host} pid {self.pid} ({self.what}) since {self.started}"

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"owner": self.owner, "host": self.host, "pid": self.pid,
                               "started": self.started, "command": self.what, "token": self.token}
        if self.expires is not None:
            doc["expires"] = _iso(_dt.datetime.fromtimestamp(self.expires, _dt.timezone.utc))
            doc["expires_unix"] = self.expires
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock's bytes name, or None if they are not a complete lock record."""
        try:
            doc = json.loads(raw)
            exp = doc.get("expires_unix")
            return cls(owner=str(doc["owner"]), host=str(doc["host"]), pid=int(doc["pid"]),
                       started=str(doc["started"]), what=str(doc.get("command", "moemerge")),
                       token=str(doc.get("token", "")), expires=float(exp) if exp is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _me(what: str, ttl: float | None = None) -> Holder:
    try:
        owner = getpass.getuser()
    except Exception:  # no user name in this environment (containers without passwd entries)
        owner = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return Holder(owner=owner, host=socket.gethostname(), pid=os.getpid(), started=_iso(_now()),
                  what=what, token=uuid.uuid4().hex, expires=time.time() + ttl if ttl is not None else None)


def lock_location(url: str, storage_options: dict[str, Any] | None = None, *, kind: Kind = "output") -> str:
    """Where the lock of output or state `url` lives: a local path, or a URL on its storage.

    Example:
        lock_location("/data/merged")                      -> '/data/.merged.moemerge-lock'
        lock_location("s3://b/merged")                     -> 's3://b/merged.moemerge-lease'
        lock_location("/data/state", kind="state")         -> '/data/state/pma-state.lock'
    """
    fs, path = _resolve(url, storage_options)
    if storage.is_local(fs):
        path = os.path.abspath(path)
        if kind == "state":
            return os.path.join(path, STATE_LOCK)
        parent, name = os.path.split(path)
        return os.path.join(parent, f".{name}{LOCK_SUFFIX}")
    root = path.rstrip("/")
    if kind == "state":
        where = storage.join(root, STATE_LEASE)
    elif "/" in root:
        where = root + LEASE_SUFFIX
    else:  # a whole bucket as the output: the lease goes inside it
        where = storage.join(root, LEASE_SUFFIX)
    return str(fs.unstrip_protocol(where))


def _resolve(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    try:
        return storage.resolve(url, storage_options)
    except Exception as e:  # bad protocol, missing driver, bad options
        raise OutputError(storage.redact(f"{url}: cannot use this location ({e})", storage_options)) from e


class Lease:
    """A held lock or lease. `check()` before a commit; `release()` when done (idempotent).

    Example:
        with hold_lease("s3://b/merged", kind="output", what="moemerge run") as lease:
            ... write ...
            lease.check()          # raises OutputError if the lease was lost
            ... commit ...
    """

    url: str
    location: str
    holder: Holder
    notes: list[str]

    def check(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, {self.holder.describe()})"


def _busy(url: str, kind: Kind, other: Holder | None, where: str, *, remote: bool) -> OutputError:
    what = "the PMA state " + url if kind == "state" else url
    who = other.describe() if other is not None else "another job (its lock is being written)"
    if remote:
        until = ""
        if other is not None and other.expires is not None:
            until = f" at {_iso(_dt.datetime.fromtimestamp(other.expires, _dt.timezone.utc))}"
        fix = (f"wait for it to finish; if that job is dead its lease expires{until} and the next run "
               f"takes it over (or remove the lease object {where})")
    else:
        fix = f"wait for it to finish, or if that job is dead on another host remove the lock file {where}"
    return OutputError(f"{what} is being written by {who}; {fix}")


# -- local lock file ---------------------------------------------------------------------------------

_HELD, _FREE, _NO_FLOCK = "held", "free", "unsupported"


def _try_flock(fd: int) -> str:
    try:
        import fcntl
    except ImportError:  # not POSIX
        return _NO_FLOCK
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _FREE
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _HELD
        return _NO_FLOCK


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _LocalLock(Lease):
    def __init__(self, url: str, location: str, holder: Holder, fd: int, notes: list[str]) -> None:
        self.url, self.location, self.holder, self._fd, self.notes = url, location, holder, fd, notes

    def check(self) -> None:
        if self._fd < 0 or not _same_file(self._fd, self.location):
            raise OutputError(
                f"{self.url}: this job no longer holds its lock {self.location} (removed by hand, or taken "
                "over by another job); stopped before the commit, so nothing was committed")

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            if _same_file(self._fd, self.location):  # never delete a lock another job now holds
                os.unlink(self.location)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # drops the flock after the file is gone (see _acquire_local)
            self._fd = -1


def _write_temp(location: str, holder: Holder) -> tuple[str, int]:
    """A complete lock record under a temporary name, flocked: (path, fd)."""
    tmp = f"{location}.{holder.token[:12]}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        os.write(fd, holder.to_bytes())
        os.fsync(fd)
        _try_flock(fd)  # before the record is visible under its name: no unlocked window
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return tmp, fd


def _acquire_local(url: str, location: str, kind: Kind, what: str) -> _LocalLock:
    parent = os.path.dirname(location)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{url}: cannot create {parent} for the lock file ({e.strerror or e})") from e
    for _ in range(50):
        me = _me(what)
        try:
            got = _try_place(url, location, kind, me)
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(f"{url}: cannot create the lock file {location} ({e.strerror or e}); "
                              "check permissions") from e
        if got is not None:
            fd, note = got
            return _LocalLock(url, location, me, fd, [note] if note else [])
        time.sleep(0.01)  # the lock changed hands while we looked: look again
    raise OutputError(f"{url}: the lock file {location} keeps changing; is another job starting? retry")


#: link() errors meaning "this filesystem has no hard links", not "the lock exists"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _try_place(url: str, location: str, kind: Kind, me: Holder) -> tuple[int, str] | None:
    """Put our record at `location`: (its flocked fd, a takeover note or ''), None to look again."""
    tmp, fd = _write_temp(location, me)
    placed = False
    try:
        try:
            os.link(tmp, location)  # atomic, and fails if a lock exists (also over NFS)
            placed = True
            return fd, ""
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            # no hard links here: claim the name by an exclusive create, then rename the record
            # over it (a contender meanwhile sees an empty, fresh file: "being written")
            try:
                os.close(os.open(location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                pass
            else:
                os.replace(tmp, location)
                placed = True
                return fd, ""
        note = _take_over_local(url, location, kind, tmp)
        if note is not None:
            placed = True
            return fd, note
        return None
    finally:
        if not placed:
            os.close(fd)
        try:
            os.unlink(tmp)  # the temporary name (gone already after a rename)
        except FileNotFoundError:
            pass


def _take_over_local(url: str, location: str, kind: Kind, tmp: str) -> str | None:
    """With a lock present: raise if its holder lives, take it over (return the note) if its
    holder is gone on this host, None if it vanished or changed meanwhile (look again)."""
    try:
        fd = os.open(location, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        raw = os.read(fd, 1 << 16)
        other = Holder.parse(raw)
        lock = _try_flock(fd)
        if not _same_file(fd, location):
            return None
        if other is None:
            age = time.time() - os.fstat(fd).st_mtime
            if lock == _HELD or age < 10:  # a job between its exclusive create and its record
                raise _busy(url, kind, None, location, remote=False)
            gone = f"an unreadable lock file {age:.0f} s old"
        elif other.host != socket.gethostname():
            raise _busy(url, kind, other, location, remote=False)
        elif lock == _HELD or (lock == _NO_FLOCK and _pid_alive(other.pid)):
            raise _busy(url, kind, other, location, remote=False)
        else:  # the kernel dropped its flock (or, without flock, its pid is gone): it died
            gone = f"{other.describe()}, which is no longer running"
        # we hold the old file's flock, so no other contender can replace it while we do
        os.replace(tmp, location)
        return f"took over the lock of {url} ({location}) from {gone} (killed or crashed)"
    finally:
        os.close(fd)


# -- remote lease object -----------------------------------------------------------------------------

def _precondition_failed(e: BaseException) -> bool:
    for x in storage._chain(e):
        if storage._status(x) == 412 or storage._code(x) in ("PreconditionFailed", "ConditionalRequestConflict"):
            return True
        if "pre-condition" in str(x).lower() or "precondition" in str(x).lower():
            return True
    return False


class _RemoteLease(Lease):
    def __init__(self, url: str, location: str, fs: Any, path: str, holder: Holder, etag: str | None,
                 ttl: float, notes: list[str]) -> None:
        self.url, self.location, self.holder, self.notes = url, location, holder, notes
        self._fs, self._path, self._etag, self._ttl = fs, path, etag, ttl
        self._s3 = _is_s3(fs)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._renew_loop, name="moemerge-lease", daemon=True)
        self._thread.start()

    # the holder's expiry moves on with each renewal
    def _renew_once(self) -> None:
        new = Holder(owner=self.holder.owner, host=self.holder.host, pid=self.holder.pid,
                     started=self.holder.started, what=self.holder.what, token=self.holder.token,
                     expires=time.time() + self._ttl)
        data = new.to_bytes()
        if self._s3 and self._etag:
            res = self._fs.pipe_file(self._path, data, IfMatch=self._etag)
            etag = res.get("ETag") if isinstance(res, dict) else None
        else:  # no conditional write here: compare, then write (a small window; S3 has none)
            cur = Holder.parse(self._fs.cat_file(self._path))
            if cur is None or cur.token != self.holder.token:
                raise _Lost("another job took the lease over")
            self._fs.pipe_file(self._path, data)
            etag = None
        with self._mutex:
            self.holder, self._etag = new, etag or self._etag

    def _renew_loop(self) -> None:
        every = max(0.05, self._ttl / 3)
        while not self._stop.wait(every):
            try:
                self._renew_once()
            except _Lost as e:
                self._lost = str(e)
                return
            except Exception as e:
                if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                    self._lost = "another job took the lease over (or it was removed)"
                    return
                if self.holder.expires is not None and time.time() >= self.holder.expires:
                    self._lost = f"it could not be renewed before it expired ({storage.describe_error(e)})"
                    return
                # transient: try again at the next tick, while the lease is still ours

    def check(self) -> None:
        problem = self._lost
        if problem is None and self.holder.expires is not None and time.time() >= self.holder.expires:
            problem = "it expired before it could be renewed"
        if problem is None:
            try:
                self._fs.invalidate_cache(self._path)
                cur = Holder.parse(self._fs.cat_file(self._path))
            except FileNotFoundError:
                cur = None
            except Exception as e:
                problem = f"it cannot be read back ({storage.describe_error(e)})"
                cur = self.holder
            if problem is None and (cur is None or cur.token != self.holder.token):
                problem = "another job took it over (or it was removed)"
        if problem is not None:
            raise OutputError(
                f"{self.url}: this job lost its lease {self.location}: {problem}; stopped before the "
                "commit, so nothing was committed; rerun when no other job writes here")

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        if self._lost is not None:
            return
        try:
            self._fs.invalidate_cache(self._path)
            cur = Holder.parse(self._fs.cat_file(self._path))
            if cur is None or cur.token != self.holder.token:
                return  # not ours any more: leave it
            if self._s3 and self._etag:
                bucket, _, key = self._path.partition("/")
                self._fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
            else:
                self._fs.rm_file(self._path)
            self._fs.invalidate_cache(self._path)
        except Exception:  # it expires by itself; never fail a finished job over it
            pass


class _Lost(Exception):
    pass


def _is_s3(fs: Any) -> bool:
    protos = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protos and hasattr(fs, "call_s3")


def _acquire_remote(url: str, fs: Any, path: str, location: str, kind: Kind, what: str, ttl: float) -> _RemoteLease:
    s3 = _is_s3(fs)

    def call(fn: Any, doing: str) -> Any:
        return storage.with_retries(fn, what=doing, url=location, error=OutputError)

    for _ in range(20):
        me = _me(what, ttl)
        try:
            res = call(lambda: fs.pipe_file(path, me.to_bytes(), mode="create"), "create the lease object")
            etag = res.get("ETag") if isinstance(res, dict) else None
            return _RemoteLease(url, location, fs, path, me, etag, ttl, [])
        except OutputError as e:
            if not (isinstance(e.__cause__, FileExistsError) or _precondition_failed(e)):
                raise
        fs.invalidate_cache(path)
        try:
            etag = call(lambda: fs.info(path).get("ETag"), "look up the lease") if s3 else None
            raw = call(lambda: fs.cat_file(path), "read the lease")
        except OutputError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                continue  # released meanwhile
            raise
        other = Holder.parse(raw)
        if other is not None and other.token == me.token:  # a retried create whose first try went through
            return _RemoteLease(url, location, fs, path, me, etag, ttl, [])
        if other is not None and (other.expires is None or time.time() < other.expires):
            raise _busy(url, kind, other, location, remote=True)
        note = (f"took over the expired lease of {url} ({location}) from "
                f"{other.describe() if other else 'an unreadable lease'} (not renewed: killed or crashed)")
        me = _me(what, ttl)
        try:
            if s3 and etag:  # only if nobody renewed or took it since we read it
                res = fs.pipe_file(path, me.to_bytes(), IfMatch=etag)
                new_etag = res.get("ETag") if isinstance(res, dict) else None
            else:
                fs.rm_file(path)
                res = fs.pipe_file(path, me.to_bytes(), mode="create")
                new_etag = res.get("ETag") if isinstance(res, dict) else None
        except Exception as e:
            if isinstance(e, (FileExistsError, FileNotFoundError)) or _precondition_failed(e):
                continue  # another job got there first: look again
            raise OutputError(storage.redact(
                f"{url}: cannot take over the lease object {location} ({storage.describe_error(e)})")) from e
        return _RemoteLease(url, location, fs, path, me, new_etag, ttl, [note])
    raise OutputError(f"{url}: the lease object {location} keeps changing; is another job starting? retry")


# -- the entry points --------------------------------------------------------------------------------

def take_lease(url: str, storage_options: dict[str, Any] | None = None, *, kind: Kind = "output",
               what: str = "moemerge", ttl: float | None = None) -> Lease:
    """Take the lock of output or PMA state `url`, or raise OutputError naming its holder.

    Changes nothing but the lock itself. A takeover of a dead holder's lock is printed as a
    note (and kept in `Lease.notes`). Pair with `release()`, or use `hold_lease`.
    """
    fs, path = _resolve(url, storage_options)
    location = lock_location(url, storage_options, kind=kind)
    if storage.is_local(fs):
        lease: Lease = _acquire_local(url, location, kind, what)
    else:
        lease = _acquire_remote(url, fs, fs._strip_protocol(location), location, kind, what,
                                DEFAULT_TTL if ttl is None else ttl)
    for n in lease.notes:  # now, not at the end: the job may run for hours
        print(f"moemerge: note: {n}", file=sys.stderr)
    return lease


@contextmanager
def hold_lease(url: str, storage_options: dict[str, Any] | None = None, *, kind: Kind = "output",
               what: str = "moemerge", ttl: float | None = None) -> Iterator[Lease]:
    """`take_lease` for the `with` block; released on any exit (errors, KeyboardInterrupt)."""
    lease = take_lease(url, storage_options, kind=kind, what=what, ttl=ttl)
    try:
        yield lease
    finally:
        lease.release()
