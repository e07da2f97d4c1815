"""Model references as MergeKit writes them (`org/name`, `path@revision`, `model+lora`), and
Hugging Face Hub repositories read through huggingface_hub: in place (its fsspec filesystem,
exact range requests) or, with a hub cache directory, from a local download.

A config's references are made explicit once, when the config is parsed (`model_reference`):
an existing local path stays as written, a Hub id becomes `hf://org/name[@revision]`, and
`model+adapter` keeps its two (explicit) halves. `storage.resolve` then hands every `hf://`
location and every `model+adapter` location to `resolve_reference`, so weights, config.json
and tokenizer files all come from the same commit: a revision is pinned to its commit sha the
first time a run resolves it (`begin_run` starts afresh). The token (HF_TOKEN or the login
file) is read by huggingface_hub per request and never held or printed here.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from moemerge.errors import CheckpointError, ConfigError

__all__ = [
    "HUB_PREFIX",
    "CACHE_ENV",
    "HubPath",
    "ADAPTER_CONFIG",
    "model_reference",
    "display_reference",
    "split_lora",
    "resolve_reference",
    "begin_run",
    "pinned",
    "set_cache_dir",
    "cache_dir",
    "endpoint",
    "revision_stamp",
]

HUB_PREFIX = "hf://"
#: The hub cache directory (`--hub-cache`): set here so that Dask workers started by this
#: process inherit it.
CACHE_ENV = "MOEMERGE_HUB_CACHE"
_DEFAULT_ENDPOINT = "https://huggingface.co"

# A Hub model id: `namespace/name` (the Hub no longer serves single-segment ids), each part
# the Hub's repo-name characters; a leading `.` or `/` makes it a local path instead.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA = re.compile(r"[0-9a-f]{40}")
#: The file that makes a directory a PEFT adapter.
ADAPTER_CONFIG = "adapter_config.json"
#: Files a download (`--hub-cache`) fetches: weights, JSON (config, index, tokenizer), and the
#: tokenizer's other files. MergeKit fetches `*.json`, `*.safetensors` and `tokenizer.model`.
_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "vocab*", "merges*", "tokenizer*"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HubPath:
    """An `hf://` location taken apart."""

    repo_id: str
    """`namespace/name`."""
    revision: str | None
    """Branch, tag or commit as written (None: the default branch)."""
    path_in_repo: str
    """A folder inside the repository ("" for its root)."""


def endpoint() -> str:
    """The Hub's address: HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).rstrip("/")


def set_cache_dir(path: str | None) -> None:
    """Download Hub files into `path` (huggingface_hub's cache layout) instead of reading them
    in place; None: read in place. Set in the environment, so that workers inherit it."""
    if path:
        os.environ[CACHE_ENV] = os.path.abspath(os.path.expanduser(path))
    else:
        os.environ.pop(CACHE_ENV, None)


def cache_dir() -> str | None:
    return os.environ.get(CACHE_ENV) or None


# -- parsing (config time) ---------------------------------------------------------------------


def _reference_text(v: Any, key: str) -> str:
    """MergeKit's reference forms as one string: `"x"`, `{model: x}`, `{path: x, revision: r}`,
    `{model: {path, revision}, lora: {path, revision}}`."""
    if isinstance(v, dict):
        extra = sorted(set(v) - {"model", "path", "revision", "lora", "override_architecture"})
        if extra:
            raise ConfigError(f"`{key}`: unknown key(s) {extra} in a model reference; "
                              "use a string such as `org/name@revision+path/to/adapter`")
        if v.get("override_architecture") is not None:
            raise ConfigError(f"`{key}`: `override_architecture` is not supported; edit the model's config.json")
        if "model" in v:
            text = _reference_text(v["model"], key)
        elif "path" in v:
            text = _reference_text(v["path"], key)
            if v.get("revision") is not None:
                text = f"{text}@{v['revision']}"
        else:
            raise ConfigError(f"`{key}`: a model reference needs `model` or `path`, got {v!r}")
        if v.get("lora") is not None:
            text = f"{text}+{_reference_text(v['lora'], key)}"
        return text
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"`{key}`: expected a checkpoint path, URL or Hub id, got {v!r}")
    return v.strip()


def _one_model(text: str, key: str, what: str) -> str:
    """One model (or adapter) location made explicit: an existing local path as written, a
    URL as written, a Hub id as `hf://id[@revision]`."""
    if not text:
        raise ConfigError(f"`{key}`: empty {what} location")
    if "://" in text or os.path.exists(text):
        return text
    if text.count("@") > 1:
        raise ConfigError(f"`{key}`: {text!r} has more than one `@`; write PATH@REVISION")
    path, _, rev = text.partition("@")
    if "@" in text and not rev:
        raise ConfigError(f"`{key}`: {text!r} has an empty revision after `@`")
    if rev and os.path.exists(path):
        # MergeKit ignores it; a revision that silently does nothing merges other weights than asked
        raise ConfigError(f"`{key}`: {path} is a local directory and has no revisions (`@{rev}`); "
                          "drop `@...`, or check out that revision into a directory of its own")
    if _HUB_ID.fullmatch(path) and ".." not in path:
        # a revision with `/` (refs/pr/1, feature/x) is quoted, as hf:// paths want it
        return f"{HUB_PREFIX}{path}@{quote(rev, safe='')}" if rev else f"{HUB_PREFIX}{path}"
    if rev:
        raise ConfigError(f"`{key}`: {path} is neither a local directory nor a Hub model id "
                          "(namespace/name); a `@revision` applies to Hub models")
    return text  # a local path that is not there: opening it says so


