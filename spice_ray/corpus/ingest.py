"""Ingest: read corpus files, normalise and validate every row, write records and quarantine.

Inputs are files, folders (walked recursively; hidden names skipped) or glob patterns, read in
order (a folder's files sorted by their relative name):

- ``.jsonl`` / ``.ndjson``: one JSON object per line; ``line`` is the 1-based line number. A line
  ends at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (old Mac files); a UTF-8 BOM at the start of a line
  is ignored; blank lines are not rows (counted per file as ``blank_lines``). A JSON-lines file whose
  first non-blank line is ``{`` alone or opens a ``[`` it does not close on that line, and whose next
  non-blank line is not a whole JSON object, is a pretty-printed JSON document, read as ``.json``.
- ``.json``: one JSON document, read element by element (one bad element is one quarantined row;
  a broken element ends at the next ``,``/``]``/``}`` of its own level, brackets and strings
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
- ``.parquet``: one row per table row; ``line`` is the 1-based row number.
- Compressed: ``.jsonl.gz``, ``.ndjson.gz``, ``.json.gz``, and the same with ``.zst`` when the
  ``zstandard`` package is installed (without it a ``.zst`` file named explicitly is an
  :class:`IngestError`, one found in a folder an ``unsupported_compression`` row). ``sha256`` and
  ``bytes`` in the file list are those of the stored (compressed) file.

Named inputs: a missing path, a broken symlink, something not a file or folder, a file with another
extension, or a glob pattern (``*``, ``?``, ``[...]``; ``**`` for any number of folders; a path that
exists is never a pattern) that matches nothing is an :class:`IngestError` with a one-line message
naming it. A file with another extension inside a folder (or matched by a pattern) is skipped with a
warning. Symlinks (files and folders) are followed while their real target stays inside one of the
named inputs (for a pattern, its literal leading folder); a link pointing outside is one
``symlink_outside_root`` row and is never opened (its ``raw`` is empty); a folder reached twice
(symlink loop) is read once. A named input that is itself a symlink is followed.

``line = 0`` in the quarantine means the whole file. A file is quarantined whole only when it cannot
be read by rows: ``binary_file`` when its start looks binary (NUL or mostly undecodable bytes), no
row in it parses and at least half its bytes are in rows that are not text; ``unreadable_file``
when it cannot be opened or fails while being read (a file removed during ingest, a corrupt gzip or
Parquet stream, a 0-byte Parquet, ``.gz`` or ``.zst`` file — a failed upload, logged as a warning
too; the rows read before the failure stay); and the two reasons above. A 0-byte ``.jsonl`` or
``.json`` file is an empty file: no rows.

Every row read is either kept or quarantined by itself, never dropped (``n_in == n_kept +
n_quarantined``); any exception the JSON parser raises on a row (a 5,000-digit integer, nesting too
deep) quarantines that row only. Quarantine reasons: ``binary_file``, ``unreadable_file``,
``symlink_outside_root``, ``unsupported_compression``, ``binary_line`` (a line or element holding
NUL bytes), ``invalid_utf8``, ``invalid_json``, ``unreadable_row`` (a Parquet row Python cannot
represent), ``not_object``, every :class:`~spice_ray.corpus.formats.RowError` reason,
``template_error`` (the chat template refused the chat), ``too_long`` (more than ``max_tokens``
tokens — with ``corpus.too_long=truncate`` only when no response token is left within
``max_tokens``, else the row is kept and later cut to ``max_tokens`` — or a row over
``MAX_ROW_BYTES`` bytes, rejected before it is parsed; such a line is never held in memory whole;
``max_tokens`` here is ``corpus.max_tokens`` capped to the model's context, read from the
``config.json`` beside the tokenizer — ``max_position_embeddings`` — or the tokenizer's
``model_max_length``, with a one-line warning when it caps; ``IngestResult.max_tokens`` holds it),
``duplicate`` (same uid as an already kept row; ``detail`` names that row's
``file:line``) and ``duplicate_id`` (the same explicit record ``id`` as an already kept row but other
content; ``detail`` names that row's ``file:line``). Quarantine rows appear file by file, in each file
in the order decisions are made (deterministic, not sorted: a row that cannot be a record at once, a
row that reaches token counting — in batches of ``TOKENIZE_BATCH`` — when its batch is counted).

Record ids: a row's top-level ``id`` field, when it is a non-empty string or an integer (kept as its
decimal string, so ``7`` and ``"7"`` are the same id), is carried into the records; any other value
(absent, null, empty, float, bool, list, object) means the row has no id; a string id or ``source``
that UTF-8 cannot encode (a lone ``\\ud800`` escape) is ``invalid_unicode``. The first kept row claims
its id: a later row with the same id is an exact duplicate (``duplicate``) or a conflicting one
(``duplicate_id``). Rows without an id are only deduplicated by content.

Output, written atomically (temporary name, then ``os.replace``) into ``out_dir``:

- ``records.parquet``: ``uid`` string (sha256 of the canonical messages), ``source`` string (the row's
  ``source`` field when a non-empty string, else the file name without its corpus suffix), ``messages``
  list<struct<role: string, content: string>>, ``n_tokens`` int32 (full chat template;
  ``max_tokens`` for a row kept truncated), ``file`` string, ``line`` int64, ``id`` string (the row's record id, null when it has
  none); rows in input order.
- ``quarantine.parquet``: ``file`` string, ``line`` int64, ``reason`` string, ``detail`` string,
  ``raw`` string (the input text, truncated to ``RAW_LIMIT`` characters; for column-oriented and
  Parquet rows the row re-serialised as JSON), ``raw_bytes`` int64 (its full size in bytes; the file
  size for a whole-file record), ``source`` string (as for records; the file stem when the row has
  none).

Incremental ingest: with an :class:`~spice_ray.corpus.ingest_cache.IngestCache` (the pipeline's is
``<run root>/cache/ingest``) each file is read into a part, its rows before cross-file dedup, stored
under the sha256 of its bytes, its name and the settings that decide its rows (``corpus.format``,
``corpus.max_tokens`` and the limit applied, ``corpus.too_long``, the tokenizer's fingerprint). A file
whose part is there is hashed but not read, parsed or tokenized again; dedup across files then runs
over the parts in file order, so the output is byte for byte that of an ingest without a cache. A
file that could not be read whole (``unreadable_file``) or changed while it was read is not cached.

With no inputs at all (``inputs`` and ``cfg.paths`` empty) the demo corpus is generated into
``out_dir/demo_corpus/`` and ingested.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spice_ray.config import CorpusConfig
from spice_ray.corpus.demo import write_demo_corpus
from spice_ray.corpus.formats import ROW_FIELDS, RowError, canonical_json, normalize_row
from spice_ray.corpus.ingest_cache import IngestCache, part_key
from spice_ray.corpus.tokenize import (
    EncodeError,
    count_text_tokens,
    effective_max_tokens,
    encode,
    model_context,
    render_text,
)
from spice_ray.storage import ensure_local, is_remote

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SUPPORTED_SUFFIXES = (
    ".jsonl", ".ndjson", ".json", ".parquet",
    ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl.zst", ".ndjson.zst", ".json.zst",
)
RAW_LIMIT = 4096  # characters of raw input kept per quarantined row
PREVIEW_BYTES = RAW_LIMIT * 4  # bytes of a row kept to make its raw text
# A row (line, .json element, Parquet row) over this many bytes is too_long without being parsed or
# tokenized: instruction rows are far smaller, and tokenizing a 30 MB line takes gigabytes.
MAX_ROW_BYTES = 2 << 20
READ_CHUNK = 1 << 20  # bytes read at a time
HEAD_BYTES = 8192  # bytes looked at to suspect a binary file
TOKENIZE_BATCH = 512  # rendered chats per tokenizer call
WRITE_BATCH = 8192  # rows per parquet row group

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
RECORDS_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("source", pa.string()),
        ("messages", MESSAGE_TYPE),
        ("n_tokens", pa.int32()),
        ("file", pa.string()),
        ("line", pa.int64()),
        ("id", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
        ("raw_bytes", pa.int64()),
        ("source", pa.string()),
    ]
)


class IngestError(ValueError):
    """An input that cannot be ingested at all (missing path, unsupported file named explicitly)."""


@dataclass
class IngestResult:
    """Counts of one ingest; ``files`` has one entry per input file (empty files included);
    ``files_reused`` of them came from the ingest cache, ``files_read`` were read."""

    n_in: int
    n_kept: int
    n_quarantined: int
    n_truncated: int
    max_tokens: int  # the limit applied: corpus.max_tokens capped to the model context
    reasons: dict[str, int]
    sources: dict[str, int]
    files: list[dict[str, Any]]
    records_path: str
    quarantine_path: str
    seconds: float
    files_read: int = 0
    files_reused: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _FileInfo:
    path: str
    sha256: str = ""
    bytes: int = 0
    rows: int = 0
    kept: int = 0
    quarantined: int = 0
    blank_lines: int = 0
    truncated: int = 0  # kept rows cut to max_tokens (corpus.too_long=truncate), duplicates included
    reused: bool = False  # its rows came from the ingest cache


@dataclass
class _Item:
    """One row read from a file: a parsed value, or a read error (``reason`` set)."""

    line: int
    value: Any = None
    raw: str | None = None  # None: rendered lazily from value
    raw_bytes: int | None = None
    reason: str | None = None
    detail: str = ""

    def raw_text(self) -> tuple[str, int]:
        if self.raw is None:
            text = _utf8_safe(json.dumps(self.value, ensure_ascii=False, default=str))
            return text[:RAW_LIMIT], len(text.encode("utf-8"))
        return self.raw[:RAW_LIMIT], self.raw_bytes if self.raw_bytes is not None else len(self.raw)


@dataclass
class _Pending:
    item: _Item
    source: str
    messages: list[dict[str, str]]
    uid: str
    text: str
    record_id: str | None = None


# ---------------------------------------------------------------------------------------------------
# reading: helpers


def _utf8_safe(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates from JSON ``\\ud800`` escapes or
    undecodable file names) written as backslash escapes, so it can go into a parquet string."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _shown(path: str | Path) -> str:
    """``path`` for a one-line message: line breaks and undecodable names escaped."""
    return _utf8_safe(str(path)).replace("\r", "\\r").replace("\n", "\\n")


def _looks_binary(sample: bytes) -> bool:
    """NUL bytes or mostly undecodable bytes in the first block: maybe not a text file (the rows
    decide, see :func:`_binary_as_a_whole`)."""
    if not sample:
        return False
    if sample.count(0) > len(sample) // 100:
        return True
    text = sample.decode("utf-8", errors="replace")
    return text.count("\ufffd") > 0.3 * len(text)


def _preview(data: bytes) -> str:
    return data[:PREVIEW_BYTES].decode("utf-8", errors="backslashreplace")[:RAW_LIMIT]


def _limit(max_row_bytes: int | None) -> int:
    return MAX_ROW_BYTES if max_row_bytes is None else max_row_bytes


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        return f"{e.msg} at {where}"
    return f"{type(e).__name__}: {e}"[:500]


def _parse_row(line: int, body: bytes, size: int, limit: int) -> _Item:
    """One row from its bytes; ``body`` is only a preview when ``size`` is over ``limit``."""
    if size > limit:
        return _Item(line, raw=_preview(body), raw_bytes=size, reason="too_long",
                     detail=f"row of {size} bytes > MAX_ROW_BYTES {limit} (not parsed)")
    if b"\x00" in body:
        return _Item(line, raw=_preview(body), raw_bytes=size, reason="binary_line",
                     detail=f"{body.count(0)} NUL bytes, the first at byte {body.index(0)}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Item(line, raw=_preview(body), raw_bytes=size, reason="invalid_utf8",
                     detail=f"byte {e.start}: {e.reason}")
    try:
        value = json.loads(text)
    except Exception as e:  # noqa: BLE001 - JSONDecodeError, int digit limit, RecursionError, ...
        return _Item(line, raw=text[:RAW_LIMIT], raw_bytes=size, reason="invalid_json", detail=_json_error(e))
    return _Item(line, value=value, raw=text[:RAW_LIMIT], raw_bytes=size)


class _Hashing(io.RawIOBase):
    """A read-only wrapper of a binary file that hashes (sha256) every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
        return n

    def readall(self) -> bytes:
        data = self.raw.read()
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """The sha256 of the whole file: what was not read yet is read and hashed first."""
        for chunk in iter(lambda: self.raw.read(READ_CHUNK), b""):
            self.digest.update(chunk)
        return self.digest.hexdigest()


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, _Hashing]]:
    """The (decompressed) content of ``path`` as a binary stream, and the hashing wrapper of the
    file itself (call its ``finish`` for the sha256 of the stored bytes)."""
    with path.open("rb") as raw:
        hashing = _Hashing(raw)
        compression = _split_suffix(_suffix(path) or "")[1]
        stream: BinaryIO
        if compression == ".gz":
            stream = gzip.GzipFile(fileobj=hashing, mode="rb")  # type: ignore[assignment]
        elif compression == ".zst":
            import zstandard  # only reached when importable (collect_files checks)

            stream = zstandard.ZstdDecompressor().stream_reader(hashing, read_across_frames=True)
        else:
            stream = hashing  # type: ignore[assignment]
        try:
            yield stream, hashing
        finally:
            if stream is not hashing:
                stream.close()


