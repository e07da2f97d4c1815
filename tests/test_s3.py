"""Merges with inputs and output on a real S3-compatible server (moto, see `s3_server`):
byte-exact against the same merge done locally, one clear error per storage failure, aborted
multipart uploads leave nothing behind, transient read errors are retried."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import pytest
import s3fs
import torch
from conftest import write_yaml

from moemerge.io import s3_writer, storage

INDEX = "model.safetensors.index.json"
MANIFEST = "moemerge-manifest.json"
MiB = 2**20


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        # 10 MiB of fp32: with 5 MiB parts its shard is a three-part multipart upload (the last
        # part a few hundred bytes), with two parts in flight at once
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(5, 512, 1024, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 32, generator=g),
        "model.norm.weight": torch.randn(32, generator=g) + 1,
        "model.embed_tokens.weight": torch.randn(100, 32, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """5 MiB parts (the S3 minimum) and retries without waiting."""
    monkeypatch.setattr(s3_writer, "DEFAULT_PART_SIZE", s3_writer.S3_MIN_PART)
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(attempts=5, base_delay=0.0))


@pytest.fixture
def models(ckpt_factory, s3_server, fast) -> dict[str, object]:
    """Two models on local disk and the same two uploaded to s3://models/."""
    boto3.client("s3").create_bucket(Bucket="models")
    boto3.client("s3").create_bucket(Bucket="out")
    a = ckpt_factory("a", _tensors(1), shards=2)
    b = ckpt_factory("b", _tensors(2), shards=2)
    (a / "tokenizer.json").write_text('{"tok": 1}')
    fs = s3fs.S3FileSystem()
    for p in (a, b):
        for f in sorted(p.iterdir()):
            fs.put_file(str(f), f"models/{p.name}/{f.name}")
    return {"a": a, "b": b, "fs": fs}


def _config(tmp_path: Path, a: str, b: str, name: str = "merge.yml") -> Path:
    return write_yaml(tmp_path / name, {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                   {"model": str(b), "parameters": {"weight": 0.7}}],
        "dtype": "float32",
    })


def _objects(fs: s3fs.S3FileSystem, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.find(prefix))
    except FileNotFoundError:
        return []


def _open_uploads(bucket: str) -> list[dict]:
    return boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _count_parts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = s3_writer._S3Multipart._upload_part

    def spy(self) -> None:
        sizes.append(len(self._buf))
        real(self)

    monkeypatch.setattr(s3_writer._S3Multipart, "_upload_part", spy)
    return sizes


def test_s3_merge_equals_local_merge_byte_for_byte(models, tmp_path, run_cli, monkeypatch):
    local_out = tmp_path / "local-out"
    code, _, err = run_cli("run", _config(tmp_path, models["a"], models["b"]), local_out,
                           "--shard-size", "4MB", "--no-progress")
    assert code == 0, err
    parts = _count_parts(monkeypatch)
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b", "s3.yml")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--shard-size", "4MB", "--no-progress")
    assert code == 0, err
    fs: s3fs.S3FileSystem = models["fs"]
    got = _objects(fs, "out/merged")
    assert got == sorted(p.name for p in local_out.iterdir())
    assert len([n for n in got if n.endswith(".safetensors")]) >= 2
    assert len(parts) >= 3 and all(n >= 5 * MiB for n in parts[:-1])  # a real multipart upload
    for name in got:
        if name in (MANIFEST, "moemerge-config.yml", "README.md", "mergekit_config.yml"):  # they name the inputs
            continue
        assert fs.cat_file(f"out/merged/{name}") == (local_out / name).read_bytes(), name
    m_s3 = json.loads(fs.cat_file(f"out/merged/{MANIFEST}"))
    m_local = json.loads((local_out / MANIFEST).read_text())
    assert m_s3["tensors"] == m_local["tensors"] and m_s3["files"] == m_local["files"]
    for name, t in m_s3["tensors"].items():  # the checksums are of what is stored
        assert len(t["sha256"]) == 64
    assert _open_uploads("out") == []
    # the output is itself a readable input, and verify agrees with its manifest
    code, out, err = run_cli("inspect", "s3://out/merged")
    assert code == 0 and "gate_up_proj" in out, err


