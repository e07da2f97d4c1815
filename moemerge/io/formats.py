"""The checkpoint formats moemerge reads, in the one ordered list `FORMATS` they are sniffed in,
and the `CheckpointReader` protocol every reader (and every wrapping view) offers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from moemerge.errors import CheckpointError
from moemerge.io import storage

if TYPE_CHECKING:
    from moemerge.io.checkpoint import Checkpoint, TensorInfo
    from moemerge.names import DcpNames

__all__ = ["CheckpointReader", "WrapsReader", "CheckpointFormat", "FORMATS", "open_checkpoint", "unwrap"]


class CheckpointReader(Protocol):
    """A checkpoint opened headers-only: its tensors, exact row-range reads into a caller's
    buffer, the small files beside the weights, and `close`.

    `read_rows(name, r0, r1, out)` fills `out[:(r1 - r0) * row_bytes]` with rows [r0, r1) of
    tensor `name` (io.checkpoint.row_geometry) and may be called from several threads.
    """

    url: str
    tensors: dict[str, TensorInfo]

    def read_rows(self, name: str, r0: int, r1: int, out: memoryview) -> None: ...

    def side_file(self, name: str) -> bytes | None: ...

    def config(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


@runtime_checkable
class WrapsReader(Protocol):
    """A view over another reader (io.quant.view.QuantizedView serves quantized tensors
    dequantized): `inner` is the reader whose files it reads."""

    @property
    def inner(self) -> Checkpoint: ...


def unwrap(reader: Checkpoint) -> Checkpoint:
    """The reader that holds the files behind any views (itself if it is no view)."""
    while isinstance(reader, WrapsReader):
        reader = reader.inner
    return reader


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointFormat:
    """One readable format: how to recognize a location (`sniff`) and open it (`open`)."""

    name: str
    marker: str
    """What `sniff` looks for, as the "nothing found" error names it."""
    what: str
    """The kind of location, as the "nothing found" error names it."""
    sniff: Callable[[Any, str, str], bool]
    """(filesystem, url, path) -> whether the location is in this format (a request or two)."""
    open: Callable[[str, Any, str, dict[str, Any] | None, DcpNames | None], Checkpoint]
    """(url, filesystem, path, storage_options, DCP names) -> the opened checkpoint."""


def _isfile(fs: Any, url: str, path: str) -> bool:
    """fs.isfile with retries; permission and network failures name the checkpoint."""
    return bool(storage.with_retries(lambda: fs.isfile(path), what=f"look up {path}", url=url))


def _open_zarr(url: str, fs: Any, root: str, so: dict[str, Any] | None, names: DcpNames | None) -> Checkpoint:
    from moemerge.io.zarr_reader import ZarrCheckpoint

    return ZarrCheckpoint.open_store(url, fs, root, so)


def _open_file(url: str, fs: Any, root: str, so: dict[str, Any] | None, names: DcpNames | None) -> Checkpoint:
    from moemerge.io.checkpoint import Checkpoint

    return Checkpoint.open_file(url, fs, root)


def _open_index(url: str, fs: Any, root: str, so: dict[str, Any] | None, names: DcpNames | None) -> Checkpoint:
    from moemerge.io.checkpoint import Checkpoint

    return Checkpoint.open_index(url, fs, root)


def _open_single(url: str, fs: Any, root: str, so: dict[str, Any] | None, names: DcpNames | None) -> Checkpoint:
    from moemerge.io.checkpoint import Checkpoint

    return Checkpoint.open_single(url, fs, root)


def _open_dcp(url: str, fs: Any, root: str, so: dict[str, Any] | None, names: DcpNames | None) -> Checkpoint:
    from moemerge.io.dcp import DcpCheckpoint

    return DcpCheckpoint.open_dir(url, fs, root, names)


def _beside(name: str) -> Callable[[Any, str, str], bool]:
    return lambda fs, url, root: _isfile(fs, url, storage.join(root, name))


# Names spelled out here rather than imported: io.checkpoint imports this module lazily, and
# every reader module is imported only when its format is opened.
_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"

#: Every format, in the order a location is tried: the first whose `sniff` says yes opens it.
#: A moemerge Zarr output first (its root holds a zarr.json and nothing else of these), then a
#: bare .safetensors file, then a Hugging Face directory (sharded, then one file), then DCP.
FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat(name="zarr", marker="zarr.json", what="a moemerge Zarr output",
                     sniff=_beside("zarr.json"), open=_open_zarr),
    CheckpointFormat(name="safetensors-file", marker="a .safetensors file", what="a .safetensors file",
                     sniff=lambda fs, url, root: root.endswith(".safetensors") and _isfile(fs, url, root),
                     open=_open_file),
    CheckpointFormat(name="safetensors", marker=_INDEX_NAME,
                     what="a Hugging Face model directory with safetensors weights",
                     sniff=_beside(_INDEX_NAME), open=_open_index),
    CheckpointFormat(name="safetensors-single", marker=_SINGLE_NAME,
                     what="a Hugging Face model directory with safetensors weights",
                     sniff=_beside(_SINGLE_NAME), open=_open_single),
    CheckpointFormat(name="dcp", marker="DCP .metadata", what="a PyTorch DCP checkpoint directory",
                     sniff=_beside(".metadata"), open=_open_dcp),
)


def _listing(words: list[str]) -> str:
    """'a, b or c' (repeats dropped)."""
    words = list(dict.fromkeys(words))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def open_checkpoint(url: str, storage_options: dict[str, Any] | None = None, *,
                    names: DcpNames | None = None, formats: tuple[CheckpointFormat, ...] = FORMATS) -> Checkpoint:
    """Open the checkpoint at `url` (headers only) in the first of `formats` that sniffs it.

    `names` picks and renames a DCP checkpoint's model keys (None: the `model.` keys). A
    location no format recognizes is a CheckpointError naming what each looks for.
    """
    from moemerge.io.hub import split_lora

    lora = split_lora(url, storage_options)
    if lora is not None:  # `model+adapter`: the model, its LoRA delta added on read (io.lora)
        from moemerge.io.lora import open_lora

        return open_lora(url, lora[0], lora[1], storage_options,
                         lambda m: open_checkpoint(m, storage_options, names=names, formats=formats))
    try:
        fs, root = storage.resolve(url, storage_options)
    except CheckpointError:
        raise  # already names the location (a Hub repository or revision that is not there)
    except Exception as e:  # bad protocol, missing driver, bad options
        raise CheckpointError(f"{url}: cannot open this location ({e})") from e
    root = root.rstrip("/") or root
    for fmt in formats:
        if fmt.sniff(fs, url, root):
            return fmt.open(url, fs, root, storage_options, names)
    if not storage.with_retries(lambda: fs.isdir(root), what=f"look up {root}", url=url):
        hint = "; a LoRA reference is MODEL+ADAPTER with a PEFT adapter directory" if "+" in url else ""
        raise CheckpointError(f"{url}: checkpoint directory does not exist{hint}")
    dirs = [f for f in formats if f.name != "safetensors-file"]
    raise CheckpointError(
        f"{url}: no {_listing([f.marker for f in dirs])} here; point at {_listing([f.what for f in dirs])}")