def _chunks(stream: BinaryIO, first: bytes) -> Iterator[bytes]:
    yield first
    yield from iter(lambda: stream.read(READ_CHUNK), b"")


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the file itself could not be read (not one bad row)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, pa.ArrowException)
    zstd = sys.modules.get("zstandard")
    return errors + (zstd.ZstdError,) if zstd is not None else errors


def _sha256(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            return _Hashing(fh).finish()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------
# reading: JSON lines


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
        head = more = stream.read(HEAD_BYTES)
        while (pretty := _pretty_document(head, not more, limit)) is None:
            more = stream.read(READ_CHUNK)
            head += more
        if pretty:
            yield from _json_document(head + stream.read(), info, limit)
        else:
            yield from _iter_lines(_chunks(stream, head), info, limit)
        info.sha256 = hashing.finish()


# ---------------------------------------------------------------------------------------------------
# reading: JSON documents, element by element


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


# ---------------------------------------------------------------------------------------------------
# reading: Parquet


def _value_size(value: Any, limit: int) -> int:
    """About the size in bytes of a row value (its strings and bytes); stops once over ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
        else:
            total += 8
    return total


def _batch_values(batch: pa.RecordBatch) -> list[Any]:
    """The rows of ``batch`` as Python values; a row Arrow cannot convert is its exception."""
    try:
        return batch.to_pylist()
    except (pa.ArrowException, ValueError, OverflowError):
        pass
    values: list[Any] = []
    for i in range(batch.num_rows):
        try:
            values.append(batch.slice(i, 1).to_pylist()[0])
        except (pa.ArrowException, ValueError, OverflowError) as e:
            values.append(e)
    return values


def _parquet_item(line: int, value: Any, limit: int) -> _Item:
    if isinstance(value, Exception):
        return _Item(line, raw="", raw_bytes=0, reason="unreadable_row", detail=f"{type(value).__name__}: {value}"[:500])
    size = _value_size(value, limit)
    if size > limit:
        return _Item(line, value=value, reason="too_long", detail=f"row of over {limit} bytes > MAX_ROW_BYTES {limit}")
    return _Item(line, value=value)


def _read_parquet(path: Path, info: _FileInfo, max_row_bytes: int | None = None) -> Iterator[_Item]:
    limit = _limit(max_row_bytes)
    info.sha256 = _sha256(path)
    line = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for value in _batch_values(batch):
            line += 1
            yield _parquet_item(line, value, limit)


# ---------------------------------------------------------------------------------------------------
# reading: one file


_READERS: dict[str, Callable[[Path, _FileInfo], Iterator[_Item]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
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


def _checked(path: Path, info: _FileInfo, reader: Callable[[Path, _FileInfo], Iterator[_Item]]) -> Iterator[_Item]:
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


_KIND_NAMES = {".parquet": "Parquet", ".gz": "gzip", ".zst": "zstd"}


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
    reader = _READERS[fmt]
    if info.bytes == 0 and (fmt == ".parquet" or compression is not None):
        yield _empty_file(path, info, _KIND_NAMES[compression or fmt])
        return
    if fmt == ".parquet":
        yield from _guarded(path, info, reader(path, info))
    else:
        yield from _guarded(path, info, _checked(path, info, reader))


def _file_size(path: Path) -> int:
    if isinstance(path, _Flagged):
        return 0
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------------
# reading: which files


_BY_LENGTH = sorted(SUPPORTED_SUFFIXES, key=len, reverse=True)
_MAGIC = re.compile(r"[*?\[]")


class _Flagged(type(Path())):  # type: ignore[misc]
    """A collected path that is quarantined as a whole and never opened (``reason``, ``detail``)."""

    reason = ""
    detail = ""


def _flagged(path: Path, reason: str, detail: str) -> Path:
    flagged = _Flagged(path)
    flagged.reason, flagged.detail = reason, detail
    return flagged


def _suffix(path: Path) -> str | None:
    """The supported suffix that ``path``'s name ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in _BY_LENGTH if name.endswith(s) and len(name) > len(s)), None)


def _split_suffix(suffix: str) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)``: ``.jsonl.gz`` -> ``(".jsonl", ".gz")``."""
    base, dot, last = suffix.rpartition(".")
    return (base, dot + last) if dot + last in (".gz", ".zst") and base else (suffix, None)


def _stem(path: Path) -> str:
    """The file name without its corpus suffix (``alpaca.jsonl.gz`` -> ``alpaca``)."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _zstd_missing(path: Path) -> bool:
    suffix = _suffix(path) or ""
    return suffix.endswith(".zst") and importlib.util.find_spec("zstandard") is None


