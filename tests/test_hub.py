"""Hub model ids, `@revision` and `--hub-cache`, read through a stand-in of the Hub's file API
on 127.0.0.1 (tests/hub_server.py; never the real Hub): outputs equal the same merge of local
copies, shards are read by ranges, the token is sent and never shown."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moemerge
from moemerge.errors import CheckpointError, ConfigError, OutputError
from moemerge.io import hub as hubmod
from tests.conftest import write_checkpoint, write_yaml
from tests.hub_server import HubStandIn

BIG = "model.layers.0.mlp.up_proj.weight"
BIG_SHAPE = (512, 1024)  # 2 MiB of float32: read in many ranges, never whole


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubStandIn]:
    """The stand-in Hub, set as HF_ENDPOINT (read per call: huggingface_hub's own constant is
    fixed at import), online, no token, no hub cache, the working directory empty."""
    import huggingface_hub.constants as hc

    with HubStandIn() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # another test module may have set it at import
        monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no login file of this machine
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", hubmod.CACHE_ENV):
            monkeypatch.delenv(var, raising=False)
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)  # `org/a` is no local directory here
        yield server


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g),
        BIG: torch.randn(*BIG_SHAPE, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=g),
    }


def _model(root: Path, name: str, seed: int, shards: int = 2) -> Path:
    return write_checkpoint(root / name, _tensors(seed), shards=shards,
                            config={"model_type": "llama", "num_hidden_layers": 1, "marker": name})


def _cfg(a: str, b: str) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}]}


def _out(path: Path) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hub_ids_are_read_in_place_by_ranges_and_equal_the_local_merge(hub: HubStandIn, tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a", 1), _model(tmp_path, "b", 2)
    hub.add_folder("org/a", a)
    hub.add_folder("org/b", b)
    local = moemerge.run(_cfg(str(a), str(b)), str(tmp_path / "local"), chunk_rows=16)
    assert local.plan.tensors
    res = moemerge.run(_cfg("org/a", "org/b"), str(tmp_path / "hub"), chunk_rows=16)
    assert {"hf://org/a", "hf://org/b"} <= set(res.plan.sources)
    _same(_out(tmp_path / "hub"), _out(tmp_path / "local"))
    # config.json came from the Hub copy of the first model, through the same commit
    assert '"marker": "a"' in (tmp_path / "hub" / "config.json").read_text()

    # the shard holding the big tensor: read by ranges only, never whole
    shard = next(f for f in sorted(a.glob("*.safetensors")) if BIG in load_file(str(f)))
    size = shard.stat().st_size
    gets = [s for s in hub.seen(f"/{shard.name}") if s.method == "GET" and "/resolve/" in s.path]
    assert len(gets) > 8, gets  # header, then chunks of 16 rows of the big tensor
    assert all(s.range is not None and s.status == 206 for s in gets), gets
    spans = [tuple(int(x) for x in s.range.removeprefix("bytes=").split("-")) for s in gets if s.range]
    assert all(hi - lo + 1 < size // 4 for lo, hi in spans), spans
    assert not [s for s in hub.requests if s.method == "GET" and s.path.endswith(".safetensors") and s.range is None]


def test_revision_is_honoured_and_each_equals_its_local_merge(hub: HubStandIn, tmp_path: Path) -> None:
    v1, v2, b = _model(tmp_path, "v1", 11), _model(tmp_path, "v2", 12), _model(tmp_path, "b", 13)
    sha1 = hub.add_folder("org/a", v1, branch="v1")
    hub.add_folder("org/a", v1, branch="feature/x")
    hub.add_folder("org/a", v2)  # main
    for ref, local in (("org/a@v1", v1), (f"org/a@{sha1}", v1), ("org/a@feature/x", v1), ("org/a", v2),
                       ("org/a@main", v2)):
        name = ref.replace("/", "_").replace("@", "_")
        moemerge.run(_cfg(ref, str(b)), str(tmp_path / f"hub_{name}"), chunk_rows=64)
        moemerge.run(_cfg(str(local), str(b)), str(tmp_path / f"loc_{name}"), chunk_rows=64)
        _same(_out(tmp_path / f"hub_{name}"), _out(tmp_path / f"loc_{name}"))
    assert not torch.equal(_out(tmp_path / "hub_org_a_v1")[BIG], _out(tmp_path / "hub_org_a")[BIG])


def test_hub_cache_downloads_then_reads_locally(hub: HubStandIn, tmp_path: Path, run_cli) -> None:
    a, b = _model(tmp_path, "a", 21), _model(tmp_path, "b", 22)
    hub.add_folder("org/a", a, branch="dev")
    cfg = write_yaml(tmp_path / "c.yml", _cfg("org/a@dev", str(b)))
    cache = tmp_path / "hubcache"
    code, out, err = run_cli("run", str(cfg), str(tmp_path / "out"), "--hub-cache", str(cache), "--no-progress")
    assert code == 0, err
    moemerge.run(_cfg(str(a), str(b)), str(tmp_path / "ref"))
    _same(_out(tmp_path / "out"), _out(tmp_path / "ref"))
    card = (tmp_path / "out" / "README.md").read_text()  # the Hub id as written, in the front matter
    assert "- org/a@dev" in card and "hf://" not in card, card
    snaps = list(cache.glob("models--org--a/snapshots/*/*.safetensors"))
    assert len(snaps) == 2, snaps
    # downloaded whole (that is what the cache is for), then read from disk
    assert [s for s in hub.requests if s.method == "GET" and s.path.endswith(".safetensors") and s.range is None]
    assert not [s for s in hub.requests if s.range is not None and s.path.endswith(".safetensors")]


def test_token_is_sent_and_never_shown(hub: HubStandIn, tmp_path: Path, run_cli,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    token = "hf_" + os.urandom(12).hex()
    a, b = _model(tmp_path, "a", 31), _model(tmp_path, "b", 32)
    hub.add_folder("org/private", a, token=token)
    cfg = write_yaml(tmp_path / "c.yml", _cfg("org/private", str(b)))

    code, out, err = run_cli("run", str(cfg), str(tmp_path / "denied"), "--no-progress")
    assert code != 0 and "org/private" in err and "HF_TOKEN" in err, err
    assert not (tmp_path / "denied").exists()

    wrong = "hf_wrong" + os.urandom(8).hex()
    monkeypatch.setenv("HF_TOKEN", wrong)
    code, out, err = run_cli("run", str(cfg), str(tmp_path / "denied2"), "--no-progress", "-v")
    assert code != 0 and wrong not in out + err, err

    monkeypatch.setenv("HF_TOKEN", token)
    code, out, err = run_cli("run", str(cfg), str(tmp_path / "out"), "--no-progress", "-v")
    assert code == 0, err
    assert token not in out + err
    auth = {s.authorization for s in hub.requests if "/org/private/" in s.path and s.status < 400}
    assert auth == {f"Bearer {token}"}, auth
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    moemerge.run(_cfg(str(a), str(b)), str(tmp_path / "ref"))
    _same(_out(tmp_path / "out"), _out(tmp_path / "ref"))


def test_missing_repo_or_revision_is_an_error_before_work(hub: HubStandIn, tmp_path: Path) -> None:
    a = _model(tmp_path, "a", 41)
    hub.add_folder("org/a", a)
    with pytest.raises(CheckpointError, match=r"no local directory org/nope and no Hub model repository org/nope"):
        moemerge.run(_cfg("org/nope", str(a)), str(tmp_path / "o1"))
    with pytest.raises(CheckpointError, match=r"hf://org/a@nope: the repository has no such revision"):
        moemerge.run(_cfg("org/a@nope", str(a)), str(tmp_path / "o2"))
    with pytest.raises(CheckpointError, match=r"org/nope"):
        moemerge.plan(_cfg(str(a), "org/nope"))
    with pytest.raises(CheckpointError, match=r"the repository has no such revision"):
        moemerge.plan(_cfg(str(a), "org/a@" + "0" * 40))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_local_directory_wins_over_the_hub_id_of_that_spelling(hub: HubStandIn, tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a", 51), _model(tmp_path, "b", 52)
    hub.add_folder("org/a", _model(tmp_path, "other", 53))
    import shutil

    shutil.copytree(a, Path.cwd() / "org" / "a")
    res = moemerge.run(_cfg("org/a", str(b)), str(tmp_path / "out"))
    assert "org/a" in res.plan.sources and not hub.requests
    moemerge.run(_cfg(str(a), str(b)), str(tmp_path / "ref"))
    _same(_out(tmp_path / "out"), _out(tmp_path / "ref"))


def test_a_moved_branch_is_a_changed_input_on_resume(hub: HubStandIn, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.io.writer import LocalModelWriter

    a1, a2, b = _model(tmp_path, "a1", 61), _model(tmp_path, "a2", 62), _model(tmp_path, "b", 63)
    hub.add_folder("org/a", a1)
    out = tmp_path / "out"
    monkeypatch.setattr(moemerge.api, "JOURNAL_EVERY", 1)
    real = LocalModelWriter.write_rows
    seen = [0]

    def failing(self, name, row_start, data):  # a crash half way, as a full disk would
        seen[0] += 1
        if seen[0] == 3:
            raise OutputError("simulated crash")
        return real(self, name, row_start, data)

    with monkeypatch.context() as m:
        m.setattr(LocalModelWriter, "write_rows", failing)
        with pytest.raises(OutputError, match="simulated crash"):
            moemerge.run(_cfg("org/a", str(b)), str(out), chunk_rows=1024)
    hub.add_folder("org/a", a2)  # main moves on
    with pytest.raises(Exception, match=r"hf://org/a/.*changed since the interrupted run \(revision"):
        moemerge.run(_cfg("org/a", str(b)), str(out), chunk_rows=1024, resume=True)
    hub.add_folder("org/a", a1, branch="main")  # back to the same bytes under a new commit: still another input
    with pytest.raises(Exception, match="changed since the interrupted run"):
        moemerge.run(_cfg("org/a", str(b)), str(out), chunk_rows=1024, resume=True)


@pytest.mark.parametrize(("text", "want"), [
    ("org/name", "hf://org/name"),
    ("org/name@v1.0", "hf://org/name@v1.0"),
    ("org/Name-2.5_x@0123456789abcdef0123456789abcdef01234567", "hf://org/Name-2.5_x@0123456789abcdef0123456789abcdef01234567"),
    ("org/name+org/adapter@r2", "hf://org/name+hf://org/adapter@r2"),
    ("s3://bucket/model", "s3://bucket/model"),
    ("hf://org/name@dev", "hf://org/name@dev"),
    ("./not/here", "./not/here"),
    ("/abs/not/here", "/abs/not/here"),
    ({"model": {"path": "org/name", "revision": "r"}, "lora": {"path": "org/ad"}}, "hf://org/name@r+hf://org/ad"),
])
def test_model_references_are_made_explicit(text: object, want: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hubmod.model_reference(text, "models[0].model") == want


@pytest.mark.parametrize(("text", "match"), [
    ("org/name@a@b", "more than one `@`"),
    ("org/name@", "empty revision"),
    ("not a hub id@v1", "neither a local directory nor a Hub model id"),
    ("a+b+c", r"one `\+`"),
    ("local@v1", "is a local directory and has no revisions"),
])
def test_bad_model_references_are_config_errors(text: str, match: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    with pytest.raises(ConfigError, match=match):
        hubmod.model_reference(text, "models[0].model")


def test_hub_model_with_a_hub_lora_adapter(hub: HubStandIn, tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    a, b = _model(tmp_path, "a", 71), _model(tmp_path, "b", 72)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    la, lb = torch.randn(4, BIG_SHAPE[1], generator=g), torch.randn(BIG_SHAPE[0], 4, generator=g)
    ad = tmp_path / "adapter"
    ad.mkdir()
    save_file({f"base_model.model.{BIG[:-len('.weight')]}.lora_A.weight": la,
               f"base_model.model.{BIG[:-len('.weight')]}.lora_B.weight": lb}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    hub.add_folder("org/a", a)
    hub.add_folder("org/adapter", ad, branch="v1")
    res = moemerge.run(_cfg("org/a+org/adapter@v1", str(b)), str(tmp_path / "out"), chunk_rows=64)
    assert "hf://org/a+hf://org/adapter@v1" in res.plan.sources
    # the reference: the adapter merged into a local copy in float64
    t = _tensors(71)
    t[BIG] = (t[BIG].double() + 2.0 * (lb.double() @ la.double())).float()
    merged = write_checkpoint(tmp_path / "merged", t, config={"model_type": "llama", "num_hidden_layers": 1})
    moemerge.run(_cfg(str(merged), str(b)), str(tmp_path / "ref"), chunk_rows=64)
    got, want = _out(tmp_path / "out"), _out(tmp_path / "ref")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert not [s for s in hub.requests if s.method == "GET" and s.path.endswith(".safetensors") and s.range is None]


def test_inspect_takes_a_hub_id(hub: HubStandIn, tmp_path: Path, run_cli) -> None:
    hub.add_folder("org/a", _model(tmp_path, "a", 81), branch="v2")
    code, out, err = run_cli("inspect", "org/a@v2", "--json")
    assert code == 0, err
    assert BIG in out and "512" in out
    code, out, err = run_cli("inspect", "org/a@v3")
    assert code != 0 and "no such revision" in err, err


def test_dask_workers_read_the_commit_the_run_pinned(hub: HubStandIn, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    distributed = pytest.importorskip("distributed")
    a1, a2, b = _model(tmp_path, "a1", 91), _model(tmp_path, "a2", 92), _model(tmp_path, "b", 93)
    hub.add_folder("org/a", a1)
    real = hubmod.pinned

    def then_move() -> dict:  # main moves after the run planned, before any worker opened its inputs
        pins = real()
        hub.add_folder("org/a", a2)
        return pins

    monkeypatch.setattr(hubmod, "pinned", then_move)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        moemerge.run(_cfg("org/a", str(b)), str(tmp_path / "out"), client=client)
    moemerge.run(_cfg(str(a1), str(b)), str(tmp_path / "ref"))
    _same(_out(tmp_path / "out"), _out(tmp_path / "ref"))