def test_existing_output_is_refused_unless_overwrite(models, tmp_path, run_cli):
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    assert run_cli("run", cfg, "s3://out/m", "--no-progress")[0] == 0
    code, _, err = run_cli("run", cfg, "s3://out/m", "--no-progress")
    assert code != 0 and "already holds a finished merge" in err and "s3://out/m" in err
    code, _, err = run_cli("run", cfg, "s3://out/m", "--no-progress", "--overwrite")
    assert code == 0, err


def _assert_one_clear_error(code: int, err: str, *names: str) -> None:
    assert code != 0
    assert err.startswith("moemerge: error:"), err
    assert "Traceback" not in err
    for n in names:
        assert n in err, err


def test_missing_shard_object_is_one_clear_error(models, tmp_path, run_cli):
    fs: s3fs.S3FileSystem = models["fs"]
    fs.rm("models/b/model-00002-of-00002.safetensors")
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    _assert_one_clear_error(code, err, "s3://models/b", "model-00002-of-00002.safetensors")
    assert not {INDEX, MANIFEST} & set(_objects(fs, "out/merged"))


def test_missing_output_bucket_is_one_clear_error(models, tmp_path, run_cli):
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://no-such-bucket/merged", "--no-progress")
    _assert_one_clear_error(code, err, "no-such-bucket", "does not exist")


def test_missing_input_bucket_is_one_clear_error(models, tmp_path, run_cli):
    cfg = _config(tmp_path, "s3://models/a", "s3://gone-bucket/b")
    code, _, err = run_cli("run", cfg, str(tmp_path / "out"), "--no-progress")
    _assert_one_clear_error(code, err, "s3://gone-bucket/b")
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_wrong_credentials_are_one_clear_error(models, tmp_path, run_cli, monkeypatch):
    import moto.settings

    secret = "WRONG-SECRET-do-not-print-1234"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, out, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    _assert_one_clear_error(code, err, "s3://out", "denied")
    assert secret not in err and secret not in out
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_wrong_credentials_for_inputs_name_the_input(models, tmp_path, run_cli, monkeypatch):
    import moto.settings

    secret = "WRONG-SECRET-do-not-print-1234"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, out, err = run_cli("run", cfg, str(tmp_path / "out"), "--no-progress")
    assert secret not in err and secret not in out
    assert not (tmp_path / "out" / MANIFEST).exists()
    _assert_one_clear_error(code, err, "s3://models/a")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert not {INDEX, MANIFEST} & set(_objects(s3fs.S3FileSystem(key="testing", secret="testing"), "out/merged"))


def test_failed_part_upload_aborts_and_leaves_no_object(models, tmp_path, run_cli, monkeypatch):
    real = s3fs.S3FileSystem.call_s3
    calls: list[int] = []

    def flaky(self, method, *args, **kw):
        if method == "upload_part" and kw.get("PartNumber") == 2:
            calls.append(2)
            raise PermissionError("injected: part 2 refused")
        return real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", flaky)
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress", "--shard-size", "4MB")
    _assert_one_clear_error(code, err, "s3://out/merged/model-", "upload part 2", "injected")
    assert calls == [2]  # a permission error is not retried
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", real)
    assert _objects(models["fs"], "out/merged") == []
    assert _open_uploads("out") == []


def test_transient_part_errors_are_retried(models, tmp_path, run_cli, monkeypatch):
    real = s3fs.S3FileSystem.call_s3
    failures: list[int] = []

    def flaky(self, method, *args, **kw):
        if method == "upload_part" and len(failures) < 2:
            failures.append(kw["PartNumber"])
            raise ConnectionResetError("injected: connection reset")
        return real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", flaky)
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    assert code == 0, err
    assert len(failures) == 2 and MANIFEST in _objects(models["fs"], "out/merged")


