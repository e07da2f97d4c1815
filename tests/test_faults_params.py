"""Issue 11, rows 7, 10, 11 and 12 (part): parameters out of range are refused before work;
the Dask dashboard listens on loopback; S3 multipart uploads are never left open; statistics
methods refuse NaN/Inf inputs naming tensor and model; malformed storage_options are one line."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import boto3
import pytest
import s3fs
import torch
from conftest import write_yaml
from test_s3 import _config, _objects, _open_uploads, fast, models  # noqa: F401  (fixtures)

from moemerge.config import parse_config
from moemerge.errors import ConfigError
from moemerge.methods import REGISTRY
from moemerge.methods.base import Interval

INDEX = "model.safetensors.index.json"
MANIFEST = "moemerge-manifest.json"


def _tensors(seed: int, nan: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.layers.0.mlp.w.weight": torch.randn(16, 8, generator=g),
        "model.layers.1.mlp.w.weight": torch.randn(16, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g) + 1,
    }
    if nan:
        t["model.layers.1.mlp.w.weight"][3, 5] = float("nan")
    return t


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture
def three(ckpt_factory) -> dict[str, Path]:
    return {n: ckpt_factory(n, _tensors(i + 7)) for i, n in enumerate(("base", "a", "b"))}


# -- row 7: parameters out of range --------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("density", [1.5, -1])
def test_density_out_of_range_is_refused_before_any_output(three, tmp_path, run_cli, method, density):
    before = {n: _digests(p) for n, p in three.items()}
    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": method, "base_model": str(three["base"]),
        "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0, "density": density}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    })
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 1
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    for part in (method, "`density`", repr(float(density)) if isinstance(density, float) else str(density),
                 "[0, 1]", str(three["a"]), "models[0].parameters.density"):
        assert part in line, (part, line)
    assert not out.exists()  # nothing written, not even the directory
    assert {n: _digests(p) for n, p in three.items()} == before


def test_density_zero_and_one_are_accepted_and_zero_gives_the_base(three, tmp_path, run_cli):
    from safetensors.torch import load_file

    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": "ties", "base_model": str(three["base"]),
        "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0, "density": 0}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0, "density": 0.0}}],
    })
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    base = load_file(str(three["base"] / "model.safetensors"))
    assert all(torch.equal(got[k], base[k]) for k in base)
    assert run_cli("verify", tmp_path / "out")[0] == 0


def test_one_bad_gradient_entry_is_named(three, tmp_path, run_cli):
    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": "ties", "base_model": str(three["base"]),
        "parameters": {"density": [0.2, 0.5, 1.25, 0.7]},
        "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0}}],
    })
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 1 and "Traceback" not in err
    assert "`parameters.density[2]`" in err and "1.25" in err and "[0, 1]" in err
    assert "layer gradient [0.2, 0.5, 1.25, 0.7]" in err and "every model" in err
    assert not (tmp_path / "out").exists()


def test_filter_rule_value_out_of_range_is_named(three):
    doc = {"merge_method": "slerp", "base_model": str(three["base"]),
           "parameters": {"t": [{"filter": "mlp", "value": 1.2}, {"value": 0.5}]},
           "models": [{"model": str(three["base"])}, {"model": str(three["a"])}]}
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert "`parameters.t[0].value`" in str(e.value) and "tensors matching 'mlp'" in str(e.value)
    assert "slerp" in str(e.value) and "[0, 1]" in str(e.value) and "1.2" in str(e.value)


def test_all_problems_are_reported_at_once(three):
    doc = {"merge_method": "della", "base_model": str(three["base"]),
           "parameters": {"lambda": 1.0, "normalize": 3},
           "models": [{"model": str(three["a"]), "parameters": {"weight": 1.0, "density": 2, "epsilon": -0.1}},
                      {"model": str(three["b"]), "parameters": {"weight": 1.0, "density": [0.5, -0.5]}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    msg = str(e.value)
    assert msg.count("\n") == 4, msg  # one line each: density, epsilon, normalize, the gradient entry
    assert "`models[1].parameters.density[1]`" in msg and "`parameters.normalize`" in msg


def _neighbours(r: Interval, integer: bool) -> tuple[list[float], list[float]]:
    """(values just inside, values just outside) an interval's ends."""
    inside, outside = [], []
    for end, open_, sign in ((r.lo, r.lo_open, -1), (r.hi, r.hi_open, 1)):
        if end is None:
            inside.append(sign * 10**6)
            continue
        step = 1 if integer else max(1e-6, abs(end) * 1e-6)
        inside.append(end - sign * step if open_ else end)
        outside.append(end if open_ else end + sign * step)
    if integer:
        outside.append(inside[0] + 0.5)  # not an integer
    return inside, outside


