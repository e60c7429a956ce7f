"""Tables for people and for scripts, never cut.

- On a terminal: a rich table whose cells fold onto more lines when the terminal is narrow (never
  an ellipsis); on one too narrow for the columns, each row as a block of ``column: value`` lines.
- Piped or redirected: tab-separated columns under a header line, every value whole (a title, if
  any, as a ``# `` comment line above it), for ``cut``, ``awk``, ``column -t`` or a spreadsheet.
- ``--json``: the rows as JSON objects with their raw values (:func:`print_json`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _tsv_cell(value: str) -> str:
    return " ".join(value.split("\t")).replace("\r", " ").replace("\n", " ")


def tsv(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Tab-separated lines: the header, then one line per row (tabs and newlines in a value become spaces)."""
    return "".join("\t".join(_tsv_cell(str(v)) for v in line) + "\n" for line in [columns, *rows])


def column_widths(columns: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[int] | None:
    """Widths that fit a terminal ``width`` columns wide, borders included: None when every column fits
    whole; else headers wrap at their spaces, the narrow columns keep their width and the wide ones
    share the rest equally (a water level), so a long value folds over a few lines rather than every
    cell over many."""
    cells = [max((len(str(row[i])) for row in rows), default=0) for i in range(len(columns))]
    room = max(len(columns), _room(columns, width))
    if sum(max(len(name), c) for name, c in zip(columns, cells, strict=True)) <= room:
        return None
    # a header may wrap at its spaces: what a column needs is its widest value or header word
    natural = [max([c, *(len(word) for word in name.split())]) for name, c in zip(columns, cells, strict=True)]
    level, left, wide = room, room, sorted(natural)
    for i, n in enumerate(wide):
        share = left // (len(wide) - i)
        if n > share:
            level = share
            break
        left -= n
    return [max(1, min(n, level)) for n in natural]


def rich_table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None, width: int = 80) -> Table:
    """A rich table for a terminal ``width`` columns wide whose cells fold (wrap, breaking a long
    value if need be) instead of being cut."""
    table = Table(title=title, title_justify="left")
    widths = column_widths(columns, rows, width)
    for i, name in enumerate(columns):
        table.add_column(Text(name, overflow="fold"), overflow="fold", width=widths[i] if widths else None)
    for row in rows:
        table.add_row(*(Text(str(v)) for v in row))  # Text: a value is never read as rich markup
    return table


MIN_COLUMN = 4  # below this many characters a column, a table is unreadable: one row per block instead


def _room(columns: Sequence[str], width: int) -> int:
    return width - (3 * len(columns) + 1)  # "│ " + " │ " between columns + " │"


def print_table(console: Console, columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> None:
    """A rich table on a terminal (each row as ``column: value`` lines on one too narrow for it);
    tab-separated columns with a header when piped or redirected. No value is ever cut."""
    if not console.is_terminal:
        if title:
            console.file.write(f"# {_tsv_cell(title)}\n")
        console.file.write(tsv(columns, rows))
        console.file.flush()
    elif _room(columns, console.width) >= MIN_COLUMN * len(columns):
        console.print(rich_table(columns, rows, title=title, width=console.width))
    else:
        console.print(records(columns, rows, title=title))


def records(columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> Text:
    """Each row as a block of ``column: value`` lines (the terminal wraps a long value, whole)."""
    width = max(len(c) for c in columns)
    lines = [title, ""] if title else []
    for row in rows:
        lines += [f"{name:<{width}}  {value}" for name, value in zip(columns, row, strict=True)] + [""]
    return Text("\n".join(lines).rstrip("\n"), overflow="fold")


def print_json(console: Console, value: Any) -> None:
    """``value`` as indented JSON on the console's file, exactly (no markup, no wrapping)."""
    console.file.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    console.file.flush()