class _Roots:
    """The real paths of the inputs the user named; a symlink is followed only into them."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.real = [os.path.realpath(p) for p in paths]

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.real)


def _walk(root: Path, roots: _Roots) -> list[tuple[str, Path]]:
    """``(name relative to root, path)`` of every file under ``root``, sorted by name: hidden names
    skipped, symlinks followed while they stay inside ``roots`` (a link outside is a flagged path).
    Linked folders are walked after the real ones, and a folder already walked is skipped, so a
    folder is read once, at its real place when it has one there (and symlink loops end)."""
    found: list[tuple[str, Path]] = []
    visited: set[str] = set()
    folders: list[tuple[Path, str]] = [(root, "")]
    links: list[tuple[Path, str]] = []
    while folders or links:
        folder, prefix = folders.pop() if folders else links.pop(0)
        real = os.path.realpath(folder)
        if real in visited:
            logger.warning("skipping %s: folder already read (symlink loop or second link)", folder)
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            found.append((prefix.rstrip("/"), _flagged(folder, "unreadable_file", f"cannot list folder: {e.strerror}")))
            continue
        for entry in entries:
            name, path = prefix + entry.name, Path(entry.path)
            if entry.name.startswith("."):
                logger.debug("skipping hidden %s", path)
            elif entry.is_symlink() and not roots.inside(entry.path):
                target = _shown(os.path.realpath(entry.path))
                found.append((name, _flagged(path, "symlink_outside_root", f"symlink to {target}, outside the inputs")))
            elif entry.is_dir():
                (links if entry.is_symlink() else folders).append((path, name + "/"))
            elif entry.is_file() or entry.is_symlink():  # a broken link becomes an unreadable_file row
                found.append((name, path))
            else:
                logger.warning("skipping %s: not a regular file", path)
    return sorted(found, key=lambda t: t[0])


def _in_folder(path: Path) -> Path | None:
    """A file found in a folder or by a pattern: itself, flagged, or None (skipped with a warning)."""
    if isinstance(path, _Flagged):
        if path.reason == "symlink_outside_root" and not (path.is_dir() or _suffix(path)):
            logger.warning("skipping %s: not one of %s", path, ", ".join(SUPPORTED_SUFFIXES))
            return None
        return path
    if _suffix(path) is None:
        logger.warning("skipping %s: not one of %s", path, ", ".join(SUPPORTED_SUFFIXES))
        return None
    if _zstd_missing(path):
        return _flagged(path, "unsupported_compression", "reading .zst files needs the zstandard package")
    return path


def _named_file(path: Path) -> Path:
    if _suffix(path) is None:
        raise IngestError(f"{_shown(path)}: unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)})")
    if _zstd_missing(path):
        raise IngestError(f"{_shown(path)}: reading .zst files needs the zstandard package (pip install zstandard)")
    return path


def _is_pattern(item: str) -> bool:
    return _MAGIC.search(item) is not None and not os.path.lexists(item)


def _pattern_base(pattern: str) -> tuple[str, str]:
    """``(literal leading folder, the rest)`` of a glob pattern."""
    parts = pattern.split("/")
    i = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = "/".join(parts[:i]) or ("/" if pattern.startswith("/") else ".")
    return base, "/".join(parts[i:])


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        close = segment.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif close > 0:
            body = segment[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_regex(rest: str) -> re.Pattern[str]:
    """A regex for names relative to the pattern's base: ``*``, ``?`` and ``[...]`` within one name,
    ``**`` for any number of folders."""
    segments = rest.split("/")
    out = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            out.append(".*" if last else "(?:.*/)?")
        else:
            out.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


def _expand_pattern(pattern: str, roots: _Roots) -> list[Path]:
    """The corpus files matched by a glob pattern (a matched folder brings all its files)."""
    base, rest = _pattern_base(pattern)
    regex = _glob_regex(rest)
    found = _walk(Path(base), roots) if os.path.isdir(base) else []
    matched = []
    for name, path in found:
        parts = name.split("/")
        if any(regex.fullmatch("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            matched.append(path)
    if not matched:
        raise IngestError(f"no files match the corpus pattern {_shown(pattern)}")
    return [p for p in map(_in_folder, matched) if p is not None]


def _expand(item: str, roots: _Roots) -> list[Path]:
    if _is_pattern(item):
        return _expand_pattern(item, roots)
    path = Path(item)
    if path.is_dir():
        return [p for p in (_in_folder(found) for _, found in _walk(path, roots)) if p is not None]
    if path.is_file():
        return [_named_file(path)]
    if os.path.lexists(item) and not path.exists():
        raise IngestError(f"corpus input not found: {_shown(item)} is a broken symlink")
    if not path.exists():
        raise IngestError(f"corpus input not found: {_shown(item)}")
    raise IngestError(f"{_shown(item)}: not a regular file or folder")


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files, in order: each input as given, folders walked recursively (sorted), glob
    patterns expanded; symlinks followed only inside the inputs (see the module doc). A file that is
    quarantined as a whole without being opened (a link outside the inputs, a ``.zst`` file without
    zstandard, an unlistable folder) is returned as a path with ``reason`` and ``detail``
    attributes. Raises :class:`IngestError` (one line) for a missing input, an unsupported file named
    explicitly or a pattern that matches nothing."""
    items = [str(i) for i in inputs]
    roots = _Roots(_pattern_base(i)[0] if _is_pattern(i) else i for i in items)
    files: list[Path] = []
    seen: set[str] = set()
    for item in items:
        for path in _expand(item, roots):
            key = os.path.abspath(path) if isinstance(path, _Flagged) else os.path.realpath(path)
            if key in seen:
                logger.warning("skipping %s: already read as part of another input", path)
                continue
            seen.add(key)
            files.append(path)
    return files


