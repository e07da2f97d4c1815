"""Storage and formats: read checkpoints by byte range, write model directories (fsspec)."""

from moemerge.io.checkpoint import Checkpoint, TensorInfo, row_geometry
from moemerge.io.writer import MANIFEST_NAME, LocalModelWriter, check_output

__all__ = ["Checkpoint", "TensorInfo", "row_geometry", "LocalModelWriter", "check_output", "MANIFEST_NAME"]