def test_transient_read_errors_are_retried_and_exact(models, tmp_path, run_cli, monkeypatch):
    local_out = tmp_path / "local-out"
    assert run_cli("run", _config(tmp_path, models["a"], models["b"]), local_out, "--no-progress")[0] == 0
    real = s3fs.S3FileSystem._cat_file
    failures: list[tuple[int, int]] = []

    async def flaky(self, path, version_id=None, start=None, end=None, **kw):
        if start and len(failures) < 2:  # a data read (headers start at 0 and 8)
            failures.append((start, end))
            raise TimeoutError("injected: read timed out")
        return await real(self, path, version_id=version_id, start=start, end=end, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", flaky)
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b", "s3.yml")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    assert code == 0, err
    assert len(failures) == 2
    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", real)
    fs: s3fs.S3FileSystem = models["fs"]
    for f in local_out.glob("*.safetensors"):
        assert fs.cat_file(f"out/merged/{f.name}") == f.read_bytes()


def test_persistent_read_errors_name_the_object_after_the_last_retry(models, tmp_path, run_cli, monkeypatch):
    calls: list[int] = []

    real = s3fs.S3FileSystem._cat_file

    async def broken(self, path, version_id=None, start=None, end=None, **kw):
        if start is None:  # whole small files (the index) are not read through moemerge's ranges
            return await real(self, path, version_id=version_id, start=start, end=end, **kw)
        calls.append(start)
        raise ConnectionResetError("injected: connection reset by peer")

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", broken)
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, str(tmp_path / "out"), "--no-progress")
    _assert_one_clear_error(code, err, "s3://models/", "after 5 attempts", "read bytes")
    assert len(calls) >= 5


def test_transient_error_classification():
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    transient = [
        TimeoutError(), ConnectionResetError(), OSError(errno.ETIMEDOUT, "t"),
        EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
        client_error("SlowDown", 503), client_error("InternalError", 500),
        client_error("ThrottlingException", 400),
    ]
    wrapped = OSError(errno.EIO, "wrapped")
    wrapped.__cause__ = client_error("ServiceUnavailable", 503)
    transient.append(wrapped)
    for e in transient:
        assert storage.is_transient(e), repr(e)
    for e in [FileNotFoundError("k"), PermissionError("denied"), client_error("AccessDenied", 403),
              client_error("NoSuchKey", 404), ValueError("x"), OSError(errno.EIO, "bad")]:
        assert not storage.is_transient(e), repr(e)


def test_secrets_in_storage_options_never_reach_errors(tmp_path):
    secret = "sEcReT-value-9876"
    msg = storage.redact(f"s3://b/k: failed with key={secret}", {"secret": secret, "client_kwargs": {}})
    assert secret not in msg and "***" in msg


def test_secret_key_appears_nowhere(models, tmp_path, run_cli, caplog, monkeypatch):
    secret = "RECOGNIZABLE-secret-key-5555"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = write_yaml(tmp_path / "creds.yml", {
        "merge_method": "linear",
        "models": [{"model": "s3://models/a", "parameters": {"weight": 0.5}},
                   {"model": "s3://models/b", "parameters": {"weight": 0.5}}],
        "storage_options": {"key": "testing", "secret": secret},
    })
    caplog.set_level("DEBUG")
    code, out, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    assert code == 0, err
    code2, out2, err2 = run_cli("run", cfg, "s3://no-such-bucket/x", "--no-progress")
    assert code2 != 0
    fs: s3fs.S3FileSystem = models["fs"]
    stored = b"".join(fs.cat_file(f"out/merged/{n}") for n in _objects(fs, "out/merged")
                      if not n.endswith(".safetensors"))
    for text in (out, err, out2, err2, caplog.text, stored.decode()):
        assert secret not in text


def test_prefix_holding_another_model_is_refused(models, tmp_path, run_cli):
    cfg = write_yaml(tmp_path / "one.yml", {"merge_method": "linear",
                                            "models": [{"model": "s3://models/a", "parameters": {"weight": 1.0}}]})
    code, _, err = run_cli("run", cfg, "s3://models/b", "--no-progress")
    _assert_one_clear_error(code, err, "s3://models/b", "not a moemerge output")
    assert "model-00001-of-00002.safetensors" in _objects(models["fs"], "models/b")


def test_s3_client_retries_sit_under_ours_unless_the_user_sets_them() -> None:
    """botocore's own retries are cut to 2 (ours retry with backoff around them); a user's
    `config_kwargs` win."""
    fs, _ = storage.resolve("s3://bucket/key", {"anon": True, "skip_instance_cache": True})
    assert fs.config_kwargs["retries"] == {"max_attempts": 2, "mode": "standard"}
    mine = {"max_attempts": 9, "mode": "adaptive"}
    fs, _ = storage.resolve("s3://bucket/key", {"anon": True, "skip_instance_cache": True,
                                               "config_kwargs": {"retries": mine, "connect_timeout": 3}})
    assert fs.config_kwargs == {"retries": mine, "connect_timeout": 3}
    local, _ = storage.resolve("/tmp/x")
    assert storage.is_local(local)