_CASES = [(m.name, p.name) for m in REGISTRY.values() for p in m.params if p.kind != "bool"]


def _doc(method_name: str, param: str, value: float, paths: dict[str, Path]) -> dict:
    method = REGISTRY[method_name]
    spec = method.spec(param)
    assert spec is not None
    n = max(2, method.min_inputs)
    if method.max_inputs is not None:
        n = min(n, method.max_inputs)
    names = ["a", "b"][:n] if n <= 2 else ["a", "b", "base"][:n]
    models = [{"model": str(paths[x]), "parameters": {}} for x in names]
    params: dict = {}
    for m in models:  # required per-model parameters, e.g. weight
        for s in method.params:
            if s.scope == "model" and s.default is None:
                m["parameters"][s.name] = 1.0
    for s in method.params:
        if s.scope == "global" and s.default is None:
            params[s.name] = 0.5
    if spec.scope == "model":
        models[0]["parameters"][param] = value
    else:
        params[param] = value
    doc = {"merge_method": method_name, "models": models, "parameters": params}
    if method.base != "none":
        doc["base_model"] = str(paths["base"])
    return doc


@pytest.mark.parametrize(("method_name", "param"), _CASES, ids=[f"{m}-{p}" for m, p in _CASES])
def test_every_declared_range_is_enforced(method_name, param, tmp_path):
    """Parametrized over the registry: just outside a declared range, NaN and Inf are refused
    naming method, parameter and range; just inside is accepted."""
    paths = {n: tmp_path / n for n in ("base", "a", "b")}  # parse_config does not open them
    spec = REGISTRY[method_name].spec(param)
    assert spec is not None
    inside, outside = _neighbours(spec.range, spec.kind == "int")
    for v in inside:
        parse_config(_doc(method_name, param, v, paths))
    for v in [*outside, float("nan"), float("inf"), -float("inf")]:
        with pytest.raises(ConfigError) as e:
            parse_config(_doc(method_name, param, v, paths))
        msg = str(e.value)
        assert param in msg and "\n" not in msg, msg
        if math.isfinite(v):
            assert f"{method_name} parameter `{param}`" in msg and str(spec.range) in msg, msg


def test_resolved_values_are_checked_per_tensor(three):
    """A config built in code (not parsed) is still checked per resolved tensor value."""
    from moemerge.api import plan
    from moemerge.config import Gradient, MergeConfig, ModelSpec
    from moemerge.errors import PlanError

    cfg = MergeConfig(merge_method="ties", base_model=str(three["base"]),
                      models=(ModelSpec(model=str(three["a"]), parameters={"weight": 1.0, "density": Gradient((0.5, 3.0))}),
                              ModelSpec(model=str(three["b"]), parameters={"weight": 1.0})))
    with pytest.raises(PlanError) as e:
        plan(cfg)
    msg = str(e.value)
    assert "model.layers.1.mlp.w.weight" in msg and "density" in msg and "[0, 1]" in msg and str(three["a"]) in msg


