"""Ingest: read corpus files, normalise and validate every row, write records and quarantine.

The driver: :mod:`~spice_ray.corpus.discovery` finds the input files (files, folders, glob
patterns; which symlinks are followed; what is an :class:`IngestError`),
:mod:`~spice_ray.corpus.readers` reads each file into rows (one reader per format: JSON lines, JSON
documents in their layouts, Parquet, compressed; whole-file quarantine), each row is normalised,
validated and its tokens counted into the file's part (:class:`_FileRun`, cached per file by
:class:`_Parts`), and :mod:`~spice_ray.corpus.dedup` deduplicates across files and writes the
records and the quarantine.

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

Output, written atomically (temporary name, then renamed: :class:`~spice_ray.storage.AtomicParquet`)
into ``out_dir``:

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

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from spice_ray.config import CorpusConfig
from spice_ray.corpus.dedup import MESSAGE_TYPE, QUARANTINE_SCHEMA, RECORDS_SCHEMA, _Merge
from spice_ray.corpus.demo import write_demo_corpus
from spice_ray.corpus.discovery import IngestError, _file_size, collect_files
from spice_ray.corpus.formats import RowError, canonical_json, normalize_row
from spice_ray.corpus.ingest_cache import IngestCache, part_key
from spice_ray.corpus.readers import _read_items
from spice_ray.corpus.readers.base import RAW_LIMIT, _FileInfo, _Flagged, _Item, _utf8_safe, reader_limits
from spice_ray.corpus.readers.files import SUPPORTED_SUFFIXES, _Hashing, _sha256, _stem  # noqa: F401 - _Hashing: tests
from spice_ray.corpus.tokenize import (
    EncodeError,
    count_text_tokens,
    effective_max_tokens,
    encode,
    model_context,
    render_text,
)
from spice_ray.storage import AtomicParquet, ensure_local, is_remote

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.parquet"
QUARANTINE_FILE = "quarantine.parquet"
TOKENIZE_BATCH = 512  # rendered chats per tokenizer call
WRITE_BATCH = 8192  # rows per parquet row group

# Importable from here as before the split into discovery, readers and dedup. The reader limits a
# test may shrink are not: set MAX_ROW_BYTES in spice_ray.corpus.readers.base and READ_CHUNK in
# spice_ray.corpus.readers.files, where they are read.
__all__ = [
    "MESSAGE_TYPE", "QUARANTINE_FILE", "QUARANTINE_SCHEMA", "RAW_LIMIT", "RECORDS_FILE", "RECORDS_SCHEMA",
    "SUPPORTED_SUFFIXES", "TOKENIZE_BATCH", "WRITE_BATCH", "IngestError", "IngestResult", "collect_files",
    "ingest", "record_id",
]


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
class _Pending:
    item: _Item
    source: str
    messages: list[dict[str, str]]
    uid: str
    text: str
    record_id: str | None = None


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
            **reader_limits(), "tokenize_batch": TOKENIZE_BATCH,
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
    records = AtomicParquet(out / RECORDS_FILE, RECORDS_SCHEMA, WRITE_BATCH)
    quarantine = AtomicParquet(out / QUARANTINE_FILE, QUARANTINE_SCHEMA, WRITE_BATCH)
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


def _result(merge: _Merge, max_tokens: int, records: AtomicParquet, quarantine: AtomicParquet,
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
