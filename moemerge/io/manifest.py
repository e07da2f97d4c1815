"""`moemerge-manifest.json`, the commit record of an output or PMA state version: one type,
`Manifest`, written by every writer and read by every reader (verify, export, Zarr, PMA)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from moemerge.errors import CheckpointError

__all__ = ["MANIFEST_NAME", "MARKER_NAME", "Manifest", "TensorEntry"]

MANIFEST_NAME = "moemerge-manifest.json"
#: Present in an output while it is being written (removed by the commit, after the manifest).
MARKER_NAME = ".moemerge-incomplete"

#: Top-level keys in the order a manifest built in code writes them (a manifest read from disk
#: keeps the order it had, so rewriting it gives the same bytes).
_ORDER = ("pma_state", "moemerge_version", "created", "method", "config_hash", "config", "inputs", "seed", "dtype",
          "files", "tensors", "pma", "pma_state", "exported_from", "format", "chunk_checksums")
_TENSOR_ORDER = ("file", "dtype", "shape", "sha256", "array")


_NO_TENSORS = "has no `tensors` map of name -> {file, dtype, shape, sha256}"


def _damaged(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {what}; the output is damaged (or was not written by moemerge)")


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorEntry:
    """One stored tensor: its safetensors shard, dtype, shape, sha256 of its bytes, and (Zarr
    outputs) the array holding it. Keys this moemerge does not know are kept in `extra`."""

    file: str | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    sha256: str | None = None
    array: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for k in _TENSOR_ORDER:
            v = getattr(self, k)
            if v is not None:
                doc[k] = list(v) if k == "shape" else v
        return {**doc, **self.extra}

    @classmethod
    def from_dict(cls, doc: Any, *, where: str, name: str) -> TensorEntry:
        if not isinstance(doc, dict):
            raise _damaged(where, f"tensor `{name}` has {type(doc).__name__} for its entry, not an object")
        got = {k: doc[k] for k in _TENSOR_ORDER if k in doc}
        for k in ("file", "dtype", "sha256", "array"):
            if k in got and not isinstance(got[k], str):
                raise _damaged(where, f"tensor `{name}`: `{k}` is {got[k]!r}, not a string")
        if "shape" in got:
            shape = got["shape"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise _damaged(where, f"tensor `{name}`: `shape` is {shape!r}, not a list of integers")
            got["shape"] = tuple(shape)
        return cls(**got, extra={k: v for k, v in doc.items() if k not in _TENSOR_ORDER})


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What a finished output (or PMA state version) holds; written last, so its presence is
    the commit. Every field is optional (readers of tensors use `listed`); keys this moemerge does not
    know are kept in `extra`, and `keys` keeps a read manifest's key order, so
    `Manifest.from_json(raw).to_json() == raw` for every manifest moemerge wrote.

    Example::

        m = Manifest(method="linear", files={"model.safetensors": 96},
                     tensors={"w": TensorEntry(file="model.safetensors", dtype="F32", shape=(4, 4), sha256="ab12...")})
        Manifest.from_json(m.to_json(), where="out/moemerge-manifest.json") == m
    """

    moemerge_version: str | None = None
    created: str | None = None
    """UTC time of the commit, ISO 8601 to the second."""
    method: str | None = None
    config_hash: str | None = None
    config: Any = None
    """The YAML config as given (storage options left out)."""
    inputs: tuple[str, ...] | None = None
    seed: int | None = None
    dtype: str | None = None
    """The output's main dtype (what config.json's torch_dtype says)."""
    files: Mapping[str, int] | None = None
    """Shard file -> size in bytes (empty for Zarr outputs)."""
    tensors: Mapping[str, TensorEntry] | None = None
    """Stored tensor name -> entry, in plan order (every writer records it; see `listed`)."""
    pma: Mapping[str, Any] | None = None
    """`moemerge pma` / `pma update`: what was averaged (steps, snapshots, weights, state)."""
    pma_state: Mapping[str, Any] | None = None
    """A PMA state version's metadata (`pma.state.StateMeta.to_json()`)."""
    exported_from: str | None = None
    """`moemerge export`: the Zarr output this was converted from."""
    format: str | None = None
    """`zarr` for a Zarr output; absent for safetensors."""
    chunk_checksums: Mapping[str, str] | None = None
    """Zarr chunk key -> checksum of its stored bytes (io.zarr_store), verified on every read."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Top-level keys this moemerge does not know, as read."""
    keys: tuple[str, ...] = ()
    """Key order on disk (empty: `_ORDER`, then `extra`)."""

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON object (plain dicts and lists)."""
        values: dict[str, Any] = {}
        for k in _ORDER:
            v = getattr(self, k)
            if k == "tensors" and v is not None:
                values[k] = {n: e.to_dict() for n, e in v.items()}
            elif v is not None:
                values[k] = list(v) if k == "inputs" else (dict(v) if isinstance(v, Mapping) else v)
        values.update(self.extra)
        order = [k for k in self.keys if k in values] + [k for k in values if k not in self.keys]
        return {k: values[k] for k in order}

    def to_json(self) -> bytes:
        """The file's bytes (one-space indent, as moemerge has always written it)."""
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_dict(cls, doc: Any, *, where: str) -> Manifest:
        """Check and convert a parsed manifest; a damaged one is a CheckpointError naming `where`."""
        if not isinstance(doc, dict):
            raise _damaged(where, f"holds {type(doc).__name__}, not a JSON object")
        got: dict[str, Any] = {}
        tensors = doc.get("tensors")
        if tensors is not None:
            if not isinstance(tensors, dict):
                raise _damaged(where, _NO_TENSORS)
            got["tensors"] = {str(n): TensorEntry.from_dict(e, where=where, name=str(n)) for n, e in tensors.items()}
        checks: dict[str, tuple[type | tuple[type, ...], str]] = {
            "moemerge_version": (str, "a string"), "created": (str, "a string"), "method": (str, "a string"),
            "config_hash": (str, "a string"), "inputs": (list, "a list"), "seed": (int, "an integer"),
            "dtype": (str, "a string"), "files": (dict, "an object"), "pma": (dict, "an object"),
            "pma_state": (dict, "an object"), "exported_from": (str, "a string"), "format": (str, "a string"),
            "chunk_checksums": (dict, "an object"),
        }
        for k, (kind, said) in checks.items():
            if k in doc and doc[k] is not None:
                if not isinstance(doc[k], kind) or isinstance(doc[k], bool):
                    raise _damaged(where, f"`{k}` is {doc[k]!r:.80}, not {said}")
                got[k] = tuple(doc[k]) if k == "inputs" else doc[k]
        if doc.get("config") is not None:
            got["config"] = doc["config"]
        # unknown keys, and known ones that are null, are kept as read
        known = {f.name for f in fields(cls)} - {"extra", "keys"}
        extra = {k: v for k, v in doc.items() if k not in known or v is None}
        return cls(**got, extra=extra, keys=tuple(doc))

    @classmethod
    def from_json(cls, raw: bytes | str, *, where: str) -> Manifest:
        """Parse the file's bytes; invalid JSON or a wrong structure is a CheckpointError
        naming `where` (e.g. `out/moemerge-manifest.json`) and saying the output is damaged."""
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise _damaged(where, f"not valid JSON ({e})") from e
        return cls.from_dict(doc, where=where)

    def listed(self, where: str) -> Mapping[str, TensorEntry]:
        """`tensors`, which a reader needs: a manifest without it is damaged (error naming `where`)."""
        if self.tensors is None:
            raise _damaged(where, _NO_TENSORS)
        return self.tensors

    # -- changes -----------------------------------------------------------------------------

    def updated(self, **changes: Any) -> Manifest:
        """A copy with these top-level keys set (None: removed). As with a dict, a key already
        present keeps its place and a new one goes last: the bytes stay those moemerge wrote."""
        doc = self.to_dict()
        for k, v in changes.items():
            if v is None:
                doc.pop(k, None)
            elif k == "tensors":
                doc[k] = {n: e.to_dict() if isinstance(e, TensorEntry) else e for n, e in v.items()}
            else:
                doc[k] = list(v) if k == "inputs" else v
        return Manifest.from_dict(doc, where="manifest")

    def with_extra(self, more: Mapping[str, Any] | None) -> Manifest:
        """A copy with the keys of `more` added at the end (or replaced in place), as `{**m, **more}`."""
        return self.updated(**more) if more else self