def test_pma_options_out_of_range(three, tmp_path, run_cli):
    snaps = [str(three[n]) for n in ("base", "a", "b")]
    for flags, needle in ((["--method", "ema", "--alpha", "1.5"], "--alpha"),
                          (["--method", "ema", "--alpha", "0"], "--alpha"),
                          (["--method", "ema", "--alpha", "nan"], "alpha"),
                          (["--last", "0"], "--last"),
                          (["--weights", "1,nan,1"], "--weights"),
                          (["--weights", "1,inf,1"], "--weights")):
        code, _, err = run_cli("pma", *snaps, "-o", tmp_path / "pout", "--no-progress", *flags)
        assert code != 0 and needle in err and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "pout").exists()


# -- row 12 (part): NaN / Inf in inputs --------------------------------------------------------------

_STAT_METHODS = {
    "slerp": {"parameters": {"t": 0.5}, "models": [("base", {}), ("nan", {})]},
    "nuslerp": {"models": [("a", {"weight": 1.0}), ("nan", {"weight": 1.0})]},
    "model_stock": {"models": [("a", {}), ("nan", {})]},
    "ties": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "dare_linear": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "breadcrumbs": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "della": {"models": [("a", {"weight": 1.0, "density": 0.5}), ("nan", {"weight": 1.0, "density": 0.5})]},
    "sce": {"parameters": {"select_topk": 0.5}, "models": [("a", {}), ("nan", {})]},
    "multislerp": {"models": [("a", {"weight": 1.0}), ("nan", {"weight": 1.0})]},
    "karcher": {"models": [("a", {}), ("nan", {})]},
}


@pytest.mark.parametrize("method", sorted(_STAT_METHODS))
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_statistics_methods_refuse_nan_naming_tensor_and_model(method, chunk_rows, ckpt_factory, tmp_path,
                                                               run_cli):
    """Whole tensors (one read, every pass) through the CLI; streamed 2-row chunks via the API."""
    paths = {"base": ckpt_factory("base", _tensors(1)), "a": ckpt_factory("a", _tensors(2)),
             "nan": ckpt_factory("nan", _tensors(3, nan=True))}
    before = _digests(paths["nan"])
    spec = _STAT_METHODS[method]
    doc = {"merge_method": method, "parameters": spec.get("parameters", {}),
           "models": [{"model": str(paths[n]), "parameters": p} for n, p in spec["models"]]}
    if REGISTRY[method].base != "none":
        doc["base_model"] = str(paths["base"])
    cfg = write_yaml(tmp_path / "m.yml", doc)
    out = tmp_path / "out"
    if chunk_rows:
        import moemerge
        from moemerge.errors import MergeRuntimeError

        with pytest.raises(MergeRuntimeError) as e:
            moemerge.run(str(cfg), str(out), chunk_rows=chunk_rows)
        code, err = 1, f"moemerge: error: {e.value}"
    else:
        code, _, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 1, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert "model.layers.1.mlp.w.weight" in line and str(paths["nan"]) in line and "NaN or Inf" in line
    assert method in line
    assert not (out / INDEX).exists() and not (out / MANIFEST).exists()  # nothing looks finished
    assert run_cli("verify", out)[0] != 0
    assert _digests(paths["nan"]) == before


def test_elementwise_methods_pass_nan_through(ckpt_factory, tmp_path, run_cli):
    from safetensors.torch import load_file

    a, n = ckpt_factory("a", _tensors(2)), ckpt_factory("nan", _tensors(3, nan=True))
    cfg = write_yaml(tmp_path / "m.yml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(n), "parameters": {"weight": 1.0}}]})
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))["model.layers.1.mlp.w.weight"]
    assert torch.isnan(got).sum() == 1 and torch.isnan(got[3, 5])


# -- row 12 (part): malformed storage_options ----------------------------------------------------------


