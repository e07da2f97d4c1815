"""The Dask executor on a real `distributed.LocalCluster`: byte-identical to the local executor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import moemerge
from moemerge.engine.graph import build_graph, graph_summary
from moemerge.errors import MergeRuntimeError, MoemergeError
from tests.conftest import write_checkpoint

distributed = pytest.importorskip("distributed")

BIG = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each (what `--workers 2` starts)."""
    from moemerge.engine.cluster import start_client

    c, cluster = start_client(workers=2, scheduler=None, memory_budget=256 << 20)
    yield c
    c.close()
    cluster.close()


def _model(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        BIG: r(4, 96, 160),  # split into several units below
        "model.embed_tokens.weight": r(300, 64),
        "model.layers.0.input_layernorm.weight": r(64),
        "model.layers.0.self_attn.q_proj.weight": r(64, 64),
        "model.layers.1.self_attn.k_proj.weight": r(48, 64),
        "model.norm.weight": r(64),
        "model.position_ids": torch.arange(37, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("dask-inputs")
    base_seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed {base_seed}")
    return [write_checkpoint(root / f"m{i}", _model(base_seed + i), shards=2) for i in range(3)]


def _config(method: str, inputs: list[Path]) -> dict:
    base, *rest = [str(p) for p in inputs]
    if method in ("linear", "sma"):
        return {"merge_method": method, "models": [{"model": p, "parameters": {"weight": 1.0 + i}}
                                                 for i, p in enumerate([base, *rest])]} \
            if method == "linear" else {"merge_method": "sma", "models": [{"model": p} for p in [base, *rest]]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": rest[0]}],
                "parameters": {"t": 0.3}}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": base, "models": [{"model": p} for p in rest]}
    params = {"weight": 0.7, "density": 0.4}
    return {"merge_method": method, "base_model": base,
            "models": [{"model": p, "parameters": params} for p in rest]}


def _tensor_bytes(out: Path) -> dict[str, str]:
    return {k: v["sha256"] for k, v in json.loads((out / "moemerge-manifest.json").read_text())["tensors"].items()}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


# one method per family: elementwise, one-pass statistics, order statistics, random, per-row
@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties", "model_stock"])
def test_dask_output_is_byte_identical_to_local(method: str, inputs: list[Path], client, tmp_path: Path) -> None:
    cfg = _config(method, inputs)
    kw = dict(memory_budget="2MB", chunk_rows=40, unit_size="150KB", seed=11)
    local = moemerge.run(cfg, str(tmp_path / "local"), **kw)
    dask = moemerge.run(cfg, str(tmp_path / "dask"), client=client, **kw)
    tasks = build_graph(dask.plan)
    kinds = graph_summary(tasks)
    assert kinds.get("apply", 0) >= 2 and kinds.get("hash") == 1, kinds  # the big tensor was split
    if method != "linear":
        assert kinds.get("map", 0) >= 2 and kinds.get("reduce", 0) >= 1, kinds
    assert _files(tmp_path / "dask") == _files(tmp_path / "local")
    assert dask.checksums == local.checksums == _tensor_bytes(tmp_path / "dask")
    assert not (tmp_path / "dask" / ".moemerge-incomplete").exists()


def test_dask_zarr_output_matches_local_zarr(inputs: list[Path], client, tmp_path: Path) -> None:
    cfg = _config("ties", inputs)
    kw = dict(memory_budget="2MB", chunk_rows=40, unit_size="150KB", out_format="zarr")
    local = moemerge.run(cfg, str(tmp_path / "local.zarr"), **kw)
    dask = moemerge.run(cfg, str(tmp_path / "dask.zarr"), client=client, **kw)
    assert dask.checksums == local.checksums
    from moemerge.io.checkpoint import Checkpoint

    a, b = Checkpoint.open(str(tmp_path / "local.zarr")), Checkpoint.open(str(tmp_path / "dask.zarr"))
    for name, info in a.tensors.items():
        x, y = bytearray(info.nbytes), bytearray(info.nbytes)
        a.read_rows(name, 0, info.rows, memoryview(x))
        b.read_rows(name, 0, info.rows, memoryview(y))
        assert x == y, name


def test_dask_error_in_a_task_fails_the_run_with_that_error(inputs: list[Path], client, tmp_path: Path) -> None:
    # an integer tensor that differs between inputs is only seen while reading data
    bad = write_checkpoint(tmp_path / "bad", {**_model(5), "model.position_ids": torch.arange(37) * 2}, shards=2)
    cfg = {"merge_method": "linear", "models": [{"model": str(inputs[0]), "parameters": {"weight": 1}},
                                                {"model": str(bad), "parameters": {"weight": 1}}]}
    with pytest.raises(MergeRuntimeError, match="position_ids.*differs"):
        moemerge.run(cfg, str(tmp_path / "out"), client=client, memory_budget="2MB", unit_size="150KB")
    assert not (tmp_path / "out" / "moemerge-manifest.json").exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_dask_survives_a_killed_worker(inputs: list[Path], tmp_path: Path) -> None:
    from moemerge.engine.cluster import start_client

    cfg = _config("ties", inputs)
    kw = dict(memory_budget="1MB", chunk_rows=8, unit_size="40KB")
    local = moemerge.run(cfg, str(tmp_path / "local"), **kw)
    c, cluster = start_client(workers=2, scheduler=None, memory_budget=1 << 20)
    try:
        pids = list(c.run(os.getpid).values())
        done = threading.Event()
        killed: list[int] = []

        def killer() -> None:
            # once tasks have started finishing, kill one worker process outright
            while not done.is_set():
                if any(k.startswith("moemerge-") for k in c.who_has()):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                time.sleep(0.005)

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        try:
            res = moemerge.run(cfg, str(tmp_path / "dask"), client=c, **kw)
        finally:
            done.set()
            th.join()
        assert killed, "the run finished before a worker could be killed"
        assert pids[0] not in c.run(os.getpid).values()  # the nanny started a new process
    finally:
        c.close()
        cluster.close()
    assert _files(tmp_path / "dask") == _files(tmp_path / "local")
    assert res.checksums == local.checksums


def test_workers_and_scheduler_together_are_refused(inputs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(MoemergeError, match="not both"):
        moemerge.run(_config("linear", inputs), str(tmp_path / "o"), workers=2, scheduler="tcp://127.0.0.1:1")


def test_dask_to_object_storage_one_task_per_shard(inputs: list[Path], s3_server, tmp_path: Path) -> None:
    """Safetensors on S3: each shard's multipart upload is driven by the worker owning it."""
    import boto3
    import s3fs

    from moemerge.engine.cluster import start_client

    boto3.client("s3").create_bucket(Bucket="out")
    cfg = {**_config("dare_ties", inputs), "storage_options": {"client_kwargs": {"endpoint_url": s3_server},
                                                             "key": "testing", "secret": "testing"}}
    kw = dict(memory_budget="2MB", chunk_rows=40, shard_size="50KB", seed=3)
    local = moemerge.run(cfg, str(tmp_path / "local"), **kw)
    assert len(local.plan.shards) >= 2
    c, cluster = start_client(workers=2, scheduler=None, memory_budget=2 << 20)
    try:
        res = moemerge.run(cfg, "s3://out/merged", client=c, **kw)
    finally:
        c.close()
        cluster.close()
    assert graph_summary(build_graph(res.plan, by_shard=True)) == {"tasks": len(res.plan.shards),
                                                                   "shard": len(res.plan.shards)}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="testing", secret="testing")
    for name, data in _files(tmp_path / "local").items():
        assert fs.cat_file(f"out/merged/{name}") == data, name
    assert res.checksums == local.checksums
    assert fs.exists("out/merged/moemerge-manifest.json")
    assert not boto3.client("s3").list_multipart_uploads(Bucket="out").get("Uploads")


def test_graph_of_a_100b_moe_layout_is_in_the_thousands() -> None:
    """~90,000 tensors (headers only): thousands of tasks, small tensors grouped, big ones whole."""
    from moemerge.config import parse_config
    from moemerge.io.checkpoint import TensorInfo
    from moemerge.planner import build_plan

    layers, experts = 60, 496
    infos: dict[str, TensorInfo] = {}
    pos = 0

    def add(name: str, shape: tuple[int, ...]) -> None:
        nonlocal pos
        n = 2
        for d in shape:
            n *= d
        infos[name] = TensorInfo(name=name, dtype="BF16", shape=shape, file="model.safetensors", start=pos, nbytes=n)
        pos += n

    add("model.embed_tokens.weight", (128000, 4096))
    for i in range(layers):
        p = f"model.layers.{i}"
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(f"{p}.self_attn.{w}.weight", (1024, 4096))
        add(f"{p}.input_layernorm.weight", (4096,))
        add(f"{p}.post_attention_layernorm.weight", (4096,))
        add(f"{p}.mlp.gate.weight", (experts, 4096))
        for e in range(experts):
            for w, shape in (("gate_proj", (512, 2048)), ("up_proj", (512, 2048)), ("down_proj", (2048, 512))):
                add(f"{p}.mlp.experts.{e}.{w}.weight", shape)
    add("model.norm.weight", (4096,))
    params = sum(i.nbytes for i in infos.values()) // 2
    assert len(infos) > 89_000 and params > 90e9
    cfg = parse_config({"merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1}},
                                                             {"model": "/b", "parameters": {"weight": 1}}]})
    plan = build_plan(cfg, {"/a": infos, "/b": infos}, memory_budget=2 << 30, shard_size=5 << 30, seed=0)
    tasks = build_graph(plan)
    kinds = graph_summary(tasks)
    assert 1_000 <= kinds["tasks"] <= 5_000, kinds
    # only the 1 GB embedding is bigger than a unit: split into row ranges, hashed once written
    assert set(kinds) == {"tasks", "unit", "apply", "hash"} and kinds["hash"] == 1, kinds
    assert kinds["unit"] < len(infos) / 20  # small tensors are grouped
    per_task = [t.in_bytes for t in tasks]
    assert max(per_task) <= 300 << 20 and sum(per_task) == plan.bytes_read
    covered: dict[int, int] = {}
    for t in tasks:
        for p in t.pieces:
            covered[p.ti] = covered.get(p.ti, 0) + (p.r1 - p.r0)
    assert covered == {ti: t.rows for ti, t in enumerate(plan.tensors)}  # every row exactly once


def _worker_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) * 1024


