"""Shared fixtures: tiny checkpoints written on the fly, and the CLI run in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from typing import Any
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moemerge.cli import main


def write_checkpoint(
    path: Path | str,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict | None = None,
    index: bool | None = None,
) -> Path:
    """Save `tensors` as an HF directory: `shards` files (+ index when sharded or `index`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1 and not index:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        wmap = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k].contiguous() for k in names[s * per:(s + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            wmap.update({k: fname for k in part})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wmap})
        )
    (path / "config.json").write_text(json.dumps(config or {"model_type": "test", "num_hidden_layers": 2}))
    return path


#: The memory tests' inputs: one bf16 tensor of 512 MiB per checkpoint.
BIG_SHAPE = (16384, 16384)
BIG_NAME = "weight"


@pytest.fixture(scope="session")
def big_inputs(tmp_path_factory: pytest.TempPathFactory):
    """Three single-tensor checkpoints of 512 MiB each, streamed to disk (the generator holds
    ~16 MB); made once per session for every memory test."""
    import shutil

    from moemerge.synthetic import make_single_tensor_checkpoint

    root = tmp_path_factory.mktemp("memory")
    try:
        yield [make_single_tensor_checkpoint(root / f"in{i}", BIG_NAME, BIG_SHAPE, "BF16", seed=10 + i)
               for i in range(3)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ckpt_factory(tmp_path: Path) -> Callable[..., Path]:
    """`ckpt_factory(name, tensors, **kw)` writes a checkpoint under tmp_path and returns it."""

    def make(name: str, tensors: dict[str, torch.Tensor], **kw) -> Path:
        return write_checkpoint(tmp_path / name, tensors, **kw)

    return make


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the CLI's `--shard-size` go below 1 MB: tiny test models need several shards."""
    from moemerge import settings

    monkeypatch.setattr(settings, "MIN_SHARD_SIZE", 1)


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """Run `moemerge ARGS` in-process; returns (exit code, stdout, stderr)."""

    def call(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        import moemerge.cli as cli
        from rich.console import Console

        monkeypatch.setattr(cli, "_out", Console(file=out, width=200, highlight=False, soft_wrap=True))
        monkeypatch.setattr(cli, "_err", Console(file=err, width=200, highlight=False, soft_wrap=True))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse errors
                code = int(e.code or 0)
        return code, out.getvalue(), err.getvalue()

    return call


def write_yaml(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _quiet_threads() -> None:
    # keep torch to the machine's two cores; tests run many tiny ops
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3-compatible server (moto) on 127.0.0.1; yields its endpoint URL.

    Sets `AWS_ENDPOINT_URL`, dummy credentials and a region, so s3fs and boto3 find it the way
    they find a real one. Filesystem instance caches are cleared around each test.
    """
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its state per process, not per server: start every test from an empty one
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    fsspec.AbstractFileSystem.clear_instance_cache()
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
    try:
        yield endpoint
    finally:
        fsspec.AbstractFileSystem.clear_instance_cache()
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
        except ImportError:
            pass
        server.stop()


def golden_paths(doc: Any, root: Path) -> Any:
    """A golden config (tests/golden) with its `inputs/...` model paths made absolute under `root`."""
    if isinstance(doc, dict):
        return {k: golden_paths(v, root) for k, v in doc.items()}
    if isinstance(doc, list):
        return [golden_paths(v, root) for v in doc]
    return str(root / doc) if isinstance(doc, str) and doc.startswith("inputs/") else doc