@pytest.mark.parametrize(("options", "needle"), [
    ({"client_kwargs": "notadict"}, "storage_options.client_kwargs"),
    ({"not_an_option": 1}, "storage_options.not_an_option"),
    ({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "bogus": 1}}, "client_kwargs.bogus"),
    ({"config_kwargs": {"retries": 3, "nope": 1}}, "storage_options.config_kwargs"),
    ({"anon": "yes"}, "storage_options.anon"),
])
def test_malformed_storage_options_are_one_line(options, needle, three, tmp_path, run_cli):
    cfg = write_yaml(tmp_path / "m.yml", {
        "merge_method": "linear", "storage_options": options,
        "models": [{"model": "s3://nobucket/a", "parameters": {"weight": 1.0}},
                   {"model": str(three["b"]), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    code, stdout, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not out.exists() or not any(out.iterdir())


# -- row 10: the Dask dashboard --------------------------------------------------------------------


def test_parse_dashboard():
    from moemerge.engine.cluster import parse_dashboard

    assert parse_dashboard(None) == "127.0.0.1:0"
    assert parse_dashboard("off") is None
    assert parse_dashboard(":8787") == "127.0.0.1:8787"
    assert parse_dashboard("0.0.0.0:8787") == "0.0.0.0:8787"
    with pytest.raises(ConfigError, match="--dashboard"):
        parse_dashboard("everywhere")


def test_local_cluster_listens_on_loopback_only():
    import psutil
    from urllib.parse import urlparse

    from moemerge.engine.cluster import start_client

    client, cluster = start_client(workers=1, scheduler=None, memory_budget=64 << 20)
    try:
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        assert urlparse(cluster.scheduler_address).hostname == "127.0.0.1"
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = [c.laddr for p in procs for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening
        assert all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    finally:
        client.close()
        cluster.close()
    client, cluster = start_client(workers=1, scheduler=None, memory_budget=64 << 20, dashboard="off")
    try:
        assert cluster.scheduler_spec["options"]["dashboard"] is False
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        assert all(c.laddr.ip in ("127.0.0.1", "::1") for p in procs for c in p.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN)
    finally:
        client.close()
        cluster.close()


# -- row 11: multipart uploads ---------------------------------------------------------------------


def _start_upload(key: str, bucket: str = "out") -> str:
    s3 = boto3.client("s3")
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=1, Body=b"x" * (5 << 20))
    return up


def test_stale_uploads_under_the_prefix_are_aborted_with_a_note(models, tmp_path, run_cli):
    _start_upload("merged/model-00001-of-00003.safetensors")
    _start_upload("merged/sub/left.safetensors")
    _start_upload("merged2/other.safetensors")  # a sibling prefix: not ours
    _start_upload("elsewhere/x.safetensors")
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress")
    assert code == 0, err
    assert "aborted 2 unfinished uploads under s3://out/merged/ left by an earlier run" in err
    left = sorted(u["Key"] for u in _open_uploads("out"))
    assert left == ["elsewhere/x.safetensors", "merged2/other.safetensors"]
    assert MANIFEST in _objects(models["fs"], "out/merged")
    assert run_cli("verify", "s3://out/merged")[0] == 0


@pytest.mark.parametrize("fault", ["outage", "interrupt"])
def test_failed_or_interrupted_run_leaves_no_open_upload(fault, models, tmp_path, run_cli, monkeypatch):
    real = s3fs.S3FileSystem.call_s3
    aborts: list[str] = []

    def flaky(self, method, *args, **kw):
        if method == "upload_part" and kw.get("PartNumber") == 2:
            if fault == "interrupt":
                raise KeyboardInterrupt()
            raise PermissionError("injected: S3 outage")
        if method == "abort_multipart_upload" and not aborts:
            aborts.append(kw["Key"])  # the first abort fails too (the outage goes on)
            raise ConnectionResetError("injected: abort failed")
        return real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", flaky)
    cfg = _config(tmp_path, "s3://models/a", "s3://models/b")
    code, _, err = run_cli("run", cfg, "s3://out/merged", "--no-progress", "--shard-size", "4MB")
    assert code == (130 if fault == "interrupt" else 1), err
    assert "Traceback" not in err
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", real)
    assert aborts  # the sink's own abort failed ...
    assert _open_uploads("out") == []  # ... and the sweep after the failure caught it
    assert not {INDEX, MANIFEST} & set(_objects(models["fs"], "out/merged"))