# ---------------------------------------------------------------------------------------------------
# writing

class _AtomicParquet:
    """A parquet file written under a temporary name, renamed into place on commit. Rows come as
    tables of any size and are written in row groups of exactly ``WRITE_BATCH`` rows (the last one
    shorter), so the file's bytes depend only on its rows, not on how they arrived."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.n_pending += table.num_rows
        if self.n_pending >= WRITE_BATCH:
            self._write(whole=False)

    def _write(self, whole: bool) -> None:
        """Write the pending rows in row groups of ``WRITE_BATCH`` (keeping a short tail unless ``whole``)."""
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        n = table.num_rows if whole else table.num_rows - table.num_rows % WRITE_BATCH
        for start in range(0, n, WRITE_BATCH):
            self.writer.write_table(table.slice(start, min(WRITE_BATCH, n - start)).combine_chunks())
        rest = table.slice(n)
        self.pending, self.n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        self.rows += n

    def commit(self) -> None:
        self._write(whole=True)
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

# ---------------------------------------------------------------------------------------------------
# ingest


def record_id(value: Any) -> str | None:
    """The row's explicit record id (its ``id`` field) as a string, or None (see the module doc)."""
    if not isinstance(value, dict):
        return None
    rid = value.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int):
        return str(rid)
    if isinstance(rid, str) and rid.strip():
        try:
            rid.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RowError("invalid_unicode", f"id: {e.reason} at {e.start}") from None
        return rid
    return None


