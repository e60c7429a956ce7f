"""Readers: one per corpus format behind one registry (:data:`READERS`, format suffix -> reader);
:func:`_read_items` reads any collected file through it, row by row (:class:`~.base._Item`).

- ``.jsonl`` / ``.ndjson``: one JSON object per line (:mod:`.jsonl`).
- ``.json``: one JSON document, read element by element (:mod:`.json_document`, with its layouts).
- ``.parquet``: one row per table row; ``line`` is the 1-based row number (:mod:`.parquet`).
- Compressed: ``.jsonl.gz``, ``.ndjson.gz``, ``.json.gz``, and the same with ``.zst`` when the
  ``zstandard`` package is installed (without it a ``.zst`` file named explicitly is an
  :class:`~spice_ray.corpus.discovery.IngestError`, one found in a folder an
  ``unsupported_compression`` row). ``sha256`` and ``bytes`` in the file list are those of the
  stored (compressed) file (:mod:`.files`).

``line = 0`` in the quarantine means the whole file. A file is quarantined whole only when it cannot
be read by rows: ``binary_file`` when its start looks binary (NUL or mostly undecodable bytes), no
row in it parses and at least half its bytes are in rows that are not text; ``unreadable_file``
when it cannot be opened or fails while being read (a file removed during ingest, a corrupt gzip or
Parquet stream, a 0-byte Parquet, ``.gz`` or ``.zst`` file — a failed upload, logged as a warning
too; the rows read before the failure stay); and a path discovery flagged without opening it
(``symlink_outside_root``, ``unsupported_compression``). A 0-byte ``.jsonl`` or ``.json`` file is an
empty file: no rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spice_ray.corpus.readers.base import (
    HEAD_BYTES,
    _FileInfo,
    _Flagged,
    _Item,
    _looks_binary,
    _preview,
    _shown,
)
from spice_ray.corpus.readers.files import COMPRESSIONS, _opened, _read_errors, _sha256, _split_suffix, _suffix
from spice_ray.corpus.readers.json_document import _read_json
from spice_ray.corpus.readers.jsonl import _read_jsonl
from spice_ray.corpus.readers.parquet import _read_parquet

logger = logging.getLogger(__name__)

ReadFn = Callable[[Path, _FileInfo], Iterator[_Item]]


@dataclass(frozen=True)
class Reader:
    """One format: its rows, its name in messages, and whether its files are text (a binary start
    is checked; 0 bytes is an empty file) or a binary container (never 0 bytes, like a compressed
    stream)."""

    read: ReadFn
    name: str
    text: bool = True


READERS: dict[str, Reader] = {
    ".jsonl": Reader(_read_jsonl, "JSON lines"),
    ".ndjson": Reader(_read_jsonl, "JSON lines"),
    ".json": Reader(_read_json, "JSON"),
    ".parquet": Reader(_read_parquet, "Parquet", text=False),
}


def _binary_as_a_whole(items: Iterator[_Item]) -> bool:
    """No row parses, and at least half the bytes are in rows that are not text."""
    bad = total = 0
    for item in items:
        if item.reason is None:
            return False
        total += item.raw_bytes or 0
        if item.reason in ("binary_line", "invalid_utf8"):
            bad += item.raw_bytes or 0
    return bad > 0 and 2 * bad >= total


def _checked(path: Path, info: _FileInfo, reader: ReadFn) -> Iterator[_Item]:
    """``reader``'s rows, or one ``binary_file`` row when the file is binary as a whole."""
    with _opened(path) as (stream, _):
        head = stream.read(HEAD_BYTES)
    if _looks_binary(head):
        scratch = _FileInfo(path=info.path, bytes=info.bytes)
        with contextlib.closing(reader(path, scratch)) as items:
            binary = _binary_as_a_whole(items)
        if binary:
            info.sha256 = scratch.sha256
            yield _Item(0, raw=_preview(head[:256]), raw_bytes=info.bytes, reason="binary_file",
                        detail=f"{info.bytes} bytes that are not UTF-8 text")
            return
    yield from reader(path, info)


def _guarded(path: Path, info: _FileInfo, items: Iterator[_Item]) -> Iterator[_Item]:
    """``items``, then one ``unreadable_file`` row if reading fails (the rows before it stay)."""
    n = 0
    try:
        for item in items:
            n += 1
            yield item
    except _read_errors() as e:
        info.sha256 = info.sha256 or _sha256(path)
        where = f" after {n} rows" if n else ""
        yield _Item(0, raw="", raw_bytes=info.bytes, reason="unreadable_file",
                    detail=f"{type(e).__name__}{where}: {e}"[:500])


def _empty_file(path: Path, info: _FileInfo, kind: str) -> _Item:
    """The one ``unreadable_file`` row of a 0-byte file of a format that is never empty (Parquet,
    gzip, zstd): an interrupted or failed upload, not an empty corpus."""
    info.sha256 = _sha256(path)
    detail = f"empty file (0 bytes): not a valid {kind} file (an interrupted or failed upload?)"
    logger.warning("quarantining %s: %s", _shown(info.path), detail)
    return _Item(0, raw="", raw_bytes=0, reason="unreadable_file", detail=detail)


def _read_items(path: Path, info: _FileInfo) -> Iterator[_Item]:
    """Every row of one collected file (a flagged path is one whole-file row, never opened)."""
    if isinstance(path, _Flagged):
        yield _Item(0, raw="", raw_bytes=0, reason=path.reason, detail=path.detail)
        return
    fmt, compression = _split_suffix(_suffix(path) or path.suffix.lower())
    reader = READERS[fmt]
    if info.bytes == 0 and (not reader.text or compression is not None):
        yield _empty_file(path, info, COMPRESSIONS[compression].name if compression else reader.name)
        return
    items = _checked(path, info, reader.read) if reader.text else reader.read(path, info)
    yield from _guarded(path, info, items)