@pytest.mark.parametrize("method", ["linear", pytest.param("ties", marks=pytest.mark.slow)])
def test_dask_worker_memory_stays_under_1gib(method: str, big_inputs: list[Path], tmp_path: Path) -> None:
    """Two workers, `--memory-budget 128MB` each, three inputs of one 512 MiB tensor."""
    from moemerge.engine.cluster import start_client
    from moemerge.verify import verify

    ins = big_inputs
    if method == "linear":
        cfg = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1}} for p in ins]}
    else:
        cfg = {"merge_method": "ties", "base_model": str(ins[0]),
               "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.3}} for p in ins[1:]]}
    c, cluster = start_client(workers=2, scheduler=None, memory_budget=128 << 20)
    try:
        res = moemerge.run(cfg, str(tmp_path / "out"), client=c, memory_budget="128MB")
        peaks = c.run(_worker_peak)
        tasks = graph_summary(build_graph(res.plan))
    finally:
        c.close()
        cluster.close()
    assert tasks["tasks"] >= 6, tasks  # the 1.5 GB of input really was spread over many tasks
    assert len(peaks) == 2 and all(p < 1 << 30 for p in peaks.values()), peaks
    verify(str(tmp_path / "out"))
    shutil.rmtree(tmp_path / "out")


def test_unreachable_scheduler_fails_before_any_output(inputs: list[Path], tmp_path: Path, run_cli) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_config("linear", inputs)))
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--scheduler", f"tcp://127.0.0.1:{port}", "--no-progress")
    assert code != 0 and "cannot reach the Dask scheduler" in err and f"127.0.0.1:{port}" in err
    assert not (tmp_path / "out").exists()