def model_reference(v: Any, key: str) -> str:
    """A config's model reference as the location moemerge opens.

    Example: `meta-llama/Llama-3.1-8B@v2` -> `hf://meta-llama/Llama-3.1-8B@v2` (unless a local
    directory of that spelling exists: then it stays as written); `base+adapters/x` ->
    `base+adapters/x` with each half made explicit the same way.
    """
    text = _reference_text(v, key)
    if "+" in text and not os.path.exists(text):
        parts = text.split("+")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"`{key}`: cannot read {text!r}; a LoRA reference is MODEL+ADAPTER (one `+`)")
        return f"{_one_model(parts[0], key, 'model')}+{_one_model(parts[1], key, 'adapter')}"
    return _one_model(text, key, "model")


def display_reference(location: str) -> str:
    """A location as MergeKit users write it: `hf://org/name@rev+hf://org/ad` -> `org/name@rev+org/ad`."""
    def one(part: str) -> str:
        return unquote(part[len(HUB_PREFIX):]) if part.startswith(HUB_PREFIX) else part

    return "+".join(one(p) for p in location.split("+")) if "+" in location else one(location)


# -- resolving (run time) ----------------------------------------------------------------------

_LOCK = threading.Lock()
#: (endpoint, repo, revision) -> commit sha, for the run under way (`begin_run` clears it).
_PINS: dict[tuple[str, str, str], str] = {}
#: (endpoint, repo, sha, cache dir) -> local snapshot directory.
_SNAPSHOTS: dict[tuple[str, str, str, str], str] = {}
#: `model+adapter` strings known to be LoRA references (their adapter_config.json was seen).
_LORA: dict[str, tuple[str, str] | None] = {}


def begin_run(pins: dict[tuple[str, str, str], str] | None = None) -> None:
    """Forget pinned revisions: a branch is resolved again (once) by the next run; `pins`
    (another process's `pinned()`): start from those commits instead."""
    with _LOCK:
        _PINS.clear()
        _PINS.update(pins or {})
        _LORA.clear()


def pinned() -> dict[tuple[str, str, str], str]:
    """The commits this run's Hub branches resolved to: (endpoint, repo, revision) -> sha."""
    with _LOCK:
        return dict(_PINS)


def parse_hub_url(url: str) -> HubPath:
    """`hf://org/name@rev/sub` -> HubPath (a `models/` prefix allowed; datasets and spaces are not models)."""
    rest = url[len(HUB_PREFIX):].strip("/")
    if rest.startswith("models/"):
        rest = rest[len("models/"):]
    if rest.split("/", 1)[0] in ("datasets", "spaces", "buckets"):
        raise CheckpointError(f"{url}: not a model repository; moemerge reads Hub model repositories")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise CheckpointError(f"{url}: a Hub model id is namespace/name (single-segment ids are gone from the Hub)")
    name, _, rev = parts[1].partition("@")
    sub = parts[2:]
    if rev == "refs" and len(sub) >= 2 and sub[0] in ("pr", "convert"):
        # `refs/pr/1` written unquoted spans path segments (huggingface_hub reads it so too)
        rev, sub = "/".join(["refs", sub[0], sub[1]]), sub[2:]
    rev = unquote(rev)
    return HubPath(repo_id=f"{parts[0]}/{name}", revision=rev or None, path_in_repo="/".join(sub))