def _id_key(rid: str) -> bytes:
    return hashlib.blake2b(rid.encode("utf-8"), digest_size=16).digest()


def _source(value: Any, stem: str) -> str:
    if isinstance(value, dict):
        source = value.get("source")
        if isinstance(source, str) and source.strip():
            return source
    return stem



# The rows of one file before cross-file dedup, in the order ingest decides about them: a candidate
# record (``uid`` set; kept unless it duplicates an earlier kept row) or a quarantined row (``reason``
# set). What the ingest cache stores per file.
PART_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("source", pa.string()),
        ("uid", pa.string()),
        ("messages", MESSAGE_TYPE),
        ("n_tokens", pa.int32()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
        ("raw_bytes", pa.int64()),
    ]
)
# Bump when reading, validation or tokenization of a file can give other rows: cached parts of older
# versions are then never used.
READER_VERSION = 1


@dataclass
class _Settings:
    """What decides one file's rows besides its bytes and name."""

    cfg: CorpusConfig
    tokenizer: Any
    max_tokens: int  # cfg.max_tokens capped to the model context

    def key_fields(self, tokenizer_fingerprint: str) -> dict[str, Any]:
        """The settings part of a file's cache key (the tokenizer: its files' fingerprint and the chat
        template it renders with, which a caller may have set)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return {
            "reader_version": READER_VERSION, "format": self.cfg.format, "max_tokens": self.cfg.max_tokens,
            "max_tokens_applied": self.max_tokens, "too_long": self.cfg.too_long, "tokenizer": tokenizer_fingerprint,
            "chat_template": hashlib.sha256(str(template).encode("utf-8", errors="backslashreplace")).hexdigest(),
            "max_row_bytes": MAX_ROW_BYTES, "raw_limit": RAW_LIMIT, "tokenize_batch": TOKENIZE_BATCH,
        }


class _FileRun:
    """Reading one file into its part (see ``PART_SCHEMA``), yielded in tables of up to
    ``WRITE_BATCH`` rows."""

    def __init__(self, settings: _Settings, info: _FileInfo) -> None:
        self.s = settings
        self.info = info
        self.rows: dict[str, list[Any]] = {name: [] for name in PART_SCHEMA.names}
        self.pending: list[_Pending] = []

    def read(self, path: Path) -> Iterator[pa.Table]:
        stem = _utf8_safe(_stem(path))
        for item in _read_items(path, self.info):
            self.info.rows += 1
            self._take(item, stem)
            if len(self.pending) >= TOKENIZE_BATCH:
                self._flush()
            if len(self.rows["line"]) >= WRITE_BATCH:
                yield self._table()
        self._flush()
        if self.rows["line"]:
            yield self._table()

    def _table(self) -> pa.Table:
        table = pa.Table.from_pydict(self.rows, schema=PART_SCHEMA)
        self.rows = {name: [] for name in PART_SCHEMA.names}
        return table

    def _add(self, item: _Item, source: str, **fields: Any) -> None:
        raw, raw_bytes = item.raw_text()
        row = {"line": item.line, "source": source, "raw": raw, "raw_bytes": raw_bytes} | fields
        for name, column in self.rows.items():
            column.append(row.get(name))

    def _quarantine(self, item: _Item, reason: str, detail: str, source: str) -> None:
        self._add(item, _utf8_safe(source), reason=reason, detail=_utf8_safe(detail))

    def _take(self, item: _Item, stem: str) -> None:
        """Quarantine a row that cannot be a record; else queue it for token counting."""
        source = _source(item.value, stem)
        if item.reason is not None:
            self._quarantine(item, item.reason, item.detail, source)
            return
        try:
            messages = normalize_row(item.value, self.s.cfg.format)
            rid = record_id(item.value)
            if _utf8_safe(source) != source:
                raise RowError("invalid_unicode", "source is not encodable as UTF-8 (lone surrogate escapes)")
            text = render_text(self.s.tokenizer, messages)
        except RowError as e:
            self._quarantine(item, e.reason, e.detail, source)
            return
        except EncodeError as e:
            self._quarantine(item, "template_error", str(e)[:500], source)
            return
        uid = hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()
        self.pending.append(_Pending(item, source, messages, uid, text, rid))

    def _truncates(self, p: _Pending) -> bool:
        """``corpus.too_long=truncate``: keep an over-long row when a response token survives the cut."""
        if self.s.cfg.too_long != "truncate":
            return False
        try:
            return encode(self.s.tokenizer, p.messages, max_tokens=self.s.max_tokens, loss_on="response").n_loss_tokens > 0
        except EncodeError:
            return False

    def _too_long(self, n_tokens: int) -> str:
        limit, configured = self.s.max_tokens, self.s.cfg.max_tokens
        if limit == configured:
            return f"{n_tokens} tokens > max_tokens {limit}"
        return f"{n_tokens} tokens > {limit}, the model context (corpus.max_tokens {configured} capped)"

    def _flush(self) -> None:
        """Count tokens of the queued rows in one call: a candidate record (truncated when
        ``too_long=truncate``) or a ``too_long`` row each."""
        if not self.pending:
            return
        counts = count_text_tokens(self.s.tokenizer, [p.text for p in self.pending])
        for p, n_tokens in zip(self.pending, counts):
            if n_tokens > self.s.max_tokens:
                if not self._truncates(p):
                    self._quarantine(p.item, "too_long", self._too_long(n_tokens), p.source)
                    continue
                n_tokens = self.s.max_tokens
                self.info.truncated += 1
            self._add(p.item, p.source, uid=p.uid, messages=p.messages, n_tokens=n_tokens, id=p.record_id)
        self.pending = []


class _Merge:
    """Cross-file dedup over the files' parts, in file order: writes records and quarantine."""

    def __init__(self, records: _AtomicParquet, quarantine: _AtomicParquet) -> None:
        self.records = records
        self.quarantine = quarantine
        self.files: list[_FileInfo] = []
        self.kept_at: dict[bytes, tuple[int, int]] = {}  # uid digest -> (file index, line)
        self.id_at: dict[bytes, tuple[int, int]] = {}  # record id digest -> (file index, line) of the kept row
        self.reasons: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()

    def _where(self, at: tuple[int, int]) -> str:
        return f"{self.files[at[0]].path}:{at[1]}"

    def _duplicate(self, index: int, line: int, uid: str, rid: str | None) -> tuple[str, str] | None:
        """``(reason, detail)`` when the candidate duplicates a kept row; else it is kept (and claims
        its uid and id)."""
        key = bytes.fromhex(uid)
        first = self.kept_at.get(key)
        if first is not None:
            return "duplicate", f"duplicate of {self._where(first)} (uid {uid[:12]})"
        id_key = _id_key(rid) if rid is not None else None
        if id_key is not None and id_key in self.id_at:
            where = self._where(self.id_at[id_key])
            return "duplicate_id", f"id {rid[:200]!r} already used by {where} with other content (uid {uid[:12]})"
        self.kept_at[key] = (index, line)
        if id_key is not None:
            self.id_at[id_key] = (index, line)
        return None

    def add(self, index: int, part: pa.Table) -> None:
        """Decide about every candidate of ``part`` (rows of file ``index``, in order) and write the rows."""
        reasons = part.column("reason").to_pylist()
        details = part.column("detail").to_pylist()
        lines = part.column("line").to_pylist()
        keep = []
        for i, (uid, rid) in enumerate(zip(part.column("uid").to_pylist(), part.column("id").to_pylist())):
            dup = self._duplicate(index, lines[i], uid, rid) if uid is not None else None
            if dup is not None:
                reasons[i], details[i] = dup
            keep.append(uid is not None and dup is None)
        mask = pa.array(keep, pa.bool_())
        self._records(self.files[index], part.filter(mask))
        out = [i for i, k in enumerate(keep) if not k]
        self._quarantined(self.files[index], part.filter(pc.invert(mask)), [reasons[i] for i in out],
                          [details[i] for i in out])

    def _records(self, info: _FileInfo, kept: pa.Table) -> None:
        n = kept.num_rows
        columns = [kept["uid"], kept["source"], kept["messages"], kept["n_tokens"],
                   pa.repeat(pa.scalar(info.path, pa.string()), n), kept["line"], kept["id"]]
        self.records.add(pa.Table.from_arrays(columns, schema=RECORDS_SCHEMA))
        info.kept += n
        self.sources.update(kept.column("source").to_pylist())

    def _quarantined(self, info: _FileInfo, rows: pa.Table, reasons: list[str], details: list[str]) -> None:
        n = rows.num_rows
        columns = [pa.repeat(pa.scalar(info.path, pa.string()), n), rows["line"], pa.array(reasons, pa.string()),
                   pa.array(details, pa.string()), rows["raw"], rows["raw_bytes"], rows["source"]]
        self.quarantine.add(pa.Table.from_arrays(columns, schema=QUARANTINE_SCHEMA))
        info.quarantined += n
        self.reasons.update(reasons)


