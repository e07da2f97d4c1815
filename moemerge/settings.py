"""Defaults and limits of the API, the CLI and `pma`, each defined once (the CLI's help texts
show these values). A leaf module: it imports nothing from moemerge."""

from __future__ import annotations

__all__ = [
    "VERSION",
    "DEFAULT_BUDGET",
    "DEFAULT_SHARD_SIZE",
    "MIN_SHARD_SIZE",
    "MIN_BUDGET",
    "DEFAULT_UNIT_BYTES",
    "DEFAULT_DEVICE",
    "OUT_FORMATS",
    "QUANTIZE_CHOICES",
    "PMA_METHODS",
    "DEFAULT_PMA_METHOD",
    "DEFAULT_ALPHA",
    "DEFAULT_LAST",
    "DEFAULT_MIN_SNAPSHOTS",
    "EXIT_NOT_READY",
    "JOURNAL_EVERY",
    "JOURNAL_EVERY_TENSORS",
    "JOURNAL_EVERY_SECONDS",
    "JOURNAL_MIN_SECONDS",
    "DEFAULT_WRITE_MODEL_CARD",
    "DEFAULT_COPY_TOKENIZER",
    "MERGEKIT_LOADER_FLAGS",
    "MERGEKIT_NOT_NEEDED",
]

#: The package version (recorded in manifests, indexes and resume journals).
VERSION = "0.1.0"

#: `--memory-budget`: bytes for the engine's buffers, per process (per worker on Dask).
DEFAULT_BUDGET = "2GB"
#: `--shard-size`: the largest output shard.
DEFAULT_SHARD_SIZE = "5GB"
#: The smallest `--shard-size` the CLI accepts, in bytes. Below it a size is almost surely a
#: unit mix-up (`1B` in MergeKit's units is 10^9 bytes, here one byte: one file per tensor).
MIN_SHARD_SIZE = 10**6
#: The smallest budget accepted, in bytes: below it, per-call overheads dominate every chunk.
MIN_BUDGET = 10**6
#: `--unit-size`, in bytes of input per work unit (DESIGN "Work units and scale"): about 256 MB
#: keeps a 100B+ model in the thousands of units, so Dask's per-task overhead stays negligible.
DEFAULT_UNIT_BYTES = 256 * 10**6
#: `--device`: where the math runs.
DEFAULT_DEVICE = "cpu"
#: `--format`: the output formats (`dcp`: a PyTorch DCP directory for PMA-init, io.dcp_writer).
OUT_FORMATS = ("safetensors", "zarr", "dcp")
#: `--quantize` (YAML `quantize:`): the output quantizations (config.py says what each means).
QUANTIZE_CHOICES = ("none", "like-input", "fp8-block", "mxfp4")

#: `run --write-model-card` (MergeKit's default): README.md and mergekit_config.yml beside the model.
DEFAULT_WRITE_MODEL_CARD = True
#: `run --copy-tokenizer` (MergeKit's default): copy the tokenizer files of the tokenizer source.
DEFAULT_COPY_TOKENIZER = True
#: mergekit-yaml flags that only tune MergeKit's own loader and writer: `moemerge run` accepts
#: them (a MergeKit command line works unchanged) and notes that they change nothing here.
MERGEKIT_LOADER_FLAGS = ("--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--clone-tensors", "--async-write",
                         "--lora-merge-cache", "--transformers-cache", "--safe-serialization",
                         "--no-safe-serialization")
#: Why each of those (and the other accepted-only mergekit-yaml flags) is not needed.
MERGEKIT_NOT_NEEDED = {
    "loader": "not needed by moemerge (it streams byte ranges of safetensors files and always writes "
              "safetensors)",
    "--trust-remote-code": "not needed: moemerge never runs model code",
}

#: `pma --schedule` (alias `--method`): the averages over one run's snapshots; `linear` and
#: `minus-sqrt` are Megatron-LM's coefficient schedules (methods/averages.py).
PMA_METHODS = ("sma", "wma", "ema", "linear", "minus-sqrt")
#: `pma --schedule` when not given (and the schedule a new `pma update` state gets).
DEFAULT_PMA_METHOD = "sma"
#: `pma --alpha`: the EMA weight of the newest snapshot.
DEFAULT_ALPHA = 0.2
#: `pma --last`: how many of the newest snapshots a pattern averages.
DEFAULT_LAST = 10
#: `pma --min-snapshots`: fewer snapshots than this is "nothing to do yet" (EXIT_NOT_READY);
#: from this many up to --last, the window is still filling and what there is is averaged.
DEFAULT_MIN_SNAPSHOTS = 1
#: The exit status of `pma` / `pma update` when fewer than --min-snapshots snapshots exist:
#: nothing was written, nothing is wrong (1 stays "an error"; 2 is argparse's usage error).
EXIT_NOT_READY = 3

# The resume journal gets an entry (an fsync of the shards, then a line per finished tensor)
# when any of the following is reached since the last entry (`engine.cadence`).
#: Output bytes of finished tensors (2 GiB).
JOURNAL_EVERY = 2 << 30
#: Finished tensors: a small output never reaches JOURNAL_EVERY bytes, and a kill would then
#: lose everything; at most one such entry per JOURNAL_MIN_SECONDS, as each costs fsyncs.
JOURNAL_EVERY_TENSORS = 64
#: Seconds since the last entry.
JOURNAL_EVERY_SECONDS = 30.0
#: Seconds at least between two entries due to JOURNAL_EVERY_TENSORS.
JOURNAL_MIN_SECONDS = 1.0
