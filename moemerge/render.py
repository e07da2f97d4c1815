"""Printing a table or a JSON list of 92k rows in seconds, byte for byte as rich prints them.

rich lays a table out from every cell (about 1.5 ms a row: 2 minutes for DeepSeek-V3's
91,991 tensors) and `print_json` decodes, re-encodes and highlights the whole document in
memory (2.8 GB). Here rich lays out and draws a small table of the rows that decide the column
widths (per column, the longest cell and the cell with the longest word) and a few more; the
same rows drawn here must match what rich drew, or the whole table is left to rich. Every
other row is drawn from those widths. Cells that rich would read as markup or emoji, or with
characters wider or narrower than one cell, also leave the whole table to rich.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["print_table", "print_json_list"]

#: Printable ASCII without what rich might read as markup (`[tag]`, `\[`) or emoji (`:x:`).
_PLAIN = re.compile(r"[ -~]*")
_SPECIAL = re.compile(r"\[[A-Za-z#/@]|[\\:]")
#: Rows drawn per write: bounded memory, few system calls.
_BATCH = 4096
#: Rows besides the deciding ones that rich draws too, for the check.
_SPREAD = 8


def _plain(cell: str) -> bool:
    return _PLAIN.fullmatch(cell) is not None and _SPECIAL.search(cell) is None


def print_table(console: Console, title: str, columns: Sequence[tuple[str, str]],
                rows: Sequence[tuple[str, ...]]) -> None:
    """Print what `console.print(Table(title=title))` prints for `columns` ((header,
    justify), every column overflow="fold") and `rows` of str cells."""
    from rich.table import Table

    def table(of: Iterable[tuple[str, ...]]) -> Table:
        t = Table(title=title)
        for header, justify in columns:
            t.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for row in of:
            t.add_row(*row)
        return t

    if not all(_plain(c) for row in rows for c in row) or not all(_plain(h) for h, _ in columns):
        console.print(table(rows))
        return
    # the rows that decide the widths, and a few spread over the table, drawn by rich as well
    deciding = sorted(_deciding_rows(rows, len(columns)) | set(range(0, len(rows), max(1, len(rows) // _SPREAD))))
    sample = [rows[i] for i in deciding]
    small = table(sample)
    # what Table.__rich_console__ measures with (print sets no_wrap and overflow for soft_wrap);
    # a private method of rich: the check below sends everything to rich if it ever differs
    options = console.options.update(no_wrap=True, overflow="ignore")
    widths = small._calculate_column_widths(console, options.update_width(options.max_width - small._extra_width))
    with console.capture() as cap:
        console.print(small)
    drawn = cap.get().split("\n")[:-1]
    box = small.box.substitute(options, safe=console.safe_box) if small.box else None
    if box is None:
        console.print(table(rows))
        return
    right = [j == "right" for _, j in columns]
    mine = [line for i, row in enumerate(sample) for line in _row_lines(row, widths, right, box, last=i == len(sample) - 1)]
    head = len(drawn) - len(mine) - 1  # title, top edge, header, its rule; then rows; the bottom edge
    if head < 0 or drawn[head:-1] != mine:
        console.print(table(rows))  # not what this module expects of rich: rich draws it all
        return
    out = console.file
    out.write("\n".join(drawn[:head]) + "\n")
    for start in range(0, len(rows), _BATCH):
        batch = rows[start:start + _BATCH]
        out.write("".join(line + "\n" for i, row in enumerate(batch, start)
                          for line in _row_lines(row, widths, right, box, last=i == len(rows) - 1)))
    out.write(drawn[-1] + "\n")
    out.flush()


def _deciding_rows(rows: Sequence[tuple[str, ...]], n: int) -> set[int]:
    """The rows holding, per column, the longest cell and the longest word (rich's measure of
    a cell is (longest word, longest line); a column's width follows from their maxima)."""
    out: set[int] = set()
    if not rows:
        return out
    for c in range(n):
        cells = [r[c] for r in rows]
        full = [len(x) for x in cells]
        words = [max(map(len, x.split()), default=0) if " " in x else n_ for x, n_ in zip(cells, full)]
        out.add(max(range(len(rows)), key=full.__getitem__))
        out.add(max(range(len(rows)), key=words.__getitem__))
    return out


def _row_lines(row: tuple[str, ...], widths: Sequence[int], right: Sequence[bool], box: Any, *,
               last: bool) -> list[str]:
    """A body row as rich draws it: cells padded one space each side, folded to the width,
    top-aligned; the last row has the box's foot verticals."""
    cells = [_cell_lines(text, w - 2, r) for text, w, r in zip(row, widths, right)]
    height = max(len(c) for c in cells)
    left, mid, end = (box.foot_left, box.foot_vertical, box.foot_right) if last else \
        (box.mid_left, box.mid_vertical, box.mid_right)
    lines = []
    for k in range(height):
        parts = [(" " + c[k] + " ") if k < len(c) else " " * w for c, w in zip(cells, widths)]
        lines.append(left + mid.join(parts) + end)
    return lines


def _cell_lines(text: str, width: int, right: bool) -> list[str]:
    """rich's Text.wrap(width, overflow="fold") of one line of plain ASCII, justified."""
    if width <= 0:
        return [""]
    if len(text) <= width:
        pieces = [text]
    elif " " not in text:  # one word longer than the width: folded every `width` characters
        pieces = [text[i:i + width] for i in range(0, len(text), width)]
    else:
        from rich._wrap import divide_line

        cuts = divide_line(text, width, fold=True)
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        pieces = [_rstrip_end(p, width) for p in pieces]
    if right:
        return [p.rstrip()[:width].rjust(width) for p in pieces]
    return [p[:width].ljust(width) for p in pieces]


def _rstrip_end(text: str, width: int) -> str:
    """rich's Text.rstrip_end: trailing whitespace past `width` is dropped."""
    excess = len(text) - width
    if excess <= 0:
        return text
    spaces = len(text) - len(text.rstrip())
    return text[:len(text) - min(spaces, excess)] if spaces else text


def print_json_list(console: Console, items: Iterator[Any]) -> None:
    """Print what `console.print_json(json.dumps(list(items)))` prints, one item at a time:
    the same text (indent 2, non-ASCII kept), without holding the document."""
    if console.color_system is not None:  # a terminal: rich's highlighting, in batches
        from rich.highlighter import JSONHighlighter

        light = JSONHighlighter()

        def emit(text: str) -> None:
            console.print(light(text), soft_wrap=True, end="")
    else:
        out = console.file

        def emit(text: str) -> None:
            out.write(text)

    batch: list[str] = []
    first = True
    for item in items:
        body = json.dumps(item, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        batch.append(("[\n  " if first else ",\n  ") + body)
        first = False
        if len(batch) >= _BATCH:
            emit("".join(batch))
            batch = []
    batch.append("[]\n" if first else "\n]\n")
    emit("".join(batch))
    if console.color_system is None:
        console.file.flush()
