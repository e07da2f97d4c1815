"""One conformance suite for the storage boundary — read headers, read exact row ranges, write
an output, commit it — run against local disk, `memory://` and an S3-compatible server.

Each backend is a subclass supplying `base_url` (an empty location) and `put` (place a local
checkpoint there); the checks live once, in `StorageConformance`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import write_checkpoint

from moemerge import api
from moemerge.errors import CheckpointError
from moemerge.io import storage
from moemerge.io.checkpoint import INDEX_NAME, Checkpoint
from moemerge.io.dtypes import itemsize
from moemerge.io.writer import MANIFEST_NAME

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "model.embed_tokens.weight": torch.randn(50, 24, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 16, 24, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(24, 24, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(24, generator=g),
        "model.step": torch.tensor(3),
    }


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else \
        t.reshape(1).view(torch.uint8).numpy().tobytes()


def _listing(url: str) -> set[str]:
    fs, root = storage.resolve(url)
    fs.invalidate_cache()
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


class StorageConformance:
    """The checks; subclasses provide `base_url` and `put`."""

    @pytest.fixture
    def base_url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def put(self, local: Path, url: str) -> None:
        fs, root = storage.resolve(url)
        fs.makedirs(root, exist_ok=True)
        for f in sorted(local.iterdir()):
            fs.pipe_file(storage.join(root, f.name), f.read_bytes())

    @pytest.fixture
    def ckpt_url(self, base_url: str, tmp_path: Path) -> str:
        local = write_checkpoint(tmp_path / "src", _tensors(), shards=2)
        url = f"{base_url}/ckpt"
        self.put(local, url)
        return url

    def test_open_reads_every_header(self, ckpt_url: str) -> None:
        ck = Checkpoint.open(ckpt_url)
        try:
            want = _tensors()
            assert set(ck.tensors) == set(want)
            for name, t in want.items():
                info = ck.tensors[name]
                assert info.shape == tuple(t.shape) and _DTYPES[info.dtype] == t.dtype
                assert info.nbytes == t.numel() * t.element_size()
        finally:
            ck.close()

    def test_read_rows_returns_exact_bytes_of_random_ranges(self, ckpt_url: str) -> None:
        g = torch.Generator().manual_seed(0)
        ck = Checkpoint.open(ckpt_url)
        try:
            for name, t in _tensors().items():
                raw = _raw(t)
                info = ck.tensors[name]
                for _ in range(6):
                    r0 = int(torch.randint(0, info.rows, (1,), generator=g))
                    r1 = int(torch.randint(r0, info.rows + 1, (1,), generator=g))
                    buf = bytearray((r1 - r0) * info.row_bytes + 5)  # bigger than needed
                    ck.read_rows(name, r0, r1, memoryview(buf))
                    assert bytes(buf[:(r1 - r0) * info.row_bytes]) == \
                        raw[r0 * info.row_bytes:r1 * info.row_bytes], (name, r0, r1)
        finally:
            ck.close()

    def test_missing_checkpoint_is_a_checkpoint_error_naming_it(self, base_url: str) -> None:
        with pytest.raises(CheckpointError, match="nothing-here"):
            Checkpoint.open(f"{base_url}/nothing-here")

    def _write_copy(self, ckpt_url: str, out: str, *, commit: bool) -> set[str]:
        """Copy `ckpt_url` to `out` through the writer (rows in plan order, 7 at a time)."""
        cfg = {"merge_method": "linear", "models": [{"model": ckpt_url, "parameters": {"weight": 1.0}}]}
        p = api.plan(cfg, shard_size=2000)  # several shards
        ck = Checkpoint.open(ckpt_url)
        w = api.open_writer(out, p, overwrite=False)
        try:
            w.prepare()
            for t in p.tensors:
                info = ck.tensors[t.name]
                rb = t.row_len * itemsize(t.out_dtype)
                for r0 in range(0, t.rows, 7):
                    r1 = min(t.rows, r0 + 7)
                    buf = bytearray((r1 - r0) * rb)
                    ck.read_rows(t.name, r0, r1, memoryview(buf))
                    assert info.row_bytes == rb
                    w.write_rows(t.name, r0, memoryview(buf))
            before = _listing(out)
            if commit:
                w.finish(side_files={"config.json": b'{"model_type": "test"}'},
                         index={"metadata": {}, "weight_map": {t.name: t.out_file for t in p.tensors}},
                         manifest={"files": {s.file: s.size for s in p.shards}})
            else:
                w.close()
        except BaseException:
            w.close()
            raise
        finally:
            ck.close()
        assert len(p.shards) >= 2
        return before

    def test_write_then_commit_gives_the_same_tensors(self, ckpt_url: str, base_url: str) -> None:
        out = f"{base_url}/out"
        before = self._write_copy(ckpt_url, out, commit=True)
        assert INDEX_NAME not in before and MANIFEST_NAME not in before  # nothing looked finished
        after = _listing(out)
        assert {INDEX_NAME, MANIFEST_NAME, "config.json"} <= after
        manifest = json.loads(fsspec.open(f"{out}/{MANIFEST_NAME}").open().read())
        ck = Checkpoint.open(out)
        try:
            assert ck.files == manifest["files"]
            for name, t in _tensors().items():
                info = ck.tensors[name]
                buf = bytearray(info.nbytes)
                ck.read_rows(name, 0, info.rows, memoryview(buf))
                assert bytes(buf) == _raw(t), name
        finally:
            ck.close()
        # a finished output is refused without overwrite
        from moemerge.errors import OutputError

        with pytest.raises(OutputError, match="already holds a finished merge"):
            api.check_output(out, overwrite=False)

    def test_abandoned_output_never_looks_finished(self, ckpt_url: str, base_url: str) -> None:
        out = f"{base_url}/abandoned"
        self._write_copy(ckpt_url, out, commit=False)
        left = _listing(out)
        assert INDEX_NAME not in left and MANIFEST_NAME not in left
        with pytest.raises(CheckpointError):
            Checkpoint.open(out)


class TestLocalDisk(StorageConformance):
    @pytest.fixture
    def base_url(self, tmp_path: Path) -> str:
        (tmp_path / "store").mkdir()
        return str(tmp_path / "store")


class TestMemory(StorageConformance):
    @pytest.fixture
    def base_url(self):
        root = f"memory://conformance-{uuid.uuid4().hex[:8]}"
        yield root
        fs, path = storage.resolve(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)


class TestS3(StorageConformance):
    @pytest.fixture
    def base_url(self, s3_server: str) -> str:
        import boto3

        boto3.client("s3").create_bucket(Bucket="conformance")
        return "s3://conformance/store"

    def test_abandoned_output_leaves_no_object(self, ckpt_url: str, base_url: str) -> None:
        self._write_copy(ckpt_url, f"{base_url}/abandoned", commit=False)
        assert _listing(f"{base_url}/abandoned") == set()
