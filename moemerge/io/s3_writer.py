"""Write a sharded safetensors model to object storage (S3 or any other fsspec filesystem).

Each shard is streamed while the merge runs: its header first, then the rows as they arrive
(in file order), in parts of at least 5 MiB uploaded as they fill (S3 multipart upload,
`formats.md`); the upload is completed when the shard's last byte arrived. Nothing whole is
staged in memory or on local disk. Side files, then the index, then the manifest are written
last (the commit). Abandoning the writer aborts open uploads and deletes what it completed.
On non-S3 filesystems a shard is streamed to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from moemerge.errors import OutputError
from moemerge.io import storage
from moemerge.io.checkpoint import INDEX_NAME
from moemerge.io.s3_uploads import abort_stale_uploads
from moemerge.io.safetensors_format import ShardLayout
from moemerge.io.sidefiles import MODEL_FILES, is_tokenizer_file
from moemerge.io.manifest import MANIFEST_NAME, Manifest
from moemerge.io.writer import MARKER_NAME, OWN_SIDE_FILES, TensorPlacement, as_manifest, check_output

__all__ = ["RemoteModelWriter", "S3_MIN_PART", "S3_MAX_PARTS", "DEFAULT_PART_SIZE"]

_log = logging.getLogger(__name__)

#: S3 rejects a multipart part below 5 MiB unless it is the last one (formats.md).
S3_MIN_PART = 5 * 2**20
#: Parts are numbered 1..10,000; bigger shards get bigger parts.
S3_MAX_PARTS = 10_000
#: Bytes per part: one filling buffer per shard being written (about one at a time), plus the
#: parts in flight on the upload threads.
DEFAULT_PART_SIZE = 16 * 2**20
#: Rows that arrive ahead of the write position are held until the gap fills, up to this many
#: bytes; the local engine delivers rows in file order, so this only absorbs small reorderings.
MAX_PENDING = 64 * 2**20


def _is_s3(fs: Any) -> bool:
    protos = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protos and hasattr(fs, "call_s3")


class _ShardSink:
    """Takes the bytes of one shard in file order (small reorderings held back) and emits them."""

    def __init__(self, writer: RemoteModelWriter, layout: ShardLayout) -> None:
        self.w = writer
        self.file = layout.file
        self.size = layout.size
        self.url = f"{writer.url.rstrip('/')}/{layout.file}"
        self.path = storage.join(writer.root, layout.file)
        self.pos = 0
        self.done = False
        self._pending: dict[int, bytes] = {}
        self._pending_bytes = 0
        self.write(0, memoryview(layout.header))

    def write(self, offset: int, data: memoryview) -> None:
        if offset != self.pos:
            if offset < self.pos or offset in self._pending:
                raise OutputError(f"{self.url}: bytes {offset}..{offset + len(data)} were written twice")
            if self._pending_bytes + len(data) > MAX_PENDING:
                raise OutputError(
                    f"{self.url}: rows arrive too far out of file order for a streamed upload "
                    f"(at byte {offset}, expected {self.pos}); write to a local directory or Zarr"
                )
            self._pending[offset] = bytes(data)
            self._pending_bytes += len(data)
            return
        self._take(data)
        while self.pos in self._pending:
            chunk = self._pending.pop(self.pos)
            self._pending_bytes -= len(chunk)
            self._take(memoryview(chunk))

    def _take(self, data: memoryview) -> None:
        if self.pos + len(data) > self.size:
            raise OutputError(f"{self.url}: write past the shard's planned end ({self.size} bytes)")
        if len(data):
            self._emit(data)
            self.pos += len(data)
        if self.pos == self.size and not self.done:
            self._complete()
            self.done = True

    # subclasses: stream bytes, make the object visible, or throw it all away
    def _emit(self, data: memoryview) -> None:
        raise NotImplementedError

    def _complete(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class _S3Multipart(_ShardSink):
    """One shard as an S3 multipart upload, started when its first part is full.

    Full parts are uploaded on the writer's upload threads while the next part fills; at most
    `upload_threads` parts are in flight (each holds its bytes), so memory stays bounded.
    """

    def __init__(self, writer: RemoteModelWriter, layout: ShardLayout) -> None:
        self.bucket, _, self.key = storage.join(writer.root, layout.file).partition("/")
        # parts are numbered 1..10,000: a huge shard needs parts above the configured size
        self.part_size = max(writer.part_size, -(-layout.size // S3_MAX_PARTS))
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self._next = 1
        self._inflight: set[Future[None]] = set()
        self._buf = bytearray()
        super().__init__(writer, layout)

    def _call(self, method: str, what: str, **kw: Any) -> Any:
        return storage.with_retries(
            lambda: self.w.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw),
            what=what, url=self.url, policy=self.w.retry, error=OutputError,
        )

    def _emit(self, data: memoryview) -> None:
        while len(data):
            room = self.part_size - len(self._buf)
            self._buf += data[:room]
            data = data[room:]
            if len(self._buf) == self.part_size:
                self._upload_part()

    def _send(self, n: int, body: bytes) -> None:
        assert self.upload_id is not None
        resp = self._call("upload_part", f"upload part {n} ({len(body)} bytes) of the multipart upload",
                          PartNumber=n, UploadId=self.upload_id, Body=body)
        self.etags[n] = resp["ETag"]

    def _wait(self, *, below: int) -> None:
        """Wait until fewer than `below` parts are in flight; raise the first failure."""
        while len(self._inflight) >= max(below, 1):
            done, self._inflight = wait(self._inflight, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()

    def _upload_part(self) -> None:
        if self.upload_id is None:
            self.upload_id = self._call("create_multipart_upload", "start a multipart upload")["UploadId"]
        n, self._next = self._next, self._next + 1
        body = bytes(self._buf)
        self._buf.clear()
        self._wait(below=self.w.upload_threads)
        self._inflight.add(self.w._pool().submit(self._send, n, body))

    def _complete(self) -> None:
        if self.upload_id is None:  # the whole shard fits in one part: a plain PUT
            self._call("put_object", "upload the shard", Body=bytes(self._buf))
        else:
            if self._buf:
                self._upload_part()
            while self._inflight:
                self._wait(below=1)
            parts = [{"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)]
            self._call("complete_multipart_upload", f"complete the multipart upload ({len(parts)} parts)",
                       UploadId=self.upload_id, MultipartUpload={"Parts": parts})
            self.upload_id = None
        self._buf = bytearray()

    def abort(self) -> None:
        self._buf = bytearray()
        inflight, self._inflight = self._inflight, set()
        wait(inflight)  # an upload still running would race the abort
        if self.upload_id is not None:
            upload, self.upload_id = self.upload_id, None
            try:
                self.w.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload)
            except Exception as e:  # abandoning is best effort; the failure that led here matters
                _log.warning("%s: could not abort the multipart upload (%s)", self.url,
                             storage.redact(storage.describe_error(e)))


class _FileStream(_ShardSink):
    """One shard streamed to `<name>.moemerge-partial` with `fs.open(..., "wb")`, then renamed."""

    def __init__(self, writer: RemoteModelWriter, layout: ShardLayout) -> None:
        self.tmp = storage.join(writer.root, layout.file + ".moemerge-partial")
        self._f: Any = None
        super().__init__(writer, layout)

    def _emit(self, data: memoryview) -> None:
        try:
            if self._f is None:
                self._f = self.w.fs.open(self.tmp, "wb")
            self._f.write(data)
        except Exception as e:
            raise OutputError(storage.redact(f"{self.url}: write failed at byte {self.pos} ({storage.describe_error(e)})")) from e

    def _complete(self) -> None:
        try:
            if self._f is None:
                self._f = self.w.fs.open(self.tmp, "wb")
            f, self._f = self._f, None
            f.close()
            self.w.fs.mv(self.tmp, self.path)
        except Exception as e:
            raise OutputError(storage.redact(f"{self.url}: cannot commit the shard ({storage.describe_error(e)})")) from e

    def abort(self) -> None:
        f, self._f = self._f, None
        try:
            if f is not None:
                if hasattr(f, "discard"):
                    f.discard()
                else:
                    f.close()
            if self.w.fs.exists(self.tmp):
                self.w.fs.rm(self.tmp)
        except Exception as e:
            _log.warning("%s: could not remove the partial shard (%s)", self.url,
                         storage.redact(storage.describe_error(e)))


class RemoteModelWriter:
    """A safetensors model directory on object storage, each shard streamed as it is merged.

    Rows must arrive in file order per shard (the local engine's writer thread does so);
    memory is one filling part per shard being written plus at most `upload_threads` parts in
    flight (S3), about 3 x 16 MiB by default. Example::

        w = RemoteModelWriter("s3://bucket/merged", plan.shards, placements, overwrite=False)
        w.prepare(); w.write_rows(name, 0, rows); ...; w.finish(side_files=..., index=..., manifest=...)
    """

    def __init__(self, url: str, shards: tuple[ShardLayout, ...], placements: dict[str, TensorPlacement],
                 *, overwrite: bool, storage_options: dict[str, Any] | None = None,
                 part_size: int | None = None, retry: storage.RetryPolicy | None = None,
                 upload_threads: int = 2, check: bool = True) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        if check:  # not when attaching to an output another process checked and prepared
            check_output(url, overwrite=overwrite, storage_options=storage_options)
        self.fs, root = storage.resolve(url, storage_options)
        self.root = root.rstrip("/")
        self._stage(check, overwrite)
        self.s3 = _is_s3(self.fs)
        ps = DEFAULT_PART_SIZE if part_size is None else int(part_size)
        if self.s3 and ps < S3_MIN_PART:
            raise ValueError(f"part_size must be at least {S3_MIN_PART} bytes (5 MiB) for S3, got {ps}")
        if ps < 1:
            raise ValueError(f"part_size must be positive, got {ps}")
        self.part_size = ps
        if upload_threads < 1:
            raise ValueError(f"upload_threads must be >= 1, got {upload_threads}")
        self.upload_threads = upload_threads
        self._executor: ThreadPoolExecutor | None = None
        self.retry = retry
        self.shards = shards
        self.placements = placements
        self._sinks: dict[str, _ShardSink] = {}
        self._layouts = {s.file: s for s in shards}
        self._committed: list[str] = []  # objects this run made visible, removed if abandoned
        self._elsewhere: set[str] = set()  # shards other processes wrote (Dask workers)
        self._finished = False
        self._lock = threading.Lock()
        self._owner = check  # the process that prepared the output (not an attached Dask worker)
        self.notes: list[str] = []
        """Lines for the user, e.g. unfinished uploads of an earlier run that `prepare` aborted."""

    def _stage(self, check: bool, overwrite: bool) -> None:
        """Overwriting a finished output: build the new one under `OUT.moemerge-new/`, copied
        over at commit (io.swap); first complete or drop what an interrupted overwrite left."""
        from moemerge.io import swap

        self.final_url, self.final_root = self.url, self.root
        self.swapped = self.committing = False
        if check and self.root:
            try:
                if swap.recover_remote(self.fs, self.root, self.url):
                    check_output(self.url, overwrite=overwrite, storage_options=self.storage_options)
                target = swap.remote_target_for(self.fs, self.root, self.url, overwrite=overwrite)
            except OutputError:
                raise
            except Exception as e:
                raise OutputError(storage.redact(
                    f"{self.url}: cannot tidy what an interrupted overwrite left ({storage.describe_error(e)})",
                    self.storage_options)) from e
            if target != self.root:
                self.root, self.url = target, self.url + swap.NEW_SUFFIX
        self.target = self.url

    def describe(self) -> str:
        """What the output location holds now, for a message after an interruption or failure."""
        if self.swapped:
            return f"{self.final_url} holds the new finished output"
        if self.committing:
            return (f"{self.final_url} is not finished: the commit of the new output was cut short; "
                    "rerun to complete it")
        if self.root != self.final_root:
            return f"the previous output at {self.final_url} is untouched"
        return f"{self.final_url} has no index or manifest; it is not finished; rerun"

    @classmethod
    def attach(cls, url: str, shards: tuple[ShardLayout, ...], placements: dict[str, TensorPlacement],
               *, storage_options: dict[str, Any] | None = None) -> RemoteModelWriter:
        """A writer of whole shards into an output another process prepared (a Dask worker).

        It streams the shards it is given and `complete`s each; `close` on failure aborts and
        deletes only its own shards. The preparing process `adopt`s them and finishes.
        """
        return cls(url, shards, placements, overwrite=True, storage_options=storage_options, check=False)

    def complete(self, file: str) -> None:
        """Check that shard `file` was streamed whole (its upload is then complete)."""
        with self._lock:
            sink = self._sink(file)  # a shard of empty tensors is its header alone
            if not sink.done:
                raise OutputError(f"{sink.url}: only {sink.pos} of {sink.size} bytes were written; "
                                  "the merge did not produce the whole shard (internal error)")
            self._committed.append(file)
            self._sinks.pop(file, None)
            self._shutdown()

    def adopt(self, files: list[str]) -> None:
        """Shards that other processes wrote and completed: part of this output from now on."""
        with self._lock:
            self._elsewhere.update(files)
            self._committed.extend(files)

    def __repr__(self) -> str:
        return f"RemoteModelWriter({self.url!r}, shards={len(self.shards)}, part_size={self.part_size})"

    def _obj(self, name: str) -> str:
        return storage.join(self.root, name) if self.root else name

    def _put(self, name: str, data: bytes) -> None:
        storage.with_retries(lambda: self.fs.pipe_file(self._obj(name), data), what="write it",
                             url=f"{self.url}/{name}", policy=self.retry, error=OutputError)
        self._committed.append(name)

    def prepare(self) -> None:
        """Make an old finished output stop looking finished, drop its stale files, mark the
        prefix as a moemerge output in progress."""
        self._abort_stale("left by an earlier run")  # before any upload of ours exists
        try:
            marker = self._obj(MARKER_NAME)
            ours = self.fs.exists(self._obj(MANIFEST_NAME)) or self.fs.exists(marker)
            for name in (MANIFEST_NAME, INDEX_NAME):
                if self.fs.exists(self._obj(name)):
                    self.fs.rm(self._obj(name))
            self.fs.pipe_file(marker, b"")
            if ours:  # only a former moemerge output's files are ours to clean up
                keep = {s.file for s in self.shards}
                for p in self.fs.ls(self.root, detail=False) if self.root else []:
                    name = p.rstrip("/").rsplit("/", 1)[-1]
                    stale_shard = name.endswith(".safetensors") and name not in keep
                    side = name in MODEL_FILES or name in OWN_SIDE_FILES or is_tokenizer_file(name)
                    if (stale_shard or side or name.endswith(".moemerge-partial")) and self.fs.isfile(p):
                        self.fs.rm(p)
            self.fs.invalidate_cache(self.root)
        except OutputError:
            raise
        except Exception as e:
            raise OutputError(storage.redact(
                f"{self.url}: cannot prepare the output location ({storage.describe_error(e)})",
                self.storage_options)) from e
        self._committed.append(MARKER_NAME)

    def _abort_stale(self, why: str) -> None:
        """Abort open multipart uploads under this output's prefix (s3_uploads), with a note."""
        if not (self.s3 and self._owner):
            return
        # the output and, when overwriting, its staging sibling (`_stage`): both are this job's
        final = getattr(self, "final_root", self.root), getattr(self, "final_url", self.url)
        for root, url in dict([(self.root, self.url), final]).items():
            note = abort_stale_uploads(self.fs, root, url, why=why)
            if note:  # printed now: it concerns the location, whatever this run does next
                self.notes.append(note)
                print(f"note: {note}", file=sys.stderr, flush=True)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.upload_threads, thread_name_prefix="moemerge-upload")
        return self._executor

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _sink(self, file: str) -> _ShardSink:
        sink = self._sinks.get(file)
        if sink is None:
            sink = (_S3Multipart if self.s3 else _FileStream)(self, self._layouts[file])
            self._sinks[file] = sink
        return sink

    def write_rows(self, name: str, row_start: int, data: memoryview) -> None:
        p = self.placements[name]
        with self._lock:
            sink = self._sink(p.file)
            try:
                sink.write(p.offset + row_start * p.row_bytes, data)
            except BaseException:
                sink.abort()
                raise
            if sink.done:
                self._committed.append(p.file)

    def finish(self, *, side_files: dict[str, bytes], index: dict[str, Any],
               manifest: Manifest | dict[str, Any]) -> None:
        """Complete header-only shards, then write side files, the index, the manifest (commit)."""
        manifest = as_manifest(manifest)
        with self._lock:
            for s in self.shards:
                if s.file in self._elsewhere:
                    continue
                sink = self._sink(s.file)  # a shard of empty tensors is its header alone
                if sink.done:
                    self._committed.append(s.file)
                else:
                    raise OutputError(
                        f"{sink.url}: only {sink.pos} of {sink.size} bytes were written; "
                        "the merge did not produce the whole shard (internal error)"
                    )
            for name, data in side_files.items():
                self._put(name, data)
            self._put(INDEX_NAME, json.dumps(index, indent=2).encode())
            self._put(MANIFEST_NAME, manifest.to_json())
            self._finished = True
            self._sinks.clear()
            self._shutdown()
            try:
                self.fs.rm(self._obj(MARKER_NAME))
            except FileNotFoundError:
                pass
            except Exception as e:  # the manifest is written: the output is finished regardless
                _log.warning("%s: could not remove %s (%s)", self.url, MARKER_NAME,
                             storage.redact(storage.describe_error(e), self.storage_options))
            if self.root != self.final_root:  # overwriting: copy the finished new output over
                from moemerge.io import swap

                self.committing = True
                try:
                    swap.commit_remote(self.fs, self.root, self.final_root)
                except Exception as e:
                    raise OutputError(storage.redact(
                        f"{self.final_url}: the commit of the new output was cut short "
                        f"({storage.describe_error(e)}); it is not finished; rerun to complete it",
                        self.storage_options)) from e
                self.swapped = True

    def close(self) -> None:
        """Abandon an unfinished output: abort open uploads, delete what this run committed."""
        with self._lock:
            if self._finished:
                return
            for sink in self._sinks.values():
                if not sink.done:
                    sink.abort()
            self._sinks.clear()
            self._shutdown()
            self._abort_stale("left open by this run")  # e.g. ones whose abort above failed
            # the index and manifest go first, so nothing left half-deleted looks finished
            order = sorted(set(self._committed), key=lambda n: (n != MANIFEST_NAME, n != INDEX_NAME, n))
            for name in order:
                try:
                    self.fs.rm(self._obj(name))
                except FileNotFoundError:
                    pass
                except Exception as e:
                    _log.warning("%s/%s: could not delete it (%s)", self.url, name,
                                 storage.redact(storage.describe_error(e), self.storage_options))
            self._committed.clear()

