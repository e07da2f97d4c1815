"""`inspect` prints its table and its JSON byte for byte as rich printed them (moemerge/render.py),
whatever the cells and the console width; rich lays out only the rows that decide the widths."""

from __future__ import annotations

import io
import json
import random
import string
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from moemerge.render import print_json_list, print_table

COLUMNS = [("name", "left"), ("dtype", "left"), ("shape", "left"), ("bytes", "right"), ("shard", "left")]


def _console(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, highlight=False, soft_wrap=True), buf


def _rich(width: int, title: str, rows: list[tuple[str, ...]]) -> str:
    console, buf = _console(width)
    t = Table(title=title)
    for header, justify in COLUMNS:
        t.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    return buf.getvalue()


def _ours(width: int, title: str, rows: list[tuple[str, ...]]) -> str:
    console, buf = _console(width)
    print_table(console, title, COLUMNS, rows)
    return buf.getvalue()


def _cell(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        return f"[{rng.randrange(1, 10**6)}, {rng.randrange(1, 10**4)}]"
    if kind < 0.4:
        return f"{rng.uniform(0, 1000):.2f} {rng.choice(['KB', 'MB', 'GB'])}"
    alphabet = string.ascii_letters + string.digits + "._-" + "  "
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))


@pytest.mark.parametrize("width", [20, 40, 80, 120, 250])
def test_table_matches_rich_for_fresh_random_rows(width: int) -> None:
    rng = random.Random()
    for _ in range(25):
        rows = [tuple(_cell(rng) for _ in COLUMNS) for _ in range(rng.randrange(0, 15))]
        assert _ours(width, "/tmp/ckpt", rows) == _rich(width, "/tmp/ckpt", rows), rows


@pytest.mark.parametrize("cell", ["[bold]x[/bold]", "a:smile:b", "caf\u00e9", "tab\tbed", "two\nlines", "back\\[x]"])
def test_cells_rich_would_read_differently_are_left_to_rich(cell: str) -> None:
    rows = [("model.layers.0.w", "BF16", "[4, 4]", "32 B", cell), (cell, "F32", "[1]", "4 B", "x")]
    assert _ours(60, "s3://bucket/ckpt", rows) == _rich(60, "s3://bucket/ckpt", rows)


def test_rich_lays_out_only_the_deciding_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    added = []
    original = Table.add_row

    def counting(self: Table, *cells: Any, **kw: Any) -> None:
        added.append(cells)
        original(self, *cells, **kw)

    rng = random.Random()
    rows = [(f"model.layers.{i}.mlp.experts.{rng.randrange(256)}.down_proj.weight", "F8_E4M3", "[7168, 2048]",
             "14.68 MB", f"model-{i % 163 + 1:05d}-of-000163.safetensors") for i in range(2000)]
    expected = _rich(80, "/ckpt", rows)
    monkeypatch.setattr(Table, "add_row", counting)
    assert _ours(80, "/ckpt", rows) == expected
    assert len(added) <= 2 * len(COLUMNS) + 8 + 1  # the deciding rows and a few spread over the table


@pytest.mark.parametrize("n", [0, 1, 5])
def test_json_list_matches_print_json(n: int) -> None:
    rng = random.Random()
    items = [{"name": f"w.{rng.randrange(10**6)}\u00e9\"", "dtype": "BF16",
              "shape": [rng.randrange(9) for _ in range(rng.randrange(3))], "bytes": rng.randrange(10**12),
              "file": "model.safetensors"} for _ in range(n)]
    console, buf = _console(80)
    console.print_json(json.dumps(items))
    ours_console, ours = _console(80)
    print_json_list(ours_console, iter(items))
    assert ours.getvalue() == buf.getvalue()
