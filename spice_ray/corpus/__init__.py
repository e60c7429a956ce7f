"""Corpus: input formats, validation, ingest to records/quarantine parquet, tokenization + masks."""

from spice_ray.corpus.demo import generate_demo_corpus, write_demo_corpus
from spice_ray.corpus.formats import (
    REASONS,
    RowError,
    canonical_json,
    canonical_uid,
    detect_format,
    normalize_row,
)
from spice_ray.corpus.ingest import (
    QUARANTINE_FILE,
    QUARANTINE_SCHEMA,
    RECORDS_FILE,
    RECORDS_SCHEMA,
    IngestError,
    IngestResult,
    collect_files,
    ingest,
)
from spice_ray.corpus.ingest_cache import IngestCache
from spice_ray.corpus.tokenize import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    Encoded,
    EncodeError,
    count_text_tokens,
    count_tokens,
    encode,
    encode_batch,
    pad_batch,
    render_text,
    render_with_spans,
)

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "QUARANTINE_FILE",
    "QUARANTINE_SCHEMA",
    "REASONS",
    "RECORDS_FILE",
    "RECORDS_SCHEMA",
    "EncodeError",
    "Encoded",
    "IngestCache",
    "IngestError",
    "IngestResult",
    "RowError",
    "canonical_json",
    "canonical_uid",
    "collect_files",
    "count_text_tokens",
    "count_tokens",
    "detect_format",
    "encode",
    "encode_batch",
    "generate_demo_corpus",
    "ingest",
    "normalize_row",
    "pad_batch",
    "render_text",
    "render_with_spans",
    "write_demo_corpus",
]
