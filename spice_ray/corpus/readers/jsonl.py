"""A ``.jsonl`` / ``.ndjson`` file: one JSON object per line; ``line`` is the 1-based line number.
A line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (old Mac files); a UTF-8 BOM at the start of a
line is ignored; blank lines are not rows (counted per file as ``blank_lines``). A JSON-lines file
whose first non-blank line is ``{`` alone or opens a ``[`` it does not close on that line, and whose
next non-blank line is not a whole JSON object, is a pretty-printed JSON document, read as ``.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from spice_ray.corpus.readers.base import HEAD_BYTES, _FileInfo, _Item, _limit
from spice_ray.corpus.readers.files import _chunks, _opened
from spice_ray.corpus.readers.json_document import _json_document
from spice_ray.corpus.readers.lines import _BOM, _EOL, _iter_lines


def _whole_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except Exception:  # noqa: BLE001 - any parser failure: not a whole object
        return False


def _pretty_document(head: bytes, at_end: bool, limit: int) -> bool | None:
    """Whether a JSON-lines file is a pretty-printed JSON document: its first non-blank line is
    ``{`` alone or opens a ``[`` it does not close on that line, and the next one is not a whole JSON
    object by itself (so a JSON-lines file whose first line is a broken ``{`` stays JSON lines).
    None: ``head`` (the file's start; all of it when ``at_end``) ends before that next line does."""
    text = head[3:] if head.startswith(_BOM) else head
    lines = _EOL.split(text) if at_end else _EOL.split(text)[:-1]  # complete lines only
    first, *rest = [line.strip() for line in lines if line.strip()][:2] or [b""]
    if not (first == b"{" or (first.startswith(b"[") and not first.endswith(b"]"))):
        return False
    if not rest:
        return True if at_end else None if len(head) <= limit else False
    return not _whole_object(rest[0])


def _read_jsonl(path: Path, info: _FileInfo, max_row_bytes: int | None = None) -> Iterator[_Item]:
    limit = _limit(max_row_bytes)
    with _opened(path) as (stream, hashing):
        chunks = _chunks(stream, stream.read(HEAD_BYTES))  # HEAD_BYTES, then READ_CHUNK at a time
        head = more = next(chunks)
        while (pretty := _pretty_document(head, not more, limit)) is None:
            more = next(chunks, b"")
            head += more
        if pretty:
            yield from _json_document(head + stream.read(), info, limit)
        else:
            yield from _iter_lines(_chunks(stream, head), info, limit)
        info.sha256 = hashing.finish()
