"""A stand-in for the Hugging Face Hub's file API on 127.0.0.1, for tests (never the real Hub).

Serves the endpoints huggingface_hub's `HfFileSystem`, `HfApi.model_info`, `hf_hub_download`
and `snapshot_download` use: model info at a revision, tree listings, paths-info, and
`resolve` with HEAD, Range requests and the headers the client reads (X-Repo-Commit, ETag,
X-Linked-Etag, X-Linked-Size). Repositories are commits of in-memory files plus branches;
private ones need `Authorization: Bearer <token>`. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubStandIn", "Seen"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    """One request the stand-in answered."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int


@dataclass(slots=True, kw_only=True)
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None


def _blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(path: str, data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
    out: dict[str, Any] = {"type": "file", "oid": _blob_oid(data), "size": len(data), "path": path}
    if path.endswith(".safetensors"):  # stored with LFS on the Hub
        out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return out


class HubStandIn:
    """The stand-in server: `add_commit` files, point a branch at them, read `requests`.

    Example:
        with HubStandIn() as hub:
            sha = hub.add_folder("org/tiny", tmp_path / "tiny")
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
    """

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._n = 0
        handler = _handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
                   token: str | None = None) -> str:
        """A new commit holding `files`; `branch` now points at it. Returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            if token is not None:
                repo.token = token
            self._n += 1
            sha = hashlib.sha1(f"{repo_id}/{self._n}".encode()).hexdigest()
            repo.commits[sha] = dict(files)
            repo.refs[branch] = sha
            return sha

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main", token: str | None = None) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_commit(repo_id, files, branch=branch, token=token)

    def seen(self, suffix: str) -> list[Seen]:
        """Requests whose path ends with `suffix`."""
        with self._lock:
            return [s for s in self.requests if s.path.endswith(suffix)]

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK wait

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # -- answers ---------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  *, head: bool = False) -> None:
            hub.record(Seen(method=self.command, path=urlsplit(self.path).path, range=self.headers.get("Range"),
                            authorization=self.headers.get("Authorization"), status=status))
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, doc: Any) -> None:
            self._send(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str, text: str, *, head: bool = False) -> None:
            self._send(status, json.dumps({"error": text}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": text}, head=head)

        def _repo(self, repo_id: str, rev: str | None, *, head: bool = False) -> tuple[_Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is not None and repo.token is not None and \
                    self.headers.get("Authorization") != f"Bearer {repo.token}":
                repo = None  # private: the Hub answers as if there were none
            if repo is None:
                self._error(404 if self.headers.get("Authorization") else 401, "RepoNotFound",
                            "Repository not found", head=head)
                return None
            rev = rev or "main"
            sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
                return None
            return repo, sha

        # -- routes ----------------------------------------------------------------------

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_POST(self) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            n = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(n).decode()) if n else {}
            # /api/models/{ns}/{name}/paths-info/{rev}
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "paths-info":
                got = self._repo(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]))
                if got is None:
                    return
                files = got[0].commits[got[1]]
                out = []
                for p in form.get("paths", []):
                    p = p.strip("/")
                    if p in files:
                        out.append(_entry(p, files[p]))
                    elif any(f.startswith(p + "/") for f in files):
                        out.append(_entry(p, None))
                self._json(200, out)
                return
            self._error(404, "NotFound", f"no route for POST {self.path}")

        def _route(self, *, head: bool) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id = f"{parts[2]}/{parts[3]}"
                if len(parts) == 4 or parts[4] == "revision":
                    got = self._repo(repo_id, "/".join(parts[5:]) if len(parts) > 5 else None)
                    if got is not None:
                        files = got[0].commits[got[1]]
                        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": got[1], "private": False,
                                         "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)]})
                    return
                if parts[4] == "tree" and len(parts) >= 6:
                    self._tree(repo_id, parts[5], "/".join(parts[6:]),
                               recursive=query.get("recursive", ["False"])[0].lower() == "true")
                    return
            if len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head=head)
                return
            self._error(404, "NotFound", f"no route for {self.command} {self.path}", head=head)

        def _tree(self, repo_id: str, rev: str, path: str, *, recursive: bool) -> None:
            got = self._repo(repo_id, rev)
            if got is None:
                return
            files = got[0].commits[got[1]]
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            inside = [f for f in sorted(files) if f.startswith(prefix)]
            if prefix and not inside:
                self._error(404, "EntryNotFound", f"{path} does not exist")
                return
            out: dict[str, dict[str, Any]] = {}
            for f in inside:
                rest = f[len(prefix):].split("/")
                if recursive:
                    for i in range(1, len(rest)):
                        d = prefix + "/".join(rest[:i])
                        out.setdefault(d, _entry(d, None))
                    out[f] = _entry(f, files[f])
                elif len(rest) == 1:
                    out[f] = _entry(f, files[f])
                else:
                    d = prefix + rest[0]
                    out.setdefault(d, _entry(d, None))
            self._json(200, list(out.values()))

        def _resolve(self, repo_id: str, rev: str, path: str, *, head: bool) -> None:
            got = self._repo(repo_id, rev, head=head)
            if got is None:
                return
            repo, sha = got
            data = repo.commits[sha].get(path)
            if data is None:
                self._error(404, "EntryNotFound", f"{path} does not exist at {rev}", head=head)
                return
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_blob_oid(data)}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if path.endswith(".safetensors"):
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            rng = self.headers.get("Range")
            if rng and not head:
                spec = rng.strip().removeprefix("bytes=")
                a_text, _, b_text = spec.partition("-")
                a = int(a_text)
                b = min(int(b_text), len(data) - 1) if b_text else len(data) - 1
                if a >= len(data) or a > b:
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    return
                body = data[a:b + 1]
                headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
                self._send(206, body, headers)
                return
            headers["Content-Length"] = str(len(data))
            self._send(200, data, headers, head=head)

    return Handler