def _hub_error(url: str, e: BaseException) -> CheckpointError:
    """A huggingface_hub failure in words that say what to do (never the token)."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    local = url[len(HUB_PREFIX):].split("@", 1)[0].split("+", 1)[0]
    nolocal = f"no local directory {local}, and " if "://" not in local else ""
    if isinstance(e, GatedRepoError):
        return CheckpointError(f"{url}: the repository is gated; accept its terms on the Hub and set HF_TOKEN "
                               "(or `hf auth login`)")
    if isinstance(e, RevisionNotFoundError):
        return CheckpointError(f"{url}: the repository has no such revision (branch, tag or commit); "
                               "check the part after `@`")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(f"{url}: no local directory {local} and no Hub model repository {local} at "
                               f"{endpoint()} (a private repository needs HF_TOKEN); check the path or id")
    if isinstance(e, OfflineModeIsEnabled):
        return CheckpointError(f"{url}: {nolocal}HF_HUB_OFFLINE is set, so the Hub cannot be asked; unset it or "
                               "use a local copy")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return CheckpointError(f"{url}: the Hub at {endpoint()} answered HTTP {status} "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return CheckpointError(f"{url}: {nolocal}the Hub at {endpoint()} cannot be reached ({type(e).__name__}: {e}); "
                           "check the path, the network or HF_ENDPOINT")


def _pin(url: str, hp: HubPath) -> str:
    """The commit sha of `hp.revision` (one request per run and revision; a sha is asked about
    too, so that a commit, repository or access that is not there is said so before work)."""
    key = (endpoint(), hp.repo_id, hp.revision or "")
    with _LOCK:
        got = _PINS.get(key)
    if got is not None:
        return got
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(hp.repo_id, revision=hp.revision)
    except Exception as e:
        raise _hub_error(url, e) from e
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise CheckpointError(f"{url}: the Hub at {endpoint()} did not say which commit this revision is")
    with _LOCK:
        return _PINS.setdefault(key, sha)


def _hub_fs() -> Any:
    return _range_fs_class()(endpoint=endpoint())


_FS_CLASS: Any = None


def _range_fs_class() -> Any:
    """HfFileSystem whose ranged `cat_file` sends exactly the asked range (fsspec's default
    read-ahead cache would ask for 5 MB more)."""
    global _FS_CLASS
    if _FS_CLASS is None:
        from huggingface_hub import HfFileSystem

        class RangeHfFileSystem(HfFileSystem):
            def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                         **kwargs: Any) -> bytes:
                if start is not None or end is not None:
                    kwargs.setdefault("cache_type", "none")
                return bytes(super().cat_file(path, start=start, end=end, **kwargs))

        _FS_CLASS = RangeHfFileSystem
    return _FS_CLASS


def _snapshot(url: str, hp: HubPath, sha: str, where: str) -> str:
    """The local snapshot directory of `hp` at commit `sha` under cache `where` (downloaded once)."""
    key = (endpoint(), hp.repo_id, sha, where)
    with _LOCK:
        got = _SNAPSHOTS.get(key)
    if got is not None:
        return got
    from huggingface_hub import snapshot_download

    patterns = [posixpath.join(hp.path_in_repo, p) if hp.path_in_repo else p for p in _DOWNLOAD_PATTERNS]
    try:
        local = str(snapshot_download(hp.repo_id, revision=sha, cache_dir=where, endpoint=endpoint(),
                                      allow_patterns=patterns))
    except Exception as e:
        raise _hub_error(url, e) from e
    with _LOCK:
        return _SNAPSHOTS.setdefault(key, local)


def split_lora(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """(model, adapter) when `url` is a `model+adapter` reference: two halves, and an
    adapter_config.json in the second. Anything else (an output path with a `+`) is None."""
    if "+" not in url:
        return None
    with _LOCK:
        if url in _LORA:
            return _LORA[url]
    parts = url.split("+")
    got: tuple[str, str] | None = None
    if len(parts) == 2 and all(parts) and not os.path.exists(url):
        model, adapter = parts
        if "://" in adapter or os.path.isdir(adapter):
            from moemerge.io import storage

            fs, root = storage.resolve(adapter, storage_options)  # a Hub adapter's errors say what is wrong
            if storage.with_retries(lambda: fs.isfile(storage.join(root.rstrip("/"), ADAPTER_CONFIG)),
                                    what=f"look up {ADAPTER_CONFIG}", url=adapter):
                got = (model, adapter)
    with _LOCK:
        _LORA[url] = got
    return got


def resolve_reference(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str] | None:
    """(filesystem, path) for an `hf://` location or a `model+adapter` one (its model, where
    config.json and the tokenizer live); None for every other location.

    `hf://org/name@branch` reads `org/name@<commit sha>` (pinned for the run); with a hub cache
    directory (`set_cache_dir`) the local snapshot of that commit, downloaded first.
    """
    lora = split_lora(url, storage_options) if "+" in url else None
    if lora is not None:
        from moemerge.io import storage

        return storage.resolve(lora[0], storage_options)
    if not url.startswith(HUB_PREFIX):
        return None
    hp = parse_hub_url(url)
    sha = _pin(url, hp)
    where = cache_dir()
    if where:
        from fsspec.implementations.local import LocalFileSystem

        root = _snapshot(url, hp, sha, where)
        return LocalFileSystem(), posixpath.join(root, hp.path_in_repo) if hp.path_in_repo else root
    path = f"{hp.repo_id}@{sha}"
    return _hub_fs(), f"{path}/{hp.path_in_repo}" if hp.path_in_repo else path


def revision_stamp(fs: Any, path: str) -> dict[str, str]:
    """`{"revision": sha}` for a file read from the Hub (in place or from a hub cache snapshot),
    so that a branch that moved counts as a changed input on `--resume`; {} otherwise."""
    from moemerge.io import storage

    if not storage.is_local(fs):
        if getattr(fs, "protocol", None) in ("hf", ("hf",)) or type(fs).__name__.endswith("HfFileSystem"):
            m = re.search(r"@([0-9a-f]{40})(/|$)", path)
            return {"revision": m.group(1)} if m else {}
        return {}
    where = cache_dir()
    if where and os.path.abspath(path).startswith(os.path.abspath(where) + os.sep):
        m = re.search(r"/snapshots/([0-9a-f]{40})/", path)
        return {"revision": m.group(1)} if m else {}
    return {}
