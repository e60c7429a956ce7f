"""What every reader shares: the row (:class:`_Item`) and file (:class:`_FileInfo`) it fills, the
limits on a row, and parsing one row from its bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAW_LIMIT = 4096  # characters of raw input kept per quarantined row
PREVIEW_BYTES = RAW_LIMIT * 4  # bytes of a row kept to make its raw text
# A row (line, .json element, Parquet row) over this many bytes is too_long without being parsed or
# tokenized: instruction rows are far smaller, and tokenizing a 30 MB line takes gigabytes.
MAX_ROW_BYTES = 2 << 20
HEAD_BYTES = 8192  # bytes looked at to suspect a binary file


def reader_limits() -> dict[str, int]:
    """The limits that decide a file's rows, as they are now (part of its ingest cache key)."""
    return {"max_row_bytes": MAX_ROW_BYTES, "raw_limit": RAW_LIMIT}


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


class _Flagged(type(Path())):  # type: ignore[misc]
    """A collected path that is quarantined as a whole and never opened (``reason``, ``detail``)."""

    reason = ""
    detail = ""


def _flagged(path: Path, reason: str, detail: str) -> Path:
    flagged = _Flagged(path)
    flagged.reason, flagged.detail = reason, detail
    return flagged


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
    decide, see :func:`~spice_ray.corpus.readers._binary_as_a_whole`)."""
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