def test_dask_resumes_a_crashed_local_run(inputs: list[Path], client, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import moemerge.api
    from moemerge.errors import OutputError
    from moemerge.io.journal import JOURNAL_NAME
    from moemerge.io.writer import LocalModelWriter

    cfg = _config("ties", inputs)
    kw = dict(memory_budget="2MB", chunk_rows=40, unit_size="150KB")
    clean = moemerge.run(cfg, str(tmp_path / "clean"), **kw)
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1)
    real, calls = LocalModelWriter.write_rows, [0]

    def failing(self, name, row_start, data):
        calls[0] += 1
        if calls[0] == 14:  # the big tensor (10 chunks) and a few small ones are done
            raise OutputError("simulated crash")
        return real(self, name, row_start, data)

    with monkeypatch.context() as m:
        m.setattr(LocalModelWriter, "write_rows", failing)
        with pytest.raises(OutputError):
            moemerge.run(cfg, str(tmp_path / "out"), **kw)
    journal = (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()
    assert len(journal) > 1
    res = moemerge.run(cfg, str(tmp_path / "out"), client=client, resume=True, **kw)
    assert res.checksums == clean.checksums
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_dask_progress_counts_every_task_and_shows_the_dashboard(inputs: list[Path], client, tmp_path: Path) -> None:
    import io

    from moemerge.engine.progress import Progress

    stream = io.StringIO()
    prog = Progress(stream=stream, interval=0.0, rich_bar=False)
    res = moemerge.run(_config("ties", inputs), str(tmp_path / "out"), client=client, progress=prog,
                       memory_budget="2MB", chunk_rows=40, unit_size="150KB")
    text = stream.getvalue()
    assert "Dask dashboard: http" in text
    assert prog.total > 0 and prog.done == prog.total, (prog.done, prog.total)
    assert sum(t.in_bytes for t in build_graph(res.plan)) == prog.total == res.plan.bytes_read
    assert "100.0%" in text.splitlines()[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_dask_on_cuda_matches_cpu(inputs: list[Path], client, tmp_path: Path) -> None:
    cfg = _config("slerp", inputs)
    kw = dict(memory_budget="2MB", chunk_rows=40, unit_size="150KB")
    cpu = moemerge.run(cfg, str(tmp_path / "cpu"), client=client, **kw)
    gpu = moemerge.run(cfg, str(tmp_path / "gpu"), client=client, device="cuda", **kw)
    from safetensors.torch import load_file

    def tensors(out: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    a, b = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    assert a.keys() == b.keys()
    for name in a:  # GPU kernels may round differently: within one bf16 step
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=2 ** -7, atol=1e-6, msg=name)


def test_plan_with_workers_reports_the_split(inputs: list[Path], tmp_path: Path, run_cli) -> None:
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_config("ties", inputs)))
    code, out, err = run_cli("plan", cfg, "--workers", "4", "--unit-size", "150KB", "--memory-budget", "2MB", "--json")
    assert code == 0, err
    dask = json.loads(out)["dask"]
    p = moemerge.plan(_config("ties", inputs), unit_size="150KB", memory_budget="2MB")
    kinds = graph_summary(build_graph(p))
    assert dask["tasks"] == kinds["tasks"] and f"map {kinds['map']}" in dask["by_kind"]
    assert dask["tasks_per_worker"] == f"~{-(-kinds['tasks'] // 4)}"
    code, out, err = run_cli("plan", cfg, "s3://bucket/out", "--workers", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["dask"]["by_kind"].startswith("shard ")  # object storage: a task per shard


def test_cli_workers_starts_a_local_cluster_and_matches_local(inputs: list[Path], tmp_path: Path, run_cli) -> None:
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps(_config("dare_ties", inputs)))
    common = ["--memory-budget", "2MB", "--unit-size", "150KB", "--seed", "5", "--no-progress"]
    code, _, err = run_cli("run", cfg, tmp_path / "local", *common)
    assert code == 0, err
    code, out, err = run_cli("run", cfg, tmp_path / "dask", "--workers", "2", *common)
    assert code == 0, err
    assert _files(tmp_path / "dask") == _files(tmp_path / "local")
    code, _, err = run_cli("verify", tmp_path / "dask")
    assert code == 0, err