class _Parts:
    """Each file's part: from the cache when its content and the settings are unchanged, else read
    (and stored in the cache)."""

    def __init__(self, settings: _Settings, cache: IngestCache | None) -> None:
        self.s = settings
        self.cache = cache
        self.key_fields = settings.key_fields(cache.tokenizer_fingerprint) if cache is not None else {}

    def of(self, path: Path, info: _FileInfo) -> Iterator[pa.Table]:
        key, sha256 = self._key(path)
        if key is not None and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and self._reuse(hit, info, sha256):
                yield hit[0]
                return
        chunks: list[pa.Table] = []
        for chunk in _FileRun(self.s, info).read(path):
            if key is not None:
                chunks.append(chunk)
            yield chunk
        if key is not None:
            self._store(key, sha256, chunks, info)

    def _key(self, path: Path) -> tuple[str | None, str]:
        """The file's cache key and content sha256 (None: no cache, or a file that is never opened or
        cannot be hashed)."""
        if self.cache is None or isinstance(path, _Flagged):
            return None, ""
        sha256 = _sha256(path)
        return (part_key(self.key_fields, path.name, sha256) if sha256 else None), sha256

    def _reuse(self, hit: tuple[pa.Table, dict[str, Any]], info: _FileInfo, sha256: str) -> bool:
        table, meta = hit
        if table.schema != PART_SCHEMA or meta.get("rows") != table.num_rows:
            logger.warning("ingest cache: a part of %s does not hold this version's rows; reading the file", info.path)
            return False
        info.sha256, info.rows, info.reused = sha256, table.num_rows, True
        info.blank_lines, info.truncated = int(meta.get("blank_lines", 0)), int(meta.get("truncated", 0))
        return True

    def _store(self, key: str, sha256: str, chunks: list[pa.Table], info: _FileInfo) -> None:
        """Cache the part unless the file changed while it was read or could not be read whole."""
        assert self.cache is not None
        table = pa.concat_tables(chunks) if chunks else PART_SCHEMA.empty_table()
        reasons = set(table.column("reason").drop_null().unique().to_pylist())
        if info.sha256 != sha256 or "unreadable_file" in reasons:
            logger.debug("not caching %s: changed while read or unreadable", info.path)
            return
        self.cache.put(key, table, {"rows": info.rows, "blank_lines": info.blank_lines, "truncated": info.truncated})


