"""PMA snapshot discovery (steps from names, half-written snapshots skipped, glob vs prefix,
local and S3) and window selection (last N, intervals in steps and tokens, before a step)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import write_checkpoint
from moemerge.errors import ConfigError, NotReadyError
from moemerge.pma import Snapshot, discover, interval_steps_from_tokens, select
from moemerge.pma.choose import Window, choose
from moemerge.pma.discovery import parse_step


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def _snap(root: Path, name: str, seed: int, **kw) -> Path:
    return write_checkpoint(root / name, _tensors(seed), **kw)


# -- step names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, step", [
    ("step-00042000", 42000), ("step_42000", 42000), ("global_step42000", 42000),
    ("iter_0042000", 42000), ("checkpoint-42000", 42000), ("step42000", 42000),
    ("step-7.zarr", 7), ("latest", None), ("step-", None), ("step-12a", None), ("mystep-5", None),
])
def test_step_from_the_directory_name(name: str, step: int | None) -> None:
    assert parse_step(name) == step


def test_mixed_step_styles_sorted_by_number_not_string(tmp_path: Path) -> None:
    steps = random.Random(5).sample(range(1, 200_000), 6)
    styles = ["step-{:08d}", "step_{}", "global_step{}", "iter_{:07d}", "checkpoint-{}", "step-{}"]
    for i, (style, step) in enumerate(zip(styles, steps)):
        _snap(tmp_path, style.format(step), i)
    # unpadded names sort wrongly as strings: 9000 after 10000
    _snap(tmp_path, "step-9000", 10)
    _snap(tmp_path, "step-10000", 11)
    snaps, notes = discover(str(tmp_path))
    assert [s.step for s in snaps] == sorted(steps + [9000, 10000])
    assert all(Path(s.url).parent == tmp_path and parse_step(Path(s.url).name) == s.step for s in snaps)
    assert notes == []


def test_half_written_snapshots_are_skipped_with_a_note(tmp_path: Path) -> None:
    _snap(tmp_path, "step-100", 1)
    _snap(tmp_path, "step-300", 3, shards=2)
    # shards there, no index yet (save_pretrained writes the index last)
    half = _snap(tmp_path, "step-400", 4, shards=2)
    (half / "model.safetensors.index.json").unlink()
    # an index that names a shard not copied yet
    partial = _snap(tmp_path, "step-500", 5, shards=2)
    (partial / "model-00002-of-00002.safetensors").unlink()
    # a DCP snapshot without its .metadata (written last by torch.distributed.checkpoint)
    (tmp_path / "step-600").mkdir()
    (tmp_path / "step-600" / "__0_0.distcp").write_bytes(random.randbytes(64))
    snaps, notes = discover(str(tmp_path / "step-*"))
    assert [s.step for s in snaps] == [100, 300]
    assert len(notes) == 3
    assert any("step-400" in n and "model.safetensors.index.json" in n and "still being written" in n
               for n in notes), notes
    assert any("step-500" in n and "model-00002-of-00002.safetensors" in n for n in notes), notes
    assert any("step-600" in n and ".metadata" in n for n in notes), notes


def test_dcp_and_zarr_snapshots_count_as_complete(tmp_path: Path) -> None:
    (tmp_path / "iter_0000010").mkdir()
    (tmp_path / "iter_0000010" / ".metadata").write_bytes(random.randbytes(32))
    (tmp_path / "step-20.zarr").mkdir()
    (tmp_path / "step-20.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3}))
    snaps, notes = discover(str(tmp_path))
    assert [(s.step, Path(s.url).name) for s in snaps] == [(10, "iter_0000010"), (20, "step-20.zarr")]
    assert notes == []


def test_names_without_a_step_are_skipped_with_a_note(tmp_path: Path) -> None:
    _snap(tmp_path, "step-5", 1)
    _snap(tmp_path, "latest", 2)
    _snap(tmp_path, "best-model", 3)
    (tmp_path / "README.txt").write_text("not a directory: ignored")
    snaps, notes = discover(str(tmp_path))
    assert [s.step for s in snaps] == [5]
    assert len(notes) == 2
    assert all("no step number" in n and "--step-regex" not in n for n in notes)
    assert any("'latest'" in n for n in notes) and any("'best-model'" in n for n in notes)


def test_user_step_regex(tmp_path: Path) -> None:
    for step in (1500, 250, 32000):
        _snap(tmp_path, f"run7-tokens{step}B", step)
    _snap(tmp_path, "run7-final", 9)
    snaps, notes = discover(str(tmp_path / "run7-*"), step_regex=r"tokens(\d+)B")
    assert [s.step for s in snaps] == [250, 1500, 32000]
    assert len(notes) == 1 and "run7-final" in notes[0] and "tokens(\\d+)B" in notes[0]
    for bad, needle in ((r"tokens\d+", "0 groups"), (r"(t)(\d+)", "2 groups"), (r"tokens(\d+", "not a valid")):
        with pytest.raises(ConfigError, match=needle):
            discover(str(tmp_path), step_regex=bad)


def test_glob_and_prefix(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _snap(ckpt, "step-10", 1)
    _snap(ckpt, "step-20", 2)
    _snap(ckpt, "iter_15", 3)
    (ckpt / "step-30").write_text("a file, not a snapshot directory")
    by_glob, _ = discover(str(ckpt / "step-*"))
    by_prefix, _ = discover(str(ckpt) + "/")
    assert [s.step for s in by_glob] == [10, 20]
    assert [s.step for s in by_prefix] == [10, 15, 20]
    with pytest.raises(ConfigError, match="no such directory"):
        discover(str(tmp_path / "nowhere"))
    nothing, notes = discover(str(ckpt / "step-9*"))
    assert nothing == [] and notes == []


def test_duplicate_steps_are_an_error(tmp_path: Path) -> None:
    _snap(tmp_path, "step-42000", 1)
    _snap(tmp_path, "global_step42000", 2)
    with pytest.raises(ConfigError, match=r"step 42000 appears twice: .*global_step42000.* and .*step-42000"):
        discover(str(tmp_path))


def test_discovery_on_s3(tmp_path: Path, s3_server: str) -> None:
    import boto3
    import s3fs

    boto3.client("s3").create_bucket(Bucket="run42")
    fs = s3fs.S3FileSystem()
    local = tmp_path / "local"
    for step, shards in ((2000, 1), (1000, 2), (10000, 2), (3000, 1)):
        d = _snap(local, f"step-{step}", step, shards=shards)
        for f in sorted(d.iterdir()):
            fs.put_file(str(f), f"run42/ckpt/{d.name}/{f.name}")
    # an upload in progress: shards there, no index yet
    d = _snap(local, "step-20000", 9, shards=2)
    for f in sorted(d.glob("*.safetensors")):
        fs.put_file(str(f), f"run42/ckpt/{d.name}/{f.name}")
    fs.put_file(str(d / "config.json"), "run42/ckpt/latest/config.json")
    fs.invalidate_cache()
    by_glob, notes = discover("s3://run42/ckpt/step-*")
    assert by_glob == [Snapshot(s, f"s3://run42/ckpt/step-{s}") for s in (1000, 2000, 3000, 10000)]
    assert len(notes) == 1 and "s3://run42/ckpt/step-20000" in notes[0] and "still being written" in notes[0]
    by_prefix, notes = discover("s3://run42/ckpt/")
    assert by_prefix == by_glob
    assert len(notes) == 2 and any("s3://run42/ckpt/latest" in n and "no step" in n for n in notes)


# -- selection -------------------------------------------------------------------------------


def _snaps(steps: list[int]) -> list[Snapshot]:
    order = list(steps)
    random.Random(len(steps)).shuffle(order)  # select sorts by step itself
    return [Snapshot(s, f"ckpt/step-{s}") for s in order]


def test_last_n() -> None:
    snaps = _snaps(list(range(1000, 15001, 1000)))
    assert [s.step for s in select(snaps, last=10)] == list(range(6000, 15001, 1000))
    assert [s.step for s in select(snaps)] == list(range(1000, 15001, 1000))
    assert [s.step for s in select(snaps, last=1)] == [15000]


def test_interval_counts_back_from_the_newest() -> None:
    snaps = _snaps([0, 900, 2000, 2500, 4100, 5000])
    # from 5000: 4100 is only 900 back; 2500 is 2500 back; then 900 (1600 back); 0 is 900 back
    assert [s.step for s in select(snaps, interval_steps=1000)] == [900, 2500, 5000]
    assert [s.step for s in select(snaps, interval_steps=1000, last=2)] == [2500, 5000]
    regular = _snaps(list(range(500, 30001, 500)))
    got = [s.step for s in select(regular, interval_steps=4000, last=5)]
    assert got == [14000, 18000, 22000, 26000, 30000]
    assert all(b - a >= 4000 for a, b in zip(got, got[1:]))


def test_interval_in_tokens() -> None:
    assert interval_steps_from_tokens(80e9, 4e6) == 20000  # the paper's 80B tokens at 4M per step
    assert interval_steps_from_tokens(1.1e9, 1e8) == 11  # exact despite 1.1e9 / 1e8 != 11.0 in floats
    assert interval_steps_from_tokens(1e9, 3e6) == 334  # rounded up: snapshots at least 1e9 apart
    assert interval_steps_from_tokens(1e3, 4e6) == 1
    for tokens, per, needle in ((0, 4e6, "--interval-tokens"), (-5, 4e6, "--interval-tokens"),
                                (8e10, 0, "--tokens-per-step"), (float("inf"), 4e6, "--interval-tokens"),
                                (float("nan"), 4e6, "--interval-tokens")):
        with pytest.raises(ConfigError, match=needle):
            interval_steps_from_tokens(tokens, per)
    snaps = _snaps(list(range(4000, 400001, 4000)))  # a snapshot every 16B tokens
    got = select(snaps, interval_steps=interval_steps_from_tokens(80e9, 4e6), last=10)
    assert [s.step for s in got] == list(range(220000, 400001, 20000))


def test_before_step_for_pma_init() -> None:
    snaps = _snaps(list(range(1000, 100001, 1000)))
    got = select(snaps, before_step=91000, last=3)
    assert [s.step for s in got] == [88000, 89000, 90000]  # step 91000 itself is excluded
    assert [s.step for s in select(snaps, before_step=1001)] == [1000]
    with pytest.raises(ConfigError, match="0 before step 1000"):
        select(snaps, before_step=1000)


def test_too_few_left_is_reported_with_counts_and_reasons() -> None:
    snaps = _snaps(list(range(1000, 12001, 1000)))
    # fewer than --last: all there are (a window still filling, issue 14); the caller notes it
    assert [s.step for s in select(snaps, interval_steps=3000, last=10)] == [3000, 6000, 9000, 12000]
    assert [s.step for s in select(snaps, before_step=6000, interval_steps=3000, last=3)] == [2000, 5000]
    with pytest.raises(ConfigError, match=r"12 snapshots found, 0 before step 1000"):
        select(snaps, before_step=1000, interval_steps=3000, last=3)
    with pytest.raises(ConfigError, match="0 snapshots found"):
        select([], last=1)
    for kw, flag in (({"last": 0}, "--last"), ({"interval_steps": -1}, "--interval-steps"),
                     ({"last": 2.5}, "--last"), ({"before_step": "9"}, "--before-step")):
        with pytest.raises(ConfigError, match=flag):
            select(snaps, **kw)


# -- from the command line's arguments to snapshots --------------------------------------------


def test_choose_pattern_list_and_single_snapshot(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _snap(tmp_path, f"step-{step}", step)
    p = choose([str(tmp_path / "step-*")], Window(last=2))
    assert p.steps == (30, 40) and p.pattern == str(tmp_path / "step-*")
    assert p.selection == {"last": 2, "interval_steps": None, "before_step": None}
    # default: the paper's 10; while there are fewer, all of them, noted (a window still filling)
    filling = choose([str(tmp_path / "step-*")], Window())
    assert filling.steps == (10, 20, 30, 40) and filling.window == "window 4 of 10" and filling.filling
    assert any("window 4 of 10" in n for n in filling.notes)
    assert choose([str(tmp_path)], Window(), min_last=4).steps == (10, 20, 30, 40)
    # a list is taken as given, in the order given, and noted when out of step order
    listed = [str(tmp_path / "step-30"), str(tmp_path / "step-10")]
    got = choose(listed, Window())
    assert got.urls == tuple(listed) and got.pattern is None and "out of step order" in got.notes[0]
    # ... and selection flags choose among the listed by step
    assert choose(listed, Window(last=1)).steps == (30,)
    # one directory that is itself a checkpoint is a list of one, not a prefix
    one = choose([str(tmp_path / "step-20")], Window())
    assert one.urls == (str(tmp_path / "step-20"),) and one.steps == (20,)
    _snap(tmp_path, "final", 1)
    with pytest.raises(ConfigError, match="final: no step number"):
        choose([str(tmp_path / "step-10"), str(tmp_path / "final")], Window(last=1))
    with pytest.raises(NotReadyError, match="nothing to do yet: no finished snapshot directories match; nothing"):
        choose([str(tmp_path / "iter_*")], Window(last=1))
    with pytest.raises(NotReadyError, match=r"match; skipped .*final: no step number"):
        choose([str(tmp_path / "f*")], Window(last=1))
    with pytest.raises(ConfigError, match="go together"):
        choose([str(tmp_path)], Window(interval_tokens=80e9))
    with pytest.raises(ConfigError, match="not both"):
        choose([str(tmp_path)], Window(interval_tokens=80e9, tokens_per_step=4e6, interval_steps=5))
