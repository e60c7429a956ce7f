"""Ingest: read corpus files, normalise and validate every row, write records and quarantine.

Inputs are files or directories (searched recursively; hidden names skipped), read in sorted order:

- ``.jsonl``: one JSON object per line; ``line`` is the 1-based line number; blank lines are not rows
  (counted per file as ``blank_lines``).
- ``.json``: a top-level list of rows, a dict of rows (every value an object), or one row object;
  ``line`` is the 1-based position of the element. A ``.json`` file that holds JSON lines (what
  ``datasets.Dataset.to_json`` writes) is read as JSONL.
- ``.parquet``: one row per table row; ``line`` is the 1-based row number.

A file with another extension inside a directory is skipped with a warning; named explicitly, it is
an error (:class:`IngestError`). ``line = 0`` in the quarantine means the whole file.

Every row read is either kept or quarantined, never dropped (``n_in == n_kept + n_quarantined``).
Quarantine reasons: ``binary_file``, ``unreadable_file``, ``invalid_utf8``, ``invalid_json``,
``not_object``, every :class:`~spice_ray.corpus.formats.RowError` reason, ``template_error`` (the chat
template refused the chat), ``too_long`` (more than ``max_tokens`` tokens, or a line over
``MAX_LINE_BYTES``), ``duplicate`` (same uid as an already kept row; ``detail`` names that row's
``file:line``) and ``duplicate_id`` (the same explicit record ``id`` as an already kept row but other
content; ``detail`` names that row's ``file:line``). Quarantine rows appear in the order decisions are
made (deterministic, not sorted).

Record ids: a row's top-level ``id`` field, when it is a non-empty string or an integer (kept as its
decimal string, so ``7`` and ``"7"`` are the same id), is carried into the records; any other value
(absent, null, empty, float, bool, list, object) means the row has no id; a string id or ``source``
that UTF-8 cannot encode (a lone ``\\ud800`` escape) is ``invalid_unicode``. The first kept row claims
its id: a later row with the same id is an exact duplicate (``duplicate``) or a conflicting one
(``duplicate_id``). Rows without an id are only deduplicated by content.

Output, written atomically (temporary name, then ``os.replace``) into ``out_dir``:

- ``records.parquet``: ``uid`` string (sha256 of the canonical messages), ``source`` string (the row's
  ``source`` field when a non-empty string, else the file stem), ``messages``
  list<struct<role: string, content: string>>, ``n_tokens`` int32 (full chat template, no
  truncation), ``file`` string, ``line`` int64, ``id`` string (the row's record id, null when it has
  none); rows in input order.
- ``quarantine.parquet``: ``file`` string, ``line`` int64, ``reason`` string, ``detail`` string,
  ``raw`` string (the input text, truncated to ``RAW_LIMIT`` characters; for ``.json``/``.parquet``
  rows the row re-serialised as JSON), ``raw_bytes`` int64 (its full size in bytes; the file size for
  a whole-file record), ``source`` string (as for records; the file stem when the row has none).

With no inputs at all (``inputs`` and ``cfg.paths`` empty) the demo corpus is generated into
``out_dir/demo_corpus/`` and ingested.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.config import CorpusConfig
from spice_ray.corpus.demo import write_demo_corpus
from spice_ray.corpus.formats import RowError, canonical_json, normalize_row
from spice_ray.corpus.tokenize import EncodeError, count_text_tokens, render_text
from spice_ray.storage import ensure_local, is_remote

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
RAW_LIMIT = 4096  # characters of raw input kept per quarantined row
MAX_LINE_BYTES = 64 << 20  # a line longer than this is quarantined as too_long without parsing
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
    """Counts of one ingest; ``files`` has one entry per input file read (empty files included)."""

    n_in: int
    n_kept: int
    n_quarantined: int
    reasons: dict[str, int]
    sources: dict[str, int]
    files: list[dict[str, Any]]
    records_path: str
    quarantine_path: str
    seconds: float

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
    file_index: int
    source: str
    messages: list[dict[str, str]]
    uid: str
    text: str
    record_id: str | None = None


# ---------------------------------------------------------------------------------------------------
# reading


def _utf8_safe(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates from JSON ``\\ud800`` escapes or
    undecodable file names) written as backslash escapes, so it can go into a parquet string."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _looks_binary(sample: bytes) -> bool:
    """NUL bytes or mostly undecodable bytes in the first block: not a text file."""
    if not sample:
        return False
    if sample.count(0) > len(sample) // 100:
        return True
    text = sample.decode("utf-8", errors="replace")
    return text.count("\ufffd") > 0.3 * len(text)


def _preview(data: bytes) -> str:
    return data[: RAW_LIMIT * 4].decode("utf-8", errors="backslashreplace")[:RAW_LIMIT]


def _parse_line(lineno: int, body: bytes) -> _Item:
    if len(body) > MAX_LINE_BYTES:
        return _Item(lineno, raw=_preview(body), raw_bytes=len(body), reason="too_long",
                     detail=f"line of {len(body)} bytes > {MAX_LINE_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Item(lineno, raw=_preview(body), raw_bytes=len(body), reason="invalid_utf8",
                     detail=f"byte {e.start}: {e.reason}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return _Item(lineno, raw=text[:RAW_LIMIT], raw_bytes=len(body), reason="invalid_json",
                     detail=f"{e.msg} at column {e.colno}")
    except RecursionError:
        return _Item(lineno, raw=text[:RAW_LIMIT], raw_bytes=len(body), reason="invalid_json",
                     detail="nested too deeply")
    return _Item(lineno, value=value, raw=text[:RAW_LIMIT], raw_bytes=len(body))


def _iter_lines(lines: Iterable[bytes], info: _FileInfo, digest: Any | None) -> Iterator[_Item]:
    for lineno, raw in enumerate(lines, 1):
        if digest is not None:
            digest.update(raw)
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        body = raw.rstrip(b"\r\n")
        if not body.strip():
            info.blank_lines += 1
            continue
        yield _parse_line(lineno, body)


def _file_error(info: _FileInfo, reason: str, detail: str, head: bytes) -> _Item:
    return _Item(0, raw=_preview(head[:256]), raw_bytes=info.bytes, reason=reason, detail=detail)


def _read_jsonl(path: Path, info: _FileInfo) -> Iterator[_Item]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        head = fh.read(8192)
        if _looks_binary(head):
            digest.update(head)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            info.sha256 = digest.hexdigest()
            yield _file_error(info, "binary_file", f"{info.bytes} bytes that are not UTF-8 text", head)
            return
        fh.seek(0)
        yield from _iter_lines(fh, info, digest)
    info.sha256 = digest.hexdigest()


def _read_json(path: Path, info: _FileInfo) -> Iterator[_Item]:
    data = path.read_bytes()
    info.sha256 = hashlib.sha256(data).hexdigest()
    if not data.strip():
        return
    if _looks_binary(data[:8192]):
        yield _file_error(info, "binary_file", f"{info.bytes} bytes that are not UTF-8 text", data)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield _file_error(info, "invalid_utf8", f"byte {e.start}: {e.reason}", data)
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _iter_lines(io.BytesIO(data), info, None)
            return
        yield _file_error(info, "invalid_json", f"{e.msg} at line {e.lineno} column {e.colno}", data)
        return
    except RecursionError:
        yield _file_error(info, "invalid_json", "nested too deeply", data)
        return
    del data, text
    if isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
        rows: list[Any] = list(doc.values())
    elif isinstance(doc, dict):
        rows = [doc]
    elif isinstance(doc, list):
        rows = doc
    else:
        yield _Item(0, value=doc, reason="not_object", detail=f"top level is {type(doc).__name__}")
        return
    for i, value in enumerate(rows, 1):
        yield _Item(i, value=value)


def _read_parquet(path: Path, info: _FileInfo) -> Iterator[_Item]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        head = fh.read(256)
        digest.update(head)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    info.sha256 = digest.hexdigest()
    if info.bytes == 0:
        return
    line = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                line += 1
                yield _Item(line, value=value)
    except (pa.ArrowException, OSError) as e:
        where = f"after row {line}: " if line else ""
        yield _file_error(info, "unreadable_file", f"{where}{type(e).__name__}: {e}"[:500], head)


_READERS: dict[str, Callable[[Path, _FileInfo], Iterator[_Item]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files, in order: each input as given, directories expanded recursively (sorted)."""
    files: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key in seen:
            logger.warning("skipping %s: already read as part of another input", path)
            return
        seen.add(key)
        files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
            )
            for p in found:
                rel = p.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    logger.debug("skipping hidden file %s", p)
                elif p.suffix.lower() not in SUPPORTED_SUFFIXES:
                    logger.warning("skipping %s: not one of %s", p, ", ".join(SUPPORTED_SUFFIXES))
                else:
                    add(p)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise IngestError(f"{path}: unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)})")
            add(path)
        else:
            raise IngestError(f"corpus input not found: {path}")
    return files