def _display_name(path: Path, local_of: dict[str, Path]) -> str:
    """``path``'s name in the results: the URI it was downloaded from, else the path itself."""
    for uri, local in local_of.items():
        if path == local:
            return uri
        if path.is_relative_to(local):
            return f"{uri.rstrip('/')}/{path.relative_to(local).as_posix()}"
    return str(path)


def ingest(
    cfg: CorpusConfig,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    inputs: list[str] | None = None,
    cache: IngestCache | None = None,
) -> IngestResult:
    """Read ``inputs or cfg.paths`` (or the generated demo corpus when both are empty), write
    ``out_dir/records.parquet`` and ``out_dir/quarantine.parquet``, and return the counts. With a
    ``cache``, a file whose content, name and settings did not change since it was last read into
    that cache is not read again: its rows come from the cache (the output is the same)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str | Path] = list(inputs or cfg.paths)
    if not paths:
        paths = list(write_demo_corpus(out / "demo_corpus", n=cfg.demo_size, seed=cfg.demo_seed))
    # Object-store inputs are downloaded once per content into the local cache (ensure_local);
    # manifests and quarantine records name them by their URI.
    local_of = {str(p): Path(ensure_local(str(p))) for p in paths if is_remote(str(p))}
    files = collect_files([local_of.get(str(p), p) for p in paths])
    names = {f: _display_name(f, local_of) for f in files}
    if not files:
        logger.warning("no corpus files found in %s", ", ".join(map(str, paths)))
    parts = _Parts(_Settings(cfg, tokenizer, effective_max_tokens(cfg.max_tokens, model_context(tokenizer))), cache)
    records = _AtomicParquet(out / RECORDS_FILE, RECORDS_SCHEMA)
    quarantine = _AtomicParquet(out / QUARANTINE_FILE, QUARANTINE_SCHEMA)
    merge = _Merge(records, quarantine)
    try:
        for index, path in enumerate(files):
            info = _FileInfo(path=_utf8_safe(names[path]), bytes=_file_size(path))
            merge.files.append(info)
            for part in parts.of(path, info):
                merge.add(index, part)
            logger.debug("%s %s: %d rows", "reused" if info.reused else "read", path, info.rows)
        records.commit()
        quarantine.commit()
    except BaseException:
        records.abort()
        quarantine.abort()
        raise
    return _result(merge, parts.s.max_tokens, records, quarantine, time.perf_counter() - start)


def _result(merge: _Merge, max_tokens: int, records: _AtomicParquet, quarantine: _AtomicParquet,
            seconds: float) -> IngestResult:
    n_in, n_kept, n_quarantined = sum(f.rows for f in merge.files), records.rows, quarantine.rows
    if n_in != n_kept + n_quarantined:
        raise RuntimeError(f"ingest lost rows: {n_in} read, {n_kept} kept, {n_quarantined} quarantined")
    reused = sum(f.reused for f in merge.files)
    result = IngestResult(
        n_in=n_in,
        n_kept=n_kept,
        n_quarantined=n_quarantined,
        n_truncated=sum(f.truncated for f in merge.files),
        max_tokens=max_tokens,
        reasons=dict(sorted(merge.reasons.items())),
        sources=dict(sorted(merge.sources.items())),
        files=[asdict(f) for f in merge.files],
        records_path=str(records.path),
        quarantine_path=str(quarantine.path),
        seconds=round(seconds, 3),
        files_read=len(merge.files) - reused,
        files_reused=reused,
    )
    logger.info(
        "ingested %d rows from %d files (%d reused, %d read): %d kept, %d quarantined %s in %.1fs",
        n_in, len(merge.files), reused, result.files_read, n_kept, n_quarantined, result.reasons, result.seconds,
    )
    return result
