"""A ``.json`` file: one JSON document, read element by element (one bad element is one quarantined
row; a broken element ends at the next ``,``/``]``/``}`` of its own level, brackets and strings
tracked, a string never spanning a line break, so an element with unbalanced brackets can take the
elements after it along). ``line`` is the 1-based position of the element. Layouts:

- an array of rows (pandas ``orient="records"``);
- ``{"columns": [...], "data": [[...], ...]}`` (pandas ``orient="split"``): row i is the i-th
  ``data`` list zipped with ``columns``;
- an object whose values are all objects: column-oriented (pandas' default ``to_json()``:
  ``{"instruction": {"0": ..., "1": ...}, ...}``, row i holds each column's value under the i-th
  index label) when a key is a row field (``instruction``, ``output``, ``prompt``, ``response``,
  ``messages``, ``conversations``), else a dict of rows (pandas ``orient="index"``);
- an object without row fields and exactly one array of objects: that array holds the rows, the
  other keys are metadata and ignored (``{"version": 1, "data": [...]}``, pandas
  ``orient="table"``);
- an object without row fields whose values are mostly objects (at least two, more than half of
  its members): a dict of rows with extra entries (``{"0": {...}, ..., "version": "1"}``); every
  object is a row, every other entry one ``not_object`` row naming its key;
- any other object is one row; a scalar is one ``not_object`` row (``line`` 0).

Content after the top-level value is one ``invalid_json`` row. A ``.json`` file whose first line
is a whole object (ends with ``}``) followed by more lines holds JSON lines (what
``datasets.Dataset.to_json`` writes) and is read as JSONL.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spice_ray.corpus.formats import ROW_FIELDS
from spice_ray.corpus.readers.base import (
    PREVIEW_BYTES,
    _FileInfo,
    _Item,
    _limit,
    _parse_row,
    _preview,
    _utf8_safe,
)
from spice_ray.corpus.readers.files import _opened
from spice_ray.corpus.readers.lines import _BOM, _EOL, _iter_lines

logger = logging.getLogger(__name__)

_STRUCT = re.compile(rb'[\[\]{}",]')
# The rest of a string after its opening quote; NUL bytes (never valid JSON) between a backslash and
# the character it escapes do not end the string early, so a NUL block shifts no element boundary.
_STRING_TAIL = re.compile(rb'[^"\\\n]*+(?:\\\x00*+[^\n][^"\\\n]*+)*+"')
_KEY = re.compile(rb'"(?:[^"\\\n]|\\\x00*+[^\n])*+"[ \t\r\n]*:[ \t\r\n]*')
_SPACE = re.compile(rb"[ \t\r\n]*")
_CLOSER_OF = {ord("["): ord("]"), ord("{"): ord("}")}
_QUOTE, _COMMA, _RBRACKET, _RBRACE = ord('"'), ord(","), ord("]"), ord("}")


@dataclass
class _Member:
    """A member of a JSON object: the span of its value, or of the whole member when ``key`` is
    None (not a ``"key": value`` pair)."""

    key: str | None
    start: int
    end: int


def _skip_space(data: bytes, pos: int) -> int:
    m = _SPACE.match(data, pos)
    return m.end() if m is not None else pos


def _rstrip_space(data: bytes, start: int, end: int) -> int:
    while end > start and data[end - 1] in b" \t\r\n":
        end -= 1
    return end


def _string_end(data: bytes, pos: int) -> int:
    """The end of the string whose opening quote is before ``pos``; a string never spans a line
    (an unterminated one ends at the line end)."""
    m = _STRING_TAIL.match(data, pos)
    if m is not None:
        return m.end()
    newline = data.find(b"\n", pos)
    return len(data) if newline < 0 else newline + 1


def _element_end(data: bytes, pos: int, closer: int) -> int:
    """The index of the ``,`` or ``closer`` that ends the element starting at ``pos`` (at its own
    nesting level; strings and brackets tracked), or ``len(data)``. A broken element ends there too:
    a mismatched bracket closes the innermost open one; a stray one is part of the element."""
    stack: list[int] = []
    while (m := _STRUCT.search(data, pos)) is not None:
        i = m.start()
        c, pos = data[i], i + 1
        if c == _QUOTE:
            pos = _string_end(data, pos)
        elif c in _CLOSER_OF:
            stack.append(_CLOSER_OF[c])
        elif c == _COMMA:
            if not stack:
                return i
        elif stack:
            if c in stack:
                while stack.pop() != c:
                    pass
            else:
                stack.pop()
        elif c == closer:
            return i
    return len(data)


def _element(line: int, data: bytes, start: int, end: int, limit: int) -> _Item:
    """The row in ``data[start:end]`` (trailing whitespace excluded); only a preview of it is
    copied when it is over ``limit``."""
    end = _rstrip_space(data, start, end)
    size = end - start
    body = data[start : start + PREVIEW_BYTES] if size > limit else data[start:end]
    return _parse_row(line, body, size, limit)


def _array_items(data: bytes, pos: int, limit: int) -> Generator[_Item, None, tuple[int, int]]:
    """The elements of the array whose ``[`` is just before ``pos``, one row each; returns their
    count and the index after the closing ``]``."""
    n = 0
    while True:
        pos = _skip_space(data, pos)
        if pos >= len(data) or data[pos] == _RBRACKET:
            return n, min(pos + 1, len(data))
        end = _element_end(data, pos, _RBRACKET)
        n += 1
        yield _element(n, data, pos, end, limit)
        pos = end + 1 if end < len(data) and data[end] == _COMMA else end


def _member(data: bytes, start: int, end: int) -> _Member:
    m = _KEY.match(data, start, end)
    if m is not None and m.end() < end:
        try:
            key = json.loads(data[start : m.end()].rstrip(b" \t\r\n:"))
        except ValueError:
            key = None
        if isinstance(key, str):
            return _Member(key, m.end(), end)
    return _Member(None, start, end)


def _members(data: bytes, pos: int) -> tuple[list[_Member], int]:
    """The members of the object whose ``{`` is just before ``pos``, and the index after its ``}``."""
    members: list[_Member] = []
    while True:
        pos = _skip_space(data, pos)
        if pos >= len(data) or data[pos] == _RBRACE:
            return members, min(pos + 1, len(data))
        end = _element_end(data, pos, _RBRACE)
        members.append(_member(data, pos, _rstrip_space(data, pos, end)))
        pos = end + 1 if end < len(data) and data[end] == _COMMA else end


def _layout(data: bytes, members: list[_Member]) -> str:
    """How a top-level object holds its rows (see the module doc): split, columns, rows, wrapper or row."""
    kinds = {m.key: data[m.start] for m in members if m.key is not None and m.start < m.end}
    fields = ROW_FIELDS & kinds.keys()
    lists = [m for m in members if m.key is not None and kinds.get(m.key) == ord("[")]
    if not fields and {"columns", "data"} <= {m.key for m in lists}:
        return "split"
    if kinds and all(c == ord("{") for c in kinds.values()):
        return "columns" if fields else "rows"
    first = _skip_space(data, lists[0].start + 1) if lists else len(data)
    if not fields and len(lists) == 1 and first < len(data) and data[first] in b"{]":
        return "wrapper"
    objects = sum(1 for c in kinds.values() if c == ord("{"))
    if not fields and objects >= 2 and 2 * objects > len(members):
        return "rows"  # a dict of rows with a few extra (metadata) entries, each quarantined
    return "row"


def _bad_member(line: int, data: bytes, m: _Member) -> _Item:
    return _Item(line, raw=_preview(data[m.start : m.start + PREVIEW_BYTES]), raw_bytes=m.end - m.start,
                 reason="invalid_json", detail='not a "key": value member')


_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array",
               type(None): "null"}


def _dict_row(line: int, data: bytes, m: _Member, limit: int) -> _Item:
    """The row under key ``m.key`` of a dict of rows; an entry that is not an object (a ``"version"``
    beside the rows) is one ``not_object`` row naming its key."""
    item = _element(line, data, m.start, m.end, limit)
    if item.reason is None and not isinstance(item.value, dict):
        what = _JSON_TYPES.get(type(item.value), type(item.value).__name__)
        item.reason = "not_object"
        item.detail = f"entry {_utf8_safe(str(m.key))[:80]!r} of a dict of rows is {what}, not a row"
    return item


def _column_items(data: bytes, members: list[_Member], limit: int) -> Iterator[_Item]:
    """Rows of a column-oriented object (pandas ``to_json()``): row i holds every column's value
    under the i-th index label (in first-seen order)."""
    cells: dict[str, dict[str, tuple[int, int]]] = {}
    labels: dict[str, None] = {}
    for m in members:
        if m.key is None:
            logger.warning("column layout: ignoring a malformed column at byte %d", m.start)
            continue
        column = cells.setdefault(m.key, {})
        for cell in _members(data, m.start + 1)[0]:
            if cell.key is not None:
                column[cell.key] = (cell.start, cell.end)
                labels.setdefault(cell.key)
    for n, label in enumerate(labels, 1):
        yield _column_row(n, data, {k: col[label] for k, col in cells.items() if label in col}, limit)


def _column_row(line: int, data: bytes, cells: dict[str, tuple[int, int]], limit: int) -> _Item:
    size = sum(end - start for start, end in cells.values())
    if size > limit:
        preview = b", ".join(data[s : s + PREVIEW_BYTES] for s, _ in cells.values())
        return _Item(line, raw=_preview(preview), raw_bytes=size, reason="too_long",
                     detail=f"row of {size} bytes > MAX_ROW_BYTES {limit} (not parsed)")
    value: dict[str, Any] = {}
    for key, (start, end) in cells.items():
        item = _parse_row(line, data[start:end], end - start, limit)
        if item.reason is not None:
            item.detail, item.raw_bytes = f"column {key!r}: {item.detail}", size
            return item
        value[key] = item.value
    return _Item(line, value=value)


def _split_items(data: bytes, members: list[_Member], limit: int) -> Iterator[_Item]:
    """Rows of a ``{"columns": [...], "data": [[...], ...]}`` object (pandas ``orient="split"``)."""
    by_key = {m.key: m for m in members if m.key is not None}
    cols = by_key["columns"]
    try:
        columns = json.loads(data[cols.start : cols.end])
    except ValueError:
        columns = None
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        yield _Item(0, raw=_preview(data[cols.start : cols.end]), raw_bytes=cols.end - cols.start,
                    reason="invalid_json", detail="split layout: columns is not a list of strings")
        return
    for item in _array_items(data, by_key["data"].start + 1, limit):
        if item.reason is None:
            if isinstance(item.value, list) and len(item.value) == len(columns):
                item.value = dict(zip(columns, item.value))
            else:
                what = f"a list of {len(item.value)}" if isinstance(item.value, list) else type(item.value).__name__
                item.reason, item.detail = "not_object", f"split row is {what}, expected {len(columns)} values"
        yield item


def _object_items(data: bytes, pos: int, limit: int) -> Generator[_Item, None, tuple[int, int]]:
    """The rows of the top-level object at ``pos``; returns their count and the index after it."""
    members, end = _members(data, pos + 1)
    layout = _layout(data, members)
    n = 0
    if layout == "row":
        n = 1
        yield _element(1, data, pos, end, limit)
    elif layout == "rows":
        for n, m in enumerate(members, 1):
            yield _dict_row(n, data, m, limit) if m.key is not None else _bad_member(n, data, m)
    elif layout == "wrapper":
        rows = next(m for m in members if m.key is not None and data[m.start] == ord("["))
        logger.debug("reading the rows of key %r (other keys ignored)", rows.key)
        n = (yield from _array_items(data, rows.start + 1, limit))[0]
    else:
        for n, item in enumerate((_split_items if layout == "split" else _column_items)(data, members, limit), 1):
            yield item
    return n, end


def _json_lines(data: bytes, pos: int) -> bool:
    """A ``.json`` file holding JSON lines: its first line ends with ``}`` and more follows."""
    eol = _EOL.search(data, pos)
    if eol is None or _skip_space(data, eol.end()) >= len(data):
        return False
    return data[_rstrip_space(data, pos, eol.start()) - 1] == _RBRACE


def _json_document(data: bytes, info: _FileInfo, limit: int) -> Iterator[_Item]:
    """The rows of one JSON document (see the module doc for the layouts)."""
    pos = _skip_space(data, 3 if data.startswith(_BOM) else 0)
    if pos >= len(data):
        return
    if data[pos] == ord("{") and _json_lines(data, pos):
        yield from _iter_lines([data], info, limit)
        return
    if data[pos] in b"[{":
        items = _array_items(data, pos + 1, limit) if data[pos] == ord("[") else _object_items(data, pos, limit)
        n, end = yield from items
        rest = _skip_space(data, end)
        if rest < len(data):
            yield _Item(n + 1, raw=_preview(data[rest : rest + PREVIEW_BYTES]), raw_bytes=len(data) - rest,
                        reason="invalid_json", detail="content after the top-level value")
        return
    item = _element(0, data, pos, len(data), limit)
    if item.reason is None:
        item.reason, item.detail = "not_object", f"top level is {type(item.value).__name__}"
    yield item


def _read_json(path: Path, info: _FileInfo, max_row_bytes: int | None = None) -> Iterator[_Item]:
    with _opened(path) as (stream, hashing):
        data = stream.read()
        info.sha256 = hashing.finish()
    yield from _json_document(data, info, _limit(max_row_bytes))