# ---------------------------------------------------------------------------------------------------
# writing


class _AtomicParquet:
    """A parquet file written in row groups under a temporary name, renamed into place on commit."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.rows = 0

    def add(self, **row: Any) -> None:
        for name in self.schema.names:
            self.buffer[name].append(row[name])
        if len(self.buffer[self.schema.names[0]]) >= WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        n = len(self.buffer[self.schema.names[0]])
        if n:
            self.writer.write_table(pa.Table.from_pydict(self.buffer, schema=self.schema))
            self.rows += n
            self.buffer = {name: [] for name in self.schema.names}

    def commit(self) -> None:
        self.flush()
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


class _Ingest:
    """The state of one ingest run: dedup index, writers, counters."""

    def __init__(self, cfg: CorpusConfig, tokenizer: Any, records: _AtomicParquet, quarantine: _AtomicParquet):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.records = records
        self.quarantine_out = quarantine
        self.files: list[_FileInfo] = []
        self.kept_at: dict[bytes, tuple[int, int]] = {}  # uid digest -> (file index, line)
        self.id_at: dict[bytes, tuple[int, int]] = {}  # record id digest -> (file index, line) of the kept row
        self.pending: list[_Pending] = []
        self.reasons: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.n_in = 0

    def quarantine(self, file_index: int, item: _Item, reason: str, detail: str, source: str) -> None:
        raw, raw_bytes = item.raw_text()
        info = self.files[file_index]
        self.quarantine_out.add(
            file=info.path, line=item.line, reason=reason, detail=_utf8_safe(detail), raw=raw, raw_bytes=raw_bytes,
            source=_utf8_safe(source),
        )
        info.quarantined += 1
        self.reasons[reason] += 1

    def read(self, path: Path, name: str | None = None) -> None:
        """Read one local file; ``name`` (default: the path) is what manifests and quarantine show."""
        info = _FileInfo(path=_utf8_safe(name or str(path)), bytes=path.stat().st_size)
        self.files.append(info)
        index = len(self.files) - 1
        stem = _utf8_safe(path.stem)
        for item in _READERS[path.suffix.lower()](path, info):
            self.n_in += 1
            info.rows += 1
            if item.reason is not None:
                self.quarantine(index, item, item.reason, item.detail, _source(item.value, stem))
                continue
            source = _source(item.value, stem)
            try:
                messages = normalize_row(item.value, self.cfg.format)
                rid = record_id(item.value)
                if _utf8_safe(source) != source:
                    raise RowError("invalid_unicode", "source is not encodable as UTF-8 (lone surrogate escapes)")
                text = render_text(self.tokenizer, messages)
            except RowError as e:
                self.quarantine(index, item, e.reason, e.detail, source)
                continue
            except EncodeError as e:
                self.quarantine(index, item, "template_error", str(e)[:500], source)
                continue
            uid = hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()
            self.pending.append(_Pending(item, index, source, messages, uid, text, rid))
            if len(self.pending) >= TOKENIZE_BATCH:
                self.flush()

    def flush(self) -> None:
        """Count tokens of the pending rows in one call; keep, or quarantine as too_long / duplicate."""
        if not self.pending:
            return
        counts = count_text_tokens(self.tokenizer, [p.text for p in self.pending])
        for p, n_tokens in zip(self.pending, counts):
            if n_tokens > self.cfg.max_tokens:
                self.quarantine(p.file_index, p.item, "too_long", f"{n_tokens} tokens > max_tokens {self.cfg.max_tokens}", p.source)
                continue
            key = bytes.fromhex(p.uid)
            first = self.kept_at.get(key)
            if first is not None:
                where = f"{self.files[first[0]].path}:{first[1]}"
                self.quarantine(p.file_index, p.item, "duplicate", f"duplicate of {where} (uid {p.uid[:12]})", p.source)
                continue
            id_key = _id_key(p.record_id) if p.record_id is not None else None
            if id_key is not None and id_key in self.id_at:
                first = self.id_at[id_key]
                where = f"{self.files[first[0]].path}:{first[1]}"
                self.quarantine(
                    p.file_index, p.item, "duplicate_id",
                    f"id {p.record_id[:200]!r} already used by {where} with other content (uid {p.uid[:12]})", p.source,
                )
                continue
            self.kept_at[key] = (p.file_index, p.item.line)
            if id_key is not None:
                self.id_at[id_key] = (p.file_index, p.item.line)
            info = self.files[p.file_index]
            self.records.add(
                uid=p.uid, source=p.source, messages=p.messages, n_tokens=n_tokens, file=info.path, line=p.item.line,
                id=p.record_id,
            )
            info.kept += 1
            self.sources[p.source] += 1
        self.pending = []


def _display_name(path: Path, local_of: dict[str, Path]) -> str:
    """``path``'s name in the results: the URI it was downloaded from, else the path itself."""
    for uri, local in local_of.items():
        if path == local:
            return uri
        if path.is_relative_to(local):
            return f"{uri.rstrip('/')}/{path.relative_to(local).as_posix()}"
    return str(path)