@pytest.mark.parametrize("method,out_format", [("wma", "safetensors"), ("ema", "zarr")])
def test_dask_pma_update_writes_the_same_output_and_state_as_local(method: str, out_format: str, client,
                                                                   tmp_path: Path) -> None:
    """Build, then one nightly update, in one process and on Dask (split tensors included:
    small units): the outputs' checksums and the states' sums are the same bytes."""
    from moemerge.pma.state import StateStore
    from moemerge.pma.update import update

    seed = int.from_bytes(os.urandom(4), "little")
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path / "ckpt" / f"step-{step}", _model(seed + step))
    pattern = str(tmp_path / "ckpt" / "step-*")

    def state_bytes(state: Path) -> dict[str, bytes]:
        cur = StateStore(str(state)).current()
        assert cur is not None
        try:
            out = {}
            for name, t in cur.sums.tensors.items():
                buf = bytearray(t.nbytes)
                cur.sums.read_rows(name, 0, t.rows, memoryview(buf))
                out[name] = bytes(buf)
            return out
        finally:
            cur.close()

    got = {}
    for where, kw in (("local", {}), ("dask", {"client": client})):
        state, out = tmp_path / where / "state", tmp_path / where / "out"
        opts = dict(out_format=out_format, chunk_rows=16, memory_budget="1MB", unit_size=40_000, **kw)
        assert update(str(state), pattern, str(out), method=method, last=3, before_step=4, **opts).action == "built"
        res = update(str(state), pattern, str(out), **opts)
        assert res.action == "updated" and res.steps[-1] == 4
        man = json.loads((out / "moemerge-manifest.json").read_text())
        got[where] = ({n: t["sha256"] for n, t in man["tensors"].items()}, state_bytes(state),
                      res.bytes_read, res.state_bytes_read)
    assert got["dask"] == got["local"]
