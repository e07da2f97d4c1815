"""The incremental PMA state: fp64 running sums in versioned Zarr groups behind a pointer.

Layout of a state at STATE (a local path or any fsspec URL, e.g. s3://bucket/pma/state):

    STATE/pma-state.json     the pointer: {"format": 2, "version": 17, "path": "v000017-3fa9c2d1"}
    STATE/v000017-3fa9c2d1/  one version (the number, then a random tag: no two jobs ever pick the
                             same name; plain `v000017` from older moemerge is read as well): a
                             Zarr v3 group written by io.zarr_writer, one
                             float64 array per tensor and running quantity (`S:<tensor>` the
                             window sum, `W:<tensor>` the weighted sum, `E:<tensor>` the EMA),
                             each flattened to (rows, row_len) and chunked along rows; its
                             `moemerge-manifest.json` (written last) holds the StateMeta and
                             `chunk_checksums` (crc32 of every stored chunk): a read of a missing
                             or altered chunk fails (io.zarr_store), never reads as zeros.
                             Format 2 stores the sums with the lossless `moemerge.f64split`
                             codec (pma.state_codec); format 1 (older moemerge) with blosc-lz4.

An update writes the next version beside the current one, and only when that version is
complete (its manifest written) replaces the pointer: one atomic rename on local disk, one PUT
on object storage (which has no rename, but shows a whole object or none). The pointer is
replaced only if it still names the version the update started from (compare-and-swap: re-read
under the state's lock on local disk, a PUT with If-Match the ETag read at the start on S3).
The old version is deleted after. A reader always follows the pointer, so a crash at any moment
leaves the previous state valid; versions the pointer does not name are leftovers of a crash,
deleted by the next update while it holds the state's lock (io.lease: one updater at a time).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from moemerge.errors import CheckpointError, ConfigError, OutputError
from moemerge.io import storage
from moemerge.io.checkpoint import Checkpoint
from moemerge.io.lease import is_lock_name
from moemerge.io.manifest import MANIFEST_NAME, Manifest
from moemerge.io.writer import atomic_write
from moemerge.io.zarr_writer import ZarrArraySpec, ZarrModelWriter
from moemerge.names import DcpNames, parse_dcp_names
from moemerge.settings import VERSION

__all__ = [
    "POINTER_NAME", "STATE_FORMAT", "READ_FORMATS", "METHOD_ARRAYS", "StateSettings", "StateMeta", "StateStore",
    "StateVersion", "array_name", "new_meta",
]

POINTER_NAME = "pma-state.json"
STATE_FORMAT = 2
#: Formats this moemerge reads: 1 (sums blosc-lz4-compressed) and 2 (pma.state_codec); the
#: arithmetic and the values are the same, only the stored bytes differ.
READ_FORMATS = (1, 2)
#: Running quantities per method (methods.md "incremental forms"): SMA keeps the window sum S;
#: WMA keeps S and W = sum(i * M_i), i = 1 for the oldest; EMA keeps its value E; Megatron's
#: `linear` is a uniform average (S, as SMA); `minus-sqrt` keeps its last average A, recomputed
#: from the window by every update (pma.decide.RECOMPUTED).
METHOD_ARRAYS: dict[str, tuple[str, ...]] = {"sma": ("S",), "wma": ("S", "W"), "ema": ("E",),
                                             "linear": ("S",), "minus-sqrt": ("A",)}
#: `v000017-3fa9c2d1` (a random tag since the versions got unique names) or plain `v000017`
_VERSION_DIR = re.compile(r"^v(\d{6,})(?:-[0-9a-f]{8,})?$")


def array_name(kind: str, tensor: str) -> str:
    """The state array holding quantity `kind` of `tensor`: array_name('S', 'a.w') == 'S:a.w'."""
    return f"{kind}:{tensor}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StateSettings:
    """What a state averages; recorded by the first update, every later one must match."""

    method: str
    """The schedule: `sma`, `wma`, `ema`, `linear` or `minus-sqrt`."""
    last: int | None
    """Window size N (SMA/WMA); for EMA the size of the first window (None: every snapshot)."""
    alpha: float | None
    """EMA weight of the newest snapshot; None for SMA/WMA."""
    interval_steps: int | None
    """Least step distance between two snapshots taken in; None: every snapshot."""
    dcp: DcpNames | None = None
    """How DCP snapshots' keys become tensor names (`--dcp-prefix`, `--rename`); None: the default."""

    def describe(self) -> str:
        """The settings as the flags that give them: '--method ema --alpha 0.2 --last 5'
        (`--method` is `--schedule`'s other name)."""
        parts = [f"--method {self.method}"]
        if self.alpha is not None:
            parts.append(f"--alpha {self.alpha:g}")
        parts.append(f"--last {self.last}" if self.last is not None else "(no --last)")
        if self.interval_steps is not None:
            parts.append(f"--interval-steps {self.interval_steps}")
        if self.dcp is not None:
            if self.dcp.prefix is not None:
                parts.append(f"--dcp-prefix {self.dcp.prefix!r}")
            parts.extend(f"--rename {old}={new}" for old, new in self.dcp.rename)
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "last": self.last, "alpha": self.alpha,
                "interval_steps": self.interval_steps,
                **({"dcp": {"prefix": self.dcp.prefix, "rename": [list(p) for p in self.dcp.rename]}}
                   if self.dcp is not None else {})}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StateSettings:
        return cls(method=str(doc["method"]), last=doc.get("last"), alpha=doc.get("alpha"),
                   interval_steps=doc.get("interval_steps"),
                   dcp=parse_dcp_names(doc["dcp"], where="state dcp") if doc.get("dcp") is not None else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class StateMeta:
    """Everything about one state version except the sums themselves."""

    settings: StateSettings
    steps: tuple[tuple[int, str], ...]
    """(step, location) of the snapshots in the sums, oldest first: the window (SMA/WMA) or
    every snapshot since the state began (EMA)."""
    skipped: tuple[int, ...] = ()
    """Steps seen but passed over by the interval rule (so a late arrival can be told apart)."""
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Float tensor name -> {"shape": [...], "dtype": "BF16"} (dtype of the newest snapshot)."""
    version: int = 0
    state_id: str = ""
    """Random id of this version's contents: an output records it to tell it is up to date."""
    updates_since_recompute: int = 0
    """Incremental updates applied since the sums were last computed exactly from scratch."""
    ops_since_recompute: int = 0
    """fp64 additions/subtractions per element since then (drift bound, README)."""
    created: str = ""

    @property
    def last_step(self) -> int:
        return self.steps[-1][0]

    @property
    def filling(self) -> bool:
        """The window holds fewer snapshots than --last (SMA/WMA/linear/minus-sqrt): new ones
        enter without an old one leaving until it is full."""
        last = self.settings.last
        return self.settings.method != "ema" and last is not None and len(self.steps) < last

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "moemerge_version": VERSION, "created": self.created,
            "version": self.version, "state_id": self.state_id, "settings": self.settings.to_json(),
            "steps": [{"step": s, "url": u} for s, u in self.steps], "skipped": list(self.skipped),
            "tensors": self.tensors, "updates_since_recompute": self.updates_since_recompute,
            "ops_since_recompute": self.ops_since_recompute,
            # recorded for people and tools (derived from steps and settings; not read back)
            "window": {"size": len(self.steps), "of": self.settings.last, "filling": self.filling},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, where: str) -> StateMeta:
        if not isinstance(doc, dict) or doc.get("format") not in READ_FORMATS:
            got = doc.get("format") if isinstance(doc, dict) else None
            raise CheckpointError(
                f"{where}: PMA state format {got!r}, this moemerge reads formats "
                f"{' and '.join(map(str, READ_FORMATS))}; "
                "upgrade moemerge, or start a new state (another STATE location)")
        try:
            return cls(
                settings=StateSettings.from_json(doc["settings"]),
                steps=tuple((int(s["step"]), str(s["url"])) for s in doc["steps"]),
                skipped=tuple(int(s) for s in doc.get("skipped", ())),
                tensors={str(k): dict(v) for k, v in doc["tensors"].items()},
                version=int(doc["version"]), state_id=str(doc["state_id"]),
                updates_since_recompute=int(doc.get("updates_since_recompute", 0)),
                ops_since_recompute=int(doc.get("ops_since_recompute", 0)),
                created=str(doc.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: damaged PMA state metadata ({e!r}); start a new state") from e


@dataclass(slots=True)
class StateVersion:
    """One readable state version: its metadata and its sums (a Zarr checkpoint of F64 arrays)."""

    meta: StateMeta
    url: str
    sums: Checkpoint

    @property
    def name(self) -> str:
        """The version's directory name, as the pointer gives it ('v000017-3fa9c2d1')."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def close(self) -> None:
        self.sums.close()


class StateStore:
    """A PMA state location: read the current version, write the next one, switch atomically.

    Example:
        store = StateStore("s3://run42/pma/state")
        cur = store.current()                     # None before the first update
        w = store.begin(meta, arrays)             # a ZarrModelWriter for the next version
        ... w.write_rows(array_name("S", t), r0, data) ...
        store.commit(w, meta)                     # manifest, then pointer, then old version gone
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 compress: bool = True) -> None:
        self.url = url.rstrip("/") or url
        self.storage_options = storage_options
        self.compress = compress
        try:
            self.fs, root = storage.resolve(url, storage_options)
        except Exception as e:  # bad protocol, missing driver, bad options
            raise ConfigError(storage.redact(f"{url}: cannot use this state location ({e})", storage_options)) from e
        self.local = storage.is_local(self.fs)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        #: the pointer's version path and ETag (object storage) when last read: what `commit`
        #: requires to be still there (compare-and-swap); unset until read
        self._seen: tuple[str | None, str | None] | None = None
        self._cleanup: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"StateStore({self.url!r})"

    @property
    def key(self) -> str:
        """The location as one canonical URL (`file:///abs/state`, `s3://b/state`)."""
        return str(self.fs.unstrip_protocol(self.root))

    # -- locations -------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def version_url(self, name: str) -> str:
        """The URL of the version directory `name` (e.g. 'v000017-3fa9c2d1')."""
        return f"{self.url}/{name}"

    def _call(self, fn: Any, what: str, error: type[Exception] = CheckpointError) -> Any:
        return storage.with_retries(fn, what=what, url=self.url, error=error)

    def _entries(self) -> list[str]:
        def ls() -> list[str]:
            try:
                return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
            except FileNotFoundError:
                return []

        return list(self._call(ls, "list the state location"))

    # -- reading ---------------------------------------------------------------------------

    def pointer(self) -> dict[str, Any] | None:
        """The pointer object, or None if the location holds no state yet."""
        path = self._path(POINTER_NAME)
        exists = self._call(lambda: self.fs.isfile(path), f"look up {POINTER_NAME}")
        if not exists:
            self._seen = (None, None)
            entries = [e for e in self._entries() if not _VERSION_DIR.match(e) and not is_lock_name(e)]
            if entries:
                raise ConfigError(
                    f"{self.url}: is not empty and holds no PMA state ({POINTER_NAME} is missing; "
                    f"found e.g. {sorted(entries)[0]!r}); give a new or empty location for the state")
            return None
        etag = None
        if not self.local and hasattr(self.fs, "call_s3"):  # the ETag first: a newer body fails the CAS
            self.fs.invalidate_cache(path)
            etag = self._call(lambda: self.fs.info(path).get("ETag"), f"look up {POINTER_NAME}")
        raw = self._call(lambda: self.fs.cat_file(path), f"read {POINTER_NAME}")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not _VERSION_DIR.match(str(doc.get("path"))):
                raise ValueError(f"no version path in {doc!r}")
        except ValueError as e:
            raise CheckpointError(f"{self.url}/{POINTER_NAME}: damaged state pointer ({e}); "
                                  "start a new state (another STATE location)") from e
        if doc.get("format") not in READ_FORMATS:
            raise CheckpointError(
                f"{self.url}/{POINTER_NAME}: PMA state format {doc.get('format')!r}, this moemerge "
                f"reads formats {' and '.join(map(str, READ_FORMATS))}; upgrade moemerge or start a new state")
        self._seen = (str(doc["path"]), etag)
        return doc

    def current(self) -> StateVersion | None:
        """The version the pointer names (metadata read, sums opened lazily), or None."""
        doc = self.pointer()
        if doc is None:
            return None
        url = f"{self.url}/{doc['path']}"
        from moemerge.pma.state_codec import register

        register()  # format 2 versions name the state codec in their arrays' metadata
        try:
            sums = Checkpoint.open(url, self.storage_options)
        except CheckpointError as e:
            raise CheckpointError(
                f"{self.url}: the state pointer names {doc['path']}, which cannot be read ({e}); the "
                "state is damaged (deleted by hand?): start a new state") from e
        try:
            raw = sums.side_file(MANIFEST_NAME)
            where = f"{url}/{MANIFEST_NAME}"
            man = Manifest.from_json(raw, where=where) if raw is not None else None
            meta = StateMeta.from_json(dict(man.pma_state or {}) if man is not None else {}, where=where)
            _check_reads(sums, man, self.url)
        except BaseException:
            sums.close()
            raise
        return StateVersion(meta=meta, url=url, sums=sums)

    # -- writing ---------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail before work if the state location cannot take a new version."""
        if self.local:
            parent = self.root
            while parent and not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if os.path.isfile(self.root):
                raise OutputError(f"{self.url}: is a file; the PMA state must be a directory")
            if not os.access(parent or ".", os.W_OK):
                raise OutputError(f"{self.url}: cannot write the PMA state here ({parent} is not writable)")
        elif self.root and self._call(lambda: self.fs.isfile(self.root), "look up the state location",
                                      error=OutputError):
            raise OutputError(f"{self.url}: is an object; the PMA state must be a prefix (directory)")

    def clean_leftovers(self, keep: str | None) -> list[str]:
        """Delete every version directory except `keep` (the one the pointer names): crash
        leftovers. Call only while holding the state's lock (another job's version in the
        making would look the same); return the names deleted."""
        gone = []
        for name in self._entries():
            if _VERSION_DIR.match(name) and name != keep:
                self._call(lambda n=name: self.fs.rm(self._path(n), recursive=True),
                           f"delete the unfinished state version {name}", error=OutputError)
                gone.append(name)
        return gone

    def begin(self, arrays: list[ZarrArraySpec], meta: StateMeta) -> ZarrModelWriter:
        """A prepared writer for version `meta.version`, in a new directory of a name no other
        job picks (`v000017-<random>`)."""
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        writer = ZarrModelWriter(self.version_url(_version_dir(meta.version)), arrays,
                                 attributes={"pma_state": meta.to_json()}, overwrite=False,
                                 storage_options=self.storage_options,
                                 compressors=_compressors(meta.settings.method) if self.compress else None,
                                 checksums=True)  # every chunk's checksum in the manifest
        writer.prepare()
        return writer

    def commit(self, writer: ZarrModelWriter, meta: StateMeta, previous: str | None) -> None:
        """Finish the new version, switch the pointer to it if it still names `previous` (the
        version this update started from; None: no state), then delete `previous`.

        A pointer that changed meanwhile (another job committed) is an OutputError: the new
        version is deleted, the state is left as that other job made it.
        """
        name = writer.root.rstrip("/").rsplit("/", 1)[-1]
        writer.finish(side_files={}, index={}, manifest=Manifest(pma_state=meta.to_json(), tensors={}))
        doc = {"format": STATE_FORMAT, "version": meta.version, "path": name, "state_id": meta.state_id}
        data = json.dumps(doc, indent=1).encode()
        path = self._path(POINTER_NAME)
        try:
            self._swap_pointer(path, data, previous, name)
        except BaseException:
            if not self._names(name):  # unreferenced: delete it (a crash leftover otherwise)
                try:
                    self.fs.rm(self._path(name), recursive=True)
                except Exception:
                    pass
            raise
        if previous is not None and previous != name:
            # the old version is no longer named: delete it while the caller goes on (commits
            # its output); `wait_cleanup` joins. Interrupted, it is a leftover the next update
            # deletes (clean_leftovers).
            def rm() -> None:
                try:
                    self.fs.rm(self._path(previous), recursive=True)
                except Exception:  # the new state is committed; the next update removes it
                    pass

            self._cleanup = threading.Thread(target=rm, name="moemerge-state-cleanup", daemon=True)
            self._cleanup.start()

    def wait_cleanup(self) -> None:
        """Wait until the version `commit` replaced is deleted (if it started deleting one)."""
        if self._cleanup is not None:
            self._cleanup.join()
            self._cleanup = None

    def _names(self, name: str) -> bool:
        """Whether the pointer names version `name` now (False if it cannot be read)."""
        try:
            self._seen = None
            now = self.pointer()
            return now is not None and now["path"] == name
        except Exception:
            return False

    def _swap_pointer(self, path: str, data: bytes, previous: str | None, name: str) -> None:
        """Replace the pointer by `data` only if it still names `previous` (compare-and-swap)."""
        etag = self._seen[1] if self._seen is not None and self._seen[0] == previous else None
        s3 = not self.local and hasattr(self.fs, "call_s3")
        if s3 and (previous is None or etag):
            # the server compares: If-None-Match for the first version, If-Match the ETag read
            cond: dict[str, Any] = {"mode": "create"} if previous is None else {"IfMatch": etag}
            try:
                self._call(lambda: self.fs.pipe_file(path, data, **cond), f"write {POINTER_NAME}",
                           error=OutputError)
            except OutputError as e:
                # a retried PUT whose first try went through also fails the condition: look
                if _precondition_failed(e) and not self._names(name):
                    raise self._moved(previous) from e
                if not _precondition_failed(e):
                    raise
            return
        # local (under the state's lock; the rename is atomic) or a store without conditional
        # writes (under the state's lease): re-read right before the switch
        self._seen = None
        now = self.pointer()
        if (now["path"] if now else None) != previous:
            raise self._moved(previous)
        if self.local:
            atomic_write(path, data)
        else:  # no rename on object storage: one PUT shows the whole new pointer or the old one
            self._call(lambda: self.fs.pipe_file(path, data), f"write {POINTER_NAME}", error=OutputError)

    def _moved(self, previous: str | None) -> OutputError:
        try:
            self._seen = None
            now = self.pointer()
            names = now["path"] if now else "nothing"
        except Exception:
            names = "another version"
        return OutputError(
            f"{self.url}/{POINTER_NAME}: another job committed the PMA state while this update ran (the "
            f"pointer names {names}, this update started from {previous or 'no state'}); this update's "
            "version was discarded and the state is as that job left it; rerun the update")


def _check_reads(sums: Checkpoint, manifest: Manifest | None, url: str) -> None:
    """Make every read of the state's sums complete and checked: a missing chunk, or one whose
    bytes differ from the checksum its manifest recorded, fails (never reads as zeros)."""
    hint = (f"the PMA state at {url} is damaged: rebuild it from its snapshots with `moemerge pma "
            "update ... --recompute-every 1` (SMA/WMA), or start a new STATE location")
    from moemerge.io.zarr_reader import ZarrCheckpoint

    if isinstance(sums, ZarrCheckpoint):  # always, for a version written by `begin`
        sums.damaged_hint = hint
        recorded = manifest.chunk_checksums if manifest is not None else None
        sums.chunk_checksums = dict(recorded) if recorded is not None else None


def new_meta(settings: StateSettings, steps: list[tuple[int, str]], *, skipped: list[int],
             tensors: dict[str, dict[str, Any]], version: int, updates_since_recompute: int,
             ops_since_recompute: int) -> StateMeta:
    """A StateMeta for a version about to be written (fresh id and time)."""
    return StateMeta(
        settings=settings, steps=tuple(steps), skipped=tuple(skipped), tensors=tensors,
        version=version, state_id=uuid.uuid4().hex, updates_since_recompute=updates_since_recompute,
        ops_since_recompute=ops_since_recompute,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _compressors(method: str) -> Any:
    """The lossless state codec (pma.state_codec): sums of a few bf16/fp16 values are exact in
    float32, mostly in 24 bits, so SMA/WMA sums take about 3 bytes per value (blosc-lz4, the
    format-1 codec, 2.6) for a third of its CPU; blocks that are not (sums of fp32 snapshots)
    fall back to blosc-lz4. An EMA value (and minus-sqrt's average) uses every mantissa bit
    and lz4 gains about 6% on it: those blocks are stored raw, for no compression CPU."""
    from moemerge.pma.state_codec import state_codec

    return [state_codec("raw" if method in ("ema", "minus-sqrt") else "lz4")]


def _version_dir(version: int) -> str:
    """A new version's directory name: the number for people, a random tag so that no two jobs
    (even two updates racing from one version) ever write the same directory."""
    return f"v{version:06d}-{uuid.uuid4().hex[:8]}"


def _precondition_failed(e: BaseException) -> bool:
    from moemerge.io.lease import _precondition_failed as failed

    return failed(e) or isinstance(e.__cause__, FileExistsError)