def ingest(
    cfg: CorpusConfig, tokenizer: Any, out_dir: str | Path, *, inputs: list[str] | None = None
) -> IngestResult:
    """Read ``inputs or cfg.paths`` (or the generated demo corpus when both are empty), write
    ``out_dir/records.parquet`` and ``out_dir/quarantine.parquet``, and return the counts."""
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
    records = _AtomicParquet(out / RECORDS_FILE, RECORDS_SCHEMA)
    quarantine = _AtomicParquet(out / QUARANTINE_FILE, QUARANTINE_SCHEMA)
    run = _Ingest(cfg, tokenizer, records, quarantine)
    try:
        for path in files:
            run.read(path, names[path])
            logger.debug("read %s: %d rows", path, run.files[-1].rows)
        run.flush()
        records.commit()
        quarantine.commit()
    except BaseException:
        records.abort()
        quarantine.abort()
        raise
    n_kept, n_quarantined = records.rows, quarantine.rows
    if run.n_in != n_kept + n_quarantined:
        raise RuntimeError(f"ingest lost rows: {run.n_in} read, {n_kept} kept, {n_quarantined} quarantined")
    result = IngestResult(
        n_in=run.n_in,
        n_kept=n_kept,
        n_quarantined=n_quarantined,
        reasons=dict(sorted(run.reasons.items())),
        sources=dict(sorted(run.sources.items())),
        files=[asdict(f) for f in run.files],
        records_path=str(records.path),
        quarantine_path=str(quarantine.path),
        seconds=round(time.perf_counter() - start, 3),
    )
    logger.info(
        "ingested %d rows from %d files: %d kept, %d quarantined %s in %.1fs",
        result.n_in, len(files), n_kept, n_quarantined, result.reasons, result.seconds,
    )
    return result
