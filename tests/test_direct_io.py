"""io/direct.py: large local reads and writes that bypass the page cache give exactly the
bytes buffered ones give: unaligned ranges, ranges crossing bounce pieces, the end of a file,
neighbours sharing a block written at the same time, a cold file and a cached one; where the
file system or device refuses O_DIRECT, or the user switches it off, everything is buffered;
a merge writes the same bytes either way."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest
import torch

import moemerge
from moemerge.errors import CheckpointError, OutputError
from moemerge.io import direct, storage
from conftest import write_checkpoint


def _rng() -> random.Random:
    return random.Random(int.from_bytes(os.urandom(4), "little"))


def _file(path: Path, n: int, rng: random.Random) -> bytes:
    data = rng.randbytes(n)
    path.write_bytes(data)
    return data


def _cold(path: Path) -> None:
    """Drop `path`'s pages from the page cache (clean after fsync), so reads go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_or_skip(path: Path) -> int:
    dfd = direct.open_direct(str(path), os.O_RDONLY)
    if dfd is None:
        pytest.skip("this file system refuses O_DIRECT")
    return dfd


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct transfers from 8 KiB in 3-block pieces, so small files cross many pieces."""
    monkeypatch.setattr(direct, "DIRECT_MIN", 8192)
    monkeypatch.setattr(direct, "PIECE", 3 * direct.ALIGN)


def test_direct_reads_give_the_bytes_at_any_offset_and_length(tmp_path: Path, small_pieces: None) -> None:
    rng = _rng()
    path = tmp_path / "f.bin"
    data = _file(path, 5 * direct.ALIGN * 7 + rng.randrange(1, direct.ALIGN), rng)
    _cold(path)
    dfd = _direct_or_skip(path)
    try:
        for _ in range(200):
            a = rng.randrange(0, len(data))
            b = rng.randrange(a + 1, len(data) + 1)
            out = bytearray(b - a)
            assert direct.read_direct(dfd, a, memoryview(out)) == b - a
            assert out == data[a:b], (a, b)
        # past the end: only what the file holds
        out = bytearray(2 * direct.ALIGN)
        start = len(data) - 100
        assert direct.read_direct(dfd, start, memoryview(out)) == 100
        assert out[:100] == data[start:]
    finally:
        os.close(dfd)


@pytest.mark.parametrize("cold", [True, False])
def test_a_source_reads_the_same_bytes_cold_or_cached(tmp_path: Path, small_pieces: None,
                                                      monkeypatch: pytest.MonkeyPatch, cold: bool) -> None:
    rng = _rng()
    path = tmp_path / "f.bin"
    data = _file(path, 64 * direct.ALIGN + rng.randrange(1, direct.ALIGN), rng)
    if cold:
        _cold(path)
        _direct_or_skip(path)
    calls = []
    real = direct.read_direct

    def counting(dfd: int, offset: int, out: memoryview) -> int:
        calls.append(offset)
        return real(dfd, offset, out)

    monkeypatch.setattr(direct, "read_direct", counting)
    src = storage._LocalSource(str(path))
    try:
        for _ in range(50):
            a = rng.randrange(0, len(data) - 1)
            b = rng.randrange(a + 1, len(data) + 1)
            out = bytearray(b - a)
            src.read_into(a, memoryview(out))
            assert out == data[a:b]
    finally:
        src.close()
    if cold:
        assert calls, "cold large reads should have gone direct"
    elif not direct._no_cachestat:
        assert not calls, "a cached file should be read from the cache"


def test_a_file_that_shrank_is_an_error_naming_it(tmp_path: Path, small_pieces: None) -> None:
    rng = _rng()
    path = tmp_path / "f.bin"
    _file(path, 40 * direct.ALIGN, rng)
    src = storage._LocalSource(str(path))
    try:
        os.truncate(path, 10 * direct.ALIGN + 5)
        _cold(path)
        with pytest.raises(CheckpointError, match=r"f\.bin: file ended at byte"):
            src.read_into(4 * direct.ALIGN, memoryview(bytearray(20 * direct.ALIGN)))
    finally:
        src.close()


def test_neighbours_sharing_blocks_written_at_once_give_the_whole(tmp_path: Path, small_pieces: None) -> None:
    """Tensors laid out back to back share partial blocks: each writer's partial blocks go
    buffered, whole blocks direct, and the file ends up exactly the concatenation."""
    rng = _rng()
    path = tmp_path / "out.bin"
    cuts = sorted(rng.sample(range(1, 200 * direct.ALIGN), 40))
    bounds = [0, *cuts, 200 * direct.ALIGN + 77]
    data = rng.randbytes(bounds[-1])
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    dfd = direct.open_direct(str(path), os.O_WRONLY)
    if dfd is None:
        os.close(fd)
        pytest.skip("this file system refuses O_DIRECT")
    ranges = list(zip(bounds, bounds[1:]))
    rng.shuffle(ranges)
    halves = [ranges[0::2], ranges[1::2]]

    def write(part: list[tuple[int, int]]) -> None:
        for a, b in part:
            direct.write_direct(fd, dfd, memoryview(data)[a:b], a)

    threads = [threading.Thread(target=write, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.fsync(fd)
    os.close(dfd)
    os.close(fd)
    assert path.read_bytes() == data
    _cold(path)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_refused_o_direct_means_buffered(tmp_path: Path, small_pieces: None, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = _rng()
    path = tmp_path / "f.bin"
    data = _file(path, 30 * direct.ALIGN + 3, rng)
    _cold(path)
    real_open = os.open

    def no_direct(p: str, flags: int, *a: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    assert direct.open_direct(str(path), os.O_RDONLY) is None
    src = storage._LocalSource(str(path))
    try:
        out = bytearray(len(data) - 5)
        src.read_into(5, memoryview(out))
        assert out == data[5:]
    finally:
        src.close()


def test_a_device_wanting_another_alignment_falls_back_to_buffered(tmp_path: Path, small_pieces: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = _rng()
    path = tmp_path / "f.bin"
    data = _file(path, 30 * direct.ALIGN + 3, rng)
    _cold(path)
    _direct_or_skip(path)

    def einval(dfd: int, offset: int, out: memoryview) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(direct, "read_direct", einval)
    src = storage._LocalSource(str(path))
    try:
        for a in (0, 7, direct.ALIGN + 1):
            out = bytearray(len(data) - a)
            src.read_into(a, memoryview(out))
            assert out == data[a:]
    finally:
        src.close()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "0")
    assert not direct.enabled()
    (tmp_path / "f").write_bytes(b"x")
    assert direct.open_direct(str(tmp_path / "f"), os.O_RDONLY) is None
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "1")
    assert direct.enabled() == hasattr(os, "O_DIRECT")


def test_a_failed_direct_write_names_the_file(tmp_path: Path, small_pieces: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from moemerge.io.writer import LocalModelWriter

    real = os.pwrite
    direct_fds: set[int] = set()
    real_open = direct.open_direct

    def track(p: str, flags: int) -> int | None:
        fd = real_open(p, flags)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    def full(fd: int, data: object, offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(direct, "open_direct", track)
    monkeypatch.setattr(os, "pwrite", full)
    g = torch.Generator().manual_seed(_rng().randrange(1 << 30))
    src = write_checkpoint(tmp_path / "m", {"model.layers.0.mlp.w.weight": torch.randn(256, 512, generator=g).bfloat16()})
    cfg = {"merge_method": "linear", "models": [{"model": str(src), "parameters": {"weight": 1.0}}]}
    with pytest.raises(OutputError, match=r"model.*\.safetensors: write failed .*No space left"):
        moemerge.run(cfg, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "moemerge_manifest.json").exists()
    assert LocalModelWriter  # the writer that raised


def test_a_merge_writes_the_same_bytes_direct_or_buffered(tmp_path: Path, small_pieces: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(_rng().randrange(1 << 30))
    paths = []
    for i in range(3):
        # MiB-sized tensors: the kernel's read-ahead after the header read does not cache them
        tensors = {f"model.layers.{k}.mlp.w.weight": torch.randn(512 + k, 1024, generator=g).bfloat16()
                   for k in range(4)}
        tensors["model.norm.weight"] = torch.randn(1024, generator=g).float()
        paths.append(write_checkpoint(tmp_path / f"m{i}", tensors, shards=2))
    cfg = {"merge_method": "ties", "base_model": str(paths[0]), "parameters": {"density": 0.5},
           "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths[1:]]}
    monkeypatch.setattr(storage._LocalSource, "prefetch", lambda self, offset, nbytes: None)  # keep inputs cold
    reads: list[int] = []
    real = direct.read_direct
    monkeypatch.setattr(direct, "read_direct", lambda dfd, offset, out: reads.append(offset) or real(dfd, offset, out))
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MOEMERGE_DIRECT_IO", mode)
        for p in paths:
            for f in p.glob("*.safetensors"):
                _cold(f)
        out = tmp_path / f"out{mode}"
        moemerge.run(cfg, str(out), progress=False, memory_budget="64MB", chunk_rows=64)
        outs[mode] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert outs["1"] == outs["0"] and outs["1"]
    if direct.open_direct(str(paths[0] / "model.safetensors.index.json"), os.O_RDONLY) is not None:
        assert reads, "the merge's input reads should have gone direct"


def test_pma_update_state_and_output_are_the_same_direct_or_buffered(tmp_path: Path, small_pieces: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`pma update` reads and writes its state's chunk files around the page cache too
    (pma/state_io.py): three nights with direct I/O give the state files, their checksums and
    the output of three nights without it."""
    from moemerge.pma.update import update

    g = torch.Generator().manual_seed(_rng().randrange(1 << 30))
    snaps = {}
    for step in range(1, 6):
        snaps[step] = {f"model.layers.{k}.mlp.w.weight": (torch.randn(300 + k, 256, generator=g) * 0.1).bfloat16()
                       for k in range(3)}
    written: list[str] = []
    real = direct.write_once

    def tracking(fd: int, path: str, data: memoryview, offset: int) -> bool:
        done = real(fd, path, data, offset)
        if done:
            written.append(path)
        return done

    monkeypatch.setattr(direct, "write_once", tracking)
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MOEMERGE_DIRECT_IO", mode)
        root = tmp_path / f"mode{mode}"
        for step in range(1, 4):
            write_checkpoint(root / "ckpt" / f"step-{step:08d}", snaps[step])
        kw = dict(method="wma", last=3, memory_budget="64MB")
        update(str(root / "state"), str(root / "ckpt" / "step-*"), str(root / "out"), **kw)
        for step in (4, 5):
            write_checkpoint(root / "ckpt" / f"step-{step:08d}", snaps[step])
            for f in (root / "state").rglob("*"):
                if f.is_file():
                    _cold(f)
            res = update(str(root / "state"), str(root / "ckpt" / "step-*"), str(root / "out"), **kw)
            assert res.action == "updated"
        results[mode] = ({f.relative_to(root / "state").as_posix(): f.read_bytes()
                          for f in sorted((root / "state").rglob("*")) if f.is_file() and "lock" not in f.name},
                         {f.name: f.read_bytes() for f in sorted((root / "out").glob("*.safetensors"))})
        if mode == "1" and direct.open_direct(str(next((root / "out").glob("*.safetensors"))), os.O_RDONLY) is not None:
            assert any("state" in p for p in written), "state chunks should have been written direct"
    state1, out1 = results["1"]
    state0, out0 = results["0"]
    assert out1 == out0 and out1

    def chunks(state: dict[str, bytes]) -> dict[str, bytes]:  # by array and index (version names differ)
        return {k.split("/", 1)[1]: v for k, v in state.items() if "/c/" in k}

    assert chunks(state1) and chunks(state1) == chunks(state0)
