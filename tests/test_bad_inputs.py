"""Every bad input fails through the CLI with one clear `moemerge: error:` message, no
traceback, and an output directory that never looks finished (no index, no manifest)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_yaml

INDEX = "model.safetensors.index.json"
MANIFEST = "moemerge-manifest.json"

SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (8, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.mlp.up_proj.weight": (6, 4),
    "model.norm.weight": (4,),
}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) + 0.1 for k, s in SHAPES.items()}


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[list[tuple[str, dict]], bytes]:
    """Header entries (name, {dtype, shape, data_offsets}) in order, and the packed data (F32)."""
    entries: list[tuple[str, dict]] = []
    data = b""
    for name, t in tensors.items():
        raw = t.to(torch.float32).contiguous().numpy().tobytes()
        entries.append((name, {"dtype": "F32", "shape": list(t.shape),
                               "data_offsets": [len(data), len(data) + len(raw)]}))
        data += raw
    return entries, data


def _safetensors_bytes(entries: list[tuple[str, dict]] | str, data: bytes, *, length: int | None = None) -> bytes:
    """u64 LE header length + JSON (padded to 8) + data, written by hand so a corruption is exact.

    `entries` may repeat a name (a duplicate key in the JSON) or be raw header text.
    """
    if isinstance(entries, str):
        text = entries
    else:
        text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}"
    body = text.encode()
    body += b" " * ((-(8 + len(body))) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _raw_checkpoint(path: Path, blob: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(blob)
    (path / "config.json").write_text(json.dumps({"model_type": "test", "num_hidden_layers": 2}))
    return path


def _linear(tmp_path: Path, *models: Path, weights: tuple[float, ...] | None = None, **extra) -> Path:
    weights = weights or tuple(1.0 for _ in models)
    doc = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        **extra,
    }
    return write_yaml(tmp_path / "merge.yml", doc)


def assert_clean_failure(code: int, err: str, out: Path, *needles: str) -> None:
    """Non-zero exit, one `moemerge: error:` message naming `needles`, no traceback, no commit."""
    assert code != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith("moemerge: error:"), err
    assert err.count("moemerge: error:") == 1, err
    # a list of problems may continue on indented lines; nothing else is printed
    assert all(ln.startswith(" ") for ln in lines[1:]), err
    for needle in needles:
        assert needle in err, f"{needle!r} not named in: {err}"
    assert not (out / INDEX).exists()
    assert not (out / MANIFEST).exists()


@pytest.fixture
def good(ckpt_factory) -> Callable[[str, int], Path]:
    def make(name: str, seed: int = 0, **kw) -> Path:
        return ckpt_factory(name, _tensors(seed), **kw)

    return make


# -- corrupt safetensors files -------------------------------------------------------------


def _corrupt_truncated() -> tuple[bytes, str]:
    entries, data = _layout(_tensors(1))
    return _safetensors_bytes(entries, data)[:-5], "model.norm.weight"


def _corrupt_length_past_end() -> tuple[bytes, str]:
    entries, data = _layout(_tensors(1))
    good = _safetensors_bytes(entries, data)
    return _safetensors_bytes(entries, data, length=len(good)), "header length"


def _corrupt_not_json() -> tuple[bytes, str]:
    _, data = _layout(_tensors(1))
    return _safetensors_bytes('{"model.norm.weight": {"dtype": "F32", oops', data), "not valid JSON"


def _with(name: str, offsets: list[int], extra: int = 0, **change) -> tuple[bytes, str]:
    entries, data = _layout(_tensors(1))
    entries = [(k, {**v, "data_offsets": offsets, **change} if k == name else v) for k, v in entries]
    return _safetensors_bytes(entries, data + b"\x01" * extra), name


def _corrupt_overlap() -> tuple[bytes, str]:
    # layers.0 is [128, 224]; layers.1 moved to start inside it (same length, so only overlap)
    return _with("model.layers.1.mlp.up_proj.weight", [200, 296])


def _corrupt_out_of_range() -> tuple[bytes, str]:
    return _with("model.norm.weight", [336, 352])  # data is 336 bytes


def _corrupt_gap() -> tuple[bytes, str]:
    return _with("model.norm.weight", [344, 360], extra=24)  # 8 unused bytes before norm


def _corrupt_duplicate() -> tuple[bytes, str]:
    entries, data = _layout(_tensors(1))
    return _safetensors_bytes(entries[:2] + [entries[1]] + entries[2:], data), entries[1][0]


def _corrupt_unknown_dtype() -> tuple[bytes, str]:
    return _with("model.norm.weight", [320, 336], dtype="F12")


CORRUPTIONS = {
    "truncated": _corrupt_truncated,
    "header_length_past_end": _corrupt_length_past_end,
    "header_not_json": _corrupt_not_json,
    "overlapping_offsets": _corrupt_overlap,
    "out_of_range_offsets": _corrupt_out_of_range,
    "gap_between_tensors": _corrupt_gap,
    "duplicate_name": _corrupt_duplicate,
    "unknown_dtype": _corrupt_unknown_dtype,
}


def test_hand_written_file_is_valid_before_corruption(tmp_path: Path, good, run_cli) -> None:
    """The byte writer itself makes a good file: corruption, not the helper, causes the errors."""
    entries, data = _layout(_tensors(1))
    b = _raw_checkpoint(tmp_path / "b", _safetensors_bytes(entries, data))
    cfg = _linear(tmp_path, good("a"), b)
    code, _, err = run_cli("run", cfg, tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_shard_is_refused(tmp_path: Path, good, run_cli, kind: str) -> None:
    blob, needle = CORRUPTIONS[kind]()
    b = _raw_checkpoint(tmp_path / "b", blob)
    cfg = _linear(tmp_path, good("a"), b)
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out)
    assert_clean_failure(code, err, out, str(b / "model.safetensors"), needle)
    assert not out.exists()  # refused before any output byte


def test_truncated_shard_of_a_sharded_checkpoint(tmp_path: Path, good, run_cli) -> None:
    b = good("b", 1, shards=2)
    shard = b / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), b), out)
    assert_clean_failure(code, err, out, str(shard), "truncated")


@pytest.mark.parametrize("where", ["dir_named_like_a_shard", "bare_file"])
def test_error_names_the_file_wherever_it_lives(tmp_path: Path, good, run_cli, where: str) -> None:
    blob, needle = _corrupt_truncated()
    if where == "bare_file":
        bad = tmp_path / "weights.safetensors"
        bad.write_bytes(blob)
        loc = bad
    else:  # the directory's own name contains the shard name: the file must still be named
        loc = _raw_checkpoint(tmp_path / "model.safetensors.d", blob)
        bad = loc / "model.safetensors"
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), loc), out)
    assert_clean_failure(code, err, out, f"{bad}: ", needle)


# -- bad indexes ---------------------------------------------------------------------------


def test_shard_missing_from_disk(tmp_path: Path, good, run_cli) -> None:
    b = good("b", 1, shards=2)
    (b / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), b), out)
    assert_clean_failure(code, err, out, "model-00002-of-00002.safetensors", "does not exist")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_shard_path_leaving_the_directory(tmp_path: Path, good, run_cli, bad: str) -> None:
    b = good("b", 1, shards=2)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(b / "model-00002-of-00002.safetensors", outside)  # exists: must still be refused
    if bad == "ABSOLUTE":
        bad = str(outside)
    idx = json.loads((b / INDEX).read_text())
    victim = sorted(idx["weight_map"])[-1]
    idx["weight_map"][victim] = bad
    (b / INDEX).write_text(json.dumps(idx))
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), b), out)
    assert_clean_failure(code, err, out, INDEX, bad)


@pytest.mark.parametrize("kind", ["empty_weight_map", "empty_header"])
def test_checkpoint_without_tensors(tmp_path: Path, good, run_cli, kind: str) -> None:
    """A valid but empty input must not "merge" into an empty model that looks finished."""
    if kind == "empty_weight_map":
        b = good("b", 1, shards=2)
        (b / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {}}))
    else:
        b = _raw_checkpoint(tmp_path / "b", _safetensors_bytes("{}", b""))
    out = tmp_path / "out"
    # the empty model first: it is the reference every other model is compared with
    code, _, err = run_cli("run", _linear(tmp_path, b, good("a")), out)
    assert_clean_failure(code, err, out, str(b), "no tensors")


# -- inputs that disagree ------------------------------------------------------------------


def test_tensor_missing_in_one_model(tmp_path: Path, good, ckpt_factory, run_cli) -> None:
    t = _tensors(1)
    del t["model.layers.1.mlp.up_proj.weight"]
    b = ckpt_factory("b", t)
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), b), out)
    assert_clean_failure(code, err, out, "model.layers.1.mlp.up_proj.weight", str(b))


def test_shape_mismatch(tmp_path: Path, good, ckpt_factory, run_cli) -> None:
    t = _tensors(1)
    t["model.layers.0.mlp.up_proj.weight"] = torch.randn(5, 4)
    b = ckpt_factory("b", t)
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), b), out)
    assert_clean_failure(code, err, out, "model.layers.0.mlp.up_proj.weight", "[5, 4]", "[6, 4]")


@pytest.mark.parametrize("previous", ["none", "finished"])
def test_integer_tensors_that_differ_fail_mid_run(tmp_path: Path, ckpt_factory, run_cli, previous: str) -> None:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 1000, (16,), generator=g, dtype=torch.int64).to(torch.int16)
    ta, tb = _tensors(0), _tensors(1)
    ta["model.rotary.position_ids"] = ids
    tb["model.rotary.position_ids"] = ids.clone()
    tb["model.rotary.position_ids"][9] += 1
    a, b = ckpt_factory("a", ta), ckpt_factory("b", tb)
    cfg = _linear(tmp_path, a, b)
    # headers agree: planning succeeds; the difference is only visible in the data
    code, _, err = run_cli("plan", cfg)
    assert code == 0, err
    out = tmp_path / "out"
    args: tuple[str, ...] = ()
    before: dict[str, bytes] = {}
    if previous == "finished":  # a failed --overwrite leaves the old finished merge as it was
        code, _, err = run_cli("run", _linear(tmp_path, ckpt_factory("c", _tensors(2)), ckpt_factory("d", _tensors(3))),
                               out, "--no-progress")
        assert code == 0 and (out / MANIFEST).exists(), err
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        cfg = _linear(tmp_path, a, b)
        args = ("--overwrite",)
    code, _, err = run_cli("run", cfg, out, "--no-progress", *args)
    if previous == "finished":
        assert code != 0 and "Traceback" not in err and "model.rotary.position_ids" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert run_cli("verify", out)[0] == 0
        # the new merge was being built beside the old one, and does not look finished
        out = tmp_path / "out.moemerge-new"
    else:
        assert_clean_failure(code, err, out, "model.rotary.position_ids", str(a), str(b))
    # it failed mid-way: work had started (shards laid out), yet nothing looks finished
    assert list(out.glob("*.safetensors"))
    assert (out / ".moemerge-incomplete").exists()
    assert not (out / INDEX).exists() and not (out / MANIFEST).exists()


def test_weights_summing_to_zero_with_normalize(tmp_path: Path, good, run_cli) -> None:
    out = tmp_path / "out"
    cfg = _linear(tmp_path, good("a"), good("b", 1), weights=(1.0, -1.0))
    code, _, err = run_cli("run", cfg, out)
    assert_clean_failure(code, err, out, "sum to 0", "normalize")


# -- bad output locations ------------------------------------------------------------------


def test_output_is_a_file(tmp_path: Path, good, run_cli) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"keep me")
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), good("b", 1)), out)
    assert_clean_failure(code, err, tmp_path, str(out), "is a file")
    assert out.read_bytes() == b"keep me"


def test_finished_output_needs_overwrite(tmp_path: Path, good, run_cli) -> None:
    out = tmp_path / "out"
    cfg = _linear(tmp_path, good("a"), good("b", 1))
    code, _, err = run_cli("run", cfg, out, "--no-progress")
    assert code == 0, err
    before = (out / MANIFEST).read_bytes()
    code, _, err = run_cli("run", cfg, out, "--no-progress")
    assert code != 0
    assert "Traceback" not in err and err.startswith("moemerge: error:")
    assert str(out) in err and "--overwrite" in err
    assert (out / MANIFEST).read_bytes() == before  # untouched
    code, _, err = run_cli("run", cfg, out, "--overwrite", "--no-progress")
    assert code == 0, err
    assert (out / INDEX).exists() and (out / MANIFEST).exists()
    assert not (out / ".moemerge-incomplete").exists()


def test_non_empty_foreign_output_directory(tmp_path: Path, good, run_cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), good("b", 1)), out)
    assert_clean_failure(code, err, out, str(out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("spelling", ["same", "trailing_slash", "dotted"])
def test_output_equal_to_an_input(tmp_path: Path, good, run_cli, spelling: str) -> None:
    a, b = good("a"), good("b", 1)
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    out = {"same": str(b), "trailing_slash": str(b) + "/", "dotted": str(tmp_path / "x" / ".." / "b")}[spelling]
    code, _, err = run_cli("run", _linear(tmp_path, a, b), out, "--overwrite")
    assert code != 0
    assert "Traceback" not in err and err.startswith("moemerge: error:"), err
    assert "also an input" in err
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before


def test_output_is_an_input_through_a_symlink(tmp_path: Path, good, run_cli) -> None:
    """Merging a merge into itself: the input is a finished moemerge output, so --overwrite
    would otherwise be allowed to replace the very files being read."""
    first = tmp_path / "first"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), good("b", 1)), first, "--no-progress")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(first, target_is_directory=True)
    cfg = write_yaml(tmp_path / "again.yml", {
        "merge_method": "linear",
        "models": [{"model": str(first), "parameters": {"weight": 1.0}},
                   {"model": str(good("c", 2)), "parameters": {"weight": 1.0}}],
    })
    code, _, err = run_cli("run", cfg, link, "--overwrite", "--no-progress")
    assert code != 0
    assert "Traceback" not in err and err.startswith("moemerge: error:"), err
    assert "also an input" in err and str(link) in err
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_output_below_a_file(tmp_path: Path, good, run_cli) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), good("b", 1)), out)
    assert_clean_failure(code, err, tmp_path, str(blocker), "is a file")


@pytest.mark.parametrize("device", ["bogus", "tpu", "meta"])
def test_unknown_device(tmp_path: Path, good, run_cli, device: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), good("b", 1)), out, "--device", device)
    assert_clean_failure(code, err, out, "--device", device)
    assert not out.exists()


# -- bad inputs and configs ----------------------------------------------------------------


def test_input_directory_does_not_exist(tmp_path: Path, good, run_cli) -> None:
    missing = tmp_path / "nope"
    out = tmp_path / "out"
    code, _, err = run_cli("run", _linear(tmp_path, good("a"), missing), out)
    assert_clean_failure(code, err, out, str(missing), "does not exist")


def _doc(a: Path, b: Path, **over) -> dict:
    doc = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.4}},
                   {"model": str(b), "parameters": {"weight": 0.6}}],
    }
    doc.update(over)
    return doc


CONFIG_ERRORS: dict[str, tuple[Callable[[Path, Path], dict], tuple[str, ...]]] = {
    "unknown_method": (lambda a, b: _doc(a, b, merge_method="frobnicate"), ("frobnicate", "linear")),
    "unknown_top_level_key": (lambda a, b: _doc(a, b, merge_methd="linear"), ("merge_methd",)),
    "unknown_parameter": (lambda a, b: _doc(a, b, parameters={"densty": 0.5}), ("densty", "parameters")),
    "unknown_model_parameter": (
        lambda a, b: _doc(a, b, models=[{"model": str(a), "parameters": {"weight": 1, "wieght": 2}},
                                        {"model": str(b), "parameters": {"weight": 1}}]),
        ("models[0].parameters.wieght",)),
    "missing_weight": (
        lambda a, b: _doc(a, b, models=[{"model": str(a), "parameters": {"weight": 1}}, {"model": str(b)}]),
        ("models[1].parameters.weight",)),
    "slices_of_different_lengths": (
        lambda a, b: {"merge_method": "linear", "parameters": {"weight": 1.0},
                      "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]},
                                              {"model": str(b), "layer_range": [0, 1]}]}]},
        ("slices[0].sources", "same number of layers")),
    "ema_alpha_above_1": (
        lambda a, b: {"merge_method": "ema", "models": [{"model": str(a)}, {"model": str(b)}],
                      "parameters": {"alpha": 1.5}},
        ("alpha", "1.5")),
    "bad_dtype": (lambda a, b: _doc(a, b, dtype="float17"), ("dtype", "float17")),
    "tokenizer_source_and_block": (lambda a, b: _doc(a, b, tokenizer_source="union", tokenizer={"source": "base"}),
                                   ("tokenizer_source", "not both")),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_bad_config(tmp_path: Path, good, run_cli, case: str) -> None:
    make, needles = CONFIG_ERRORS[case]
    cfg = write_yaml(tmp_path / "merge.yml", make(good("a"), good("b", 1)))
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out)
    assert_clean_failure(code, err, out, str(cfg), *needles)
    assert not out.exists()


def test_tokenizer_source_that_does_not_exist(tmp_path: Path, good, run_cli) -> None:
    missing = tmp_path / "tok"
    cfg = write_yaml(tmp_path / "merge.yml", _doc(good("a"), good("b", 1), tokenizer_source=str(missing)))
    out = tmp_path / "out"
    code, _, err = run_cli("run", cfg, out)
    assert_clean_failure(code, err, out, str(missing), "tokenizer_source")
    assert not out.exists()


def test_config_file_missing_or_not_yaml(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("run", tmp_path / "nope.yml", out)
    assert_clean_failure(code, err, out, "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("models: [\n  - {model: x\n")
    code, _, err = run_cli("run", bad, out)
    assert_clean_failure(code, err, out, "bad.yml", "YAML")
    latin = tmp_path / "latin1.yml"
    latin.write_bytes("merge_method: linear\nmodels:\n  - model: /tmp/m\u00f6del\n".encode("latin-1"))
    code, _, err = run_cli("run", latin, out)
    assert_clean_failure(code, err, out, "latin1.yml", "UTF-8")


@pytest.mark.parametrize("budget", ["12XB", "0", "-1GB", "lots"])
def test_bad_memory_budget(tmp_path: Path, good, run_cli, budget: str) -> None:
    out = tmp_path / "out"
    cfg = _linear(tmp_path, good("a"), good("b", 1))
    code, _, err = run_cli("run", cfg, out, f"--memory-budget={budget}")
    assert_clean_failure(code, err, out, "--memory-budget", budget)
    assert not out.exists()
