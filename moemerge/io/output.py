"""Where an output goes and which writer writes it, decided once (`output_target`), and the one
factory for writers (`open_writer`; `attach_writer` for Dask workers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from moemerge.io import storage
from moemerge.io.safetensors_format import ShardLayout
from moemerge.io.writer import LocalModelWriter, ModelWriter, TensorPlacement

if TYPE_CHECKING:
    from moemerge.io.zarr_writer import ZarrArraySpec

__all__ = ["WriterKind", "OutputTarget", "OutputLayout", "output_target", "open_writer", "attach_writer"]

WriterKind = Literal["local", "remote", "zarr", "dcp"]
"""`local`: safetensors shards filled in place on a local or shared filesystem (io.writer);
`remote`: safetensors shards streamed to object storage (io.s3_writer); `zarr`: a Zarr v3 group
anywhere (io.zarr_writer); `dcp`: a PyTorch DCP directory on a local or shared filesystem
(io.dcp_writer)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputTarget:
    """An output location and the kind of writer it takes (see `output_target`)."""

    kind: WriterKind
    url: str
    storage_options: dict[str, Any] | None = None

    def at(self, url: str) -> OutputTarget:
        """The same target at another location: where the writer really builds the output
        (`writer.target`, a sibling of `url` while overwriting, io.swap)."""
        return replace(self, url=url)


class OutputLayout(Protocol):
    """What the writers need of a plan (`planner.Plan` has it): the shard layout, where each
    tensor goes, the Zarr arrays, and the provenance kept in Zarr root attributes."""

    @property
    def shards(self) -> tuple[ShardLayout, ...]: ...

    @property
    def method(self) -> str: ...

    @property
    def sources(self) -> tuple[str, ...]: ...

    @property
    def config_hash(self) -> str: ...

    def placements(self) -> dict[str, TensorPlacement]: ...

    def zarr_arrays(self) -> list[ZarrArraySpec]: ...


def output_target(url: str, out_format: str = "safetensors",
                  storage_options: dict[str, Any] | None = None) -> OutputTarget:
    """The writer kind for `url` in `out_format` (`safetensors`, `zarr`, `dcp`): the one place it is
    decided. Example: output_target("s3://b/m").kind == "remote"; output_target("m").kind == "local"."""
    if out_format == "zarr":
        kind: WriterKind = "zarr"
    elif out_format == "dcp":
        kind = "dcp"
    else:
        kind = "local" if storage.is_local(storage.resolve(url, storage_options)[0]) else "remote"
    return OutputTarget(kind=kind, url=url, storage_options=storage_options)


def open_writer(target: OutputTarget, layout: OutputLayout, *, overwrite: bool,
                attributes: Mapping[str, Any] | None = None) -> ModelWriter:
    """A new writer for `layout` at `target`, not yet `prepare`d (it checks the location).

    `attributes` (JSON-able) are added to what formats with metadata record (Zarr root
    attributes: moemerge version, method, sources, config hash, then these).
    """
    if target.kind == "zarr":
        from moemerge.io.zarr_writer import ZarrModelWriter
        from moemerge.settings import VERSION

        attrs = {"moemerge_version": VERSION, "method": layout.method, "sources": list(layout.sources),
                 "config_hash": layout.config_hash, **(attributes or {})}
        return ZarrModelWriter(target.url, layout.zarr_arrays(), attributes=attrs, overwrite=overwrite,
                               storage_options=target.storage_options)
    if target.kind == "dcp":
        from moemerge.io.dcp_writer import DcpModelWriter, names_from

        return DcpModelWriter(target.url, layout.placements(), overwrite=overwrite, names=names_from(attributes))
    if target.kind == "remote":
        from moemerge.io.s3_writer import RemoteModelWriter

        return RemoteModelWriter(target.url, layout.shards, layout.placements(), overwrite=overwrite,
                                 storage_options=target.storage_options)
    return LocalModelWriter(target.url, layout.shards, layout.placements(), overwrite=overwrite)


def attach_writer(target: OutputTarget, layout: OutputLayout) -> ModelWriter:
    """A writer into an output another process opened and `prepare`d (a Dask worker): it
    writes rows (and reads them back), never finishes. `target.url` is the writer's `target`.

    `remote`: each call gives a fresh writer of whole shards (`complete` each, or `close` to
    abort its uploads); the preparing process `adopt`s them.
    """
    if target.kind == "zarr":
        from moemerge.io.zarr_writer import ZarrModelWriter

        return ZarrModelWriter.attach(target.url, layout.zarr_arrays(), storage_options=target.storage_options)
    if target.kind == "dcp":
        from moemerge.io.dcp_writer import DcpModelWriter

        # the layout does not depend on the key names: the default names lay it out alike
        return DcpModelWriter.attach(target.url, layout.placements())
    if target.kind == "remote":
        from moemerge.io.s3_writer import RemoteModelWriter

        return RemoteModelWriter.attach(target.url, layout.shards, layout.placements(),
                                        storage_options=target.storage_options)
    return LocalModelWriter.attach(target.url, layout.shards, layout.placements())
