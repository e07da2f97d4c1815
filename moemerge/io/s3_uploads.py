"""Unfinished S3 multipart uploads under an output's prefix: find them and abort them.

A run killed with -9, or one whose abort failed because S3 was down, leaves its multipart
uploads open; S3 keeps (and bills) their parts until they are aborted. The writer of an output
aborts every open upload under its own prefix (never outside it) before it writes, and again
after a failure, so a later successful run leaves nothing behind.
"""

from __future__ import annotations

import logging
from typing import Any

from moemerge.io import storage

__all__ = ["open_uploads", "abort_stale_uploads"]

_log = logging.getLogger(__name__)


def _split(root: str) -> tuple[str, str]:
    """`bucket/out/dir` -> ("bucket", "out/dir/"): the key prefix of everything under the output."""
    bucket, _, key = root.strip("/").partition("/")
    return bucket, (key.rstrip("/") + "/") if key else ""


def open_uploads(fs: Any, root: str) -> list[tuple[str, str]]:
    """(key, upload id) of every multipart upload in progress under `root` (bucket/prefix)."""
    bucket, prefix = _split(root)
    found: list[tuple[str, str]] = []
    marker: dict[str, str] = {}
    while True:
        resp = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
        for u in resp.get("Uploads") or []:
            key = str(u.get("Key", ""))
            if key.startswith(prefix):  # S3 filters by prefix already; never touch anything else
                found.append((key, str(u["UploadId"])))
        if not resp.get("IsTruncated"):
            return found
        marker = {"KeyMarker": resp.get("NextKeyMarker", ""), "UploadIdMarker": resp.get("NextUploadIdMarker", "")}


def abort_stale_uploads(fs: Any, root: str, url: str, *, why: str = "left by an earlier run",
                        skip: frozenset[str] = frozenset()) -> str | None:
    """Abort the open multipart uploads under `root` (upload ids in `skip` excepted).

    Returns a note for the user ("aborted 2 unfinished uploads under s3://b/out/ left by an
    earlier run"), or None when there were none. Best effort: a failure to list or abort is
    logged, not raised (the run's own result matters more).
    """
    bucket, _ = _split(root)
    try:
        uploads = [(k, u) for k, u in open_uploads(fs, root) if u not in skip]
    except Exception as e:
        _log.warning("%s/: could not list unfinished multipart uploads (%s)", url.rstrip("/"),
                     storage.redact(storage.describe_error(e)))
        return None
    aborted = 0
    for key, upload in uploads:
        try:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
            aborted += 1
        except Exception as e:
            _log.warning("s3://%s/%s: could not abort an unfinished multipart upload (%s)", bucket, key,
                         storage.redact(storage.describe_error(e)))
    if not aborted:
        return None
    return f"aborted {aborted} unfinished upload{'s' if aborted != 1 else ''} under {url.rstrip('/')}/ {why}"
