"""Splitting a byte stream into lines (``\\n``, ``\\r\\n`` or a lone ``\\r``) and lines into rows:
a JSON-lines file, or a ``.json`` file that holds JSON lines."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from spice_ray.corpus.readers.base import PREVIEW_BYTES, _FileInfo, _Item, _parse_row

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def _split_lines(chunks: Iterable[bytes], limit: int) -> Iterator[tuple[bytes, int]]:
    """``(body, size)`` of every line of the concatenated ``chunks``; a line ends at ``\\n``,
    ``\\r\\n`` or a lone ``\\r``. A line over ``limit`` bytes is never held whole: its body is its
    first ``PREVIEW_BYTES`` and the rest is dropped as it is read."""
    rest = b""  # the start of the current line, from earlier chunks
    head: bytes | None = None  # the preview of the current line once it is over limit
    dropped = 0  # bytes of the current line dropped so far
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        pos = 0
        while (m := _EOL.search(data, pos)) is not None:
            if m.end() == len(data) and data[m.start()] == 13:
                break  # a "\r" at the end of the chunk: maybe the first half of "\r\n"
            size = dropped + m.start() - pos
            if head is None:
                head = data[pos : m.start() if size <= limit else pos + PREVIEW_BYTES]
            yield head, size
            head, dropped, pos = None, 0, m.end()
        rest = data[pos:]
        if dropped or len(rest) > limit:
            keep = 1 if rest.endswith(b"\r") else 0
            head = rest[:PREVIEW_BYTES] if head is None else head
            dropped += len(rest) - keep
            rest = rest[len(rest) - keep :]
    if rest or dropped:
        body = rest[:-1] if rest.endswith(b"\r") else rest
        yield (head if head is not None else body), dropped + len(body)


def _iter_lines(chunks: Iterable[bytes], info: _FileInfo, limit: int) -> Iterator[_Item]:
    for lineno, (body, size) in enumerate(_split_lines(chunks, limit), 1):
        if body.startswith(_BOM):
            body, size = body[3:], size - 3
        if size == len(body) and not body.strip():
            info.blank_lines += 1
            continue
        yield _parse_row(lineno, body, size, limit)
