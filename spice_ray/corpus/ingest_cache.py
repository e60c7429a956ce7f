"""The ingest cache: one parquet part per corpus file, keyed by the file's content and the settings
that decide its rows, under ``<cache>/files/`` (the pipeline's cache is ``<run root>/cache/ingest``).

A part holds what reading one file gives before cross-file dedup: every row in the order ingest
decides about it, a candidate record (``uid`` set) or a quarantined row, and the file's counts in the
schema metadata. Its key is the sha256 of the file's bytes, its name (the format and the default
``source`` come from it) and the settings (``corpus.format``, ``corpus.max_tokens`` and the limit
applied, ``corpus.too_long``, the tokenizer's fingerprint, the reader's limits and version), so a
file that did not change is not read again and any change to it or to those settings reads it again.

A part is written atomically, named ``<key[:32]>-<sha256 of its bytes[:32]>.parquet``; reading one
checks its bytes against its name: a truncated or altered part is removed with a warning and its
file is read again. Parts are never removed otherwise (delete the folder to reclaim the space).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from spice_ray.storage import Store

logger = logging.getLogger(__name__)

PARTS = "files"  # one part per corpus file
DIGEST_CHARS = 32
META_KEY = b"spice_ray.ingest"


def part_key(settings: dict[str, Any], name: str, sha256: str) -> str:
    """The cache key of one file: its content digest, its name and the settings, as sha256 hex."""
    text = json.dumps({"settings": settings, "name": name, "sha256": sha256}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", errors="backslashreplace")).hexdigest()


class IngestCache:
    """Per-file ingest parts in a local folder or under an object-store prefix."""

    def __init__(self, uri: str, tokenizer_fingerprint: str) -> None:
        if not tokenizer_fingerprint:
            raise ValueError("the ingest cache needs the tokenizer's fingerprint (token counts depend on it)")
        self.store = Store(uri)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self._by_key: dict[str, list[str]] | None = None

    def _names(self) -> dict[str, list[str]]:
        """Part names by key prefix, listed once per cache object."""
        if self._by_key is None:
            self._by_key = {}
            if self.store.exists(PARTS):
                infos = self.store.fs.get_file_info(pafs.FileSelector(self.store.path(PARTS)))
                for name in sorted(i.base_name for i in infos if i.type == pafs.FileType.File):
                    if name.endswith(".parquet") and not name.startswith((".", "_")) and "-" in name:
                        self._by_key.setdefault(name.split("-", 1)[0], []).append(name)
        return self._by_key

    def get(self, key: str) -> tuple[pa.Table, dict[str, Any]] | None:
        """The part stored under ``key`` and its metadata, or None (absent or damaged)."""
        for name in list(self._names().get(key[:DIGEST_CHARS], [])):
            found = self._read_verified(name)
            if found is not None:
                return found
        return None

    def put(self, key: str, table: pa.Table, meta: dict[str, Any]) -> str:
        """Store one file's part; returns its name."""
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        name = f"{key[:DIGEST_CHARS]}-{hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]}.parquet"
        self.store.write_bytes(f"{PARTS}/{name}", data)
        names = self._names().setdefault(key[:DIGEST_CHARS], [])
        if name not in names:
            names.append(name)
        return name

    def _read_verified(self, name: str) -> tuple[pa.Table, dict[str, Any]] | None:
        """The part's table and metadata; None (and the part removed) when its bytes do not match its
        name or do not parse."""
        rel = f"{PARTS}/{name}"
        try:
            with self.store.fs.open_input_stream(self.store.path(rel)) as fh:
                data = fh.read()
        except (OSError, FileNotFoundError):
            self._forget(name)
            return None
        digest_ok = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS] == name.removesuffix(".parquet").split("-", 1)[1]
        found: tuple[pa.Table, dict[str, Any]] | None = None
        if digest_ok:
            try:
                table = pq.read_table(io.BytesIO(data))
                meta = json.loads((table.schema.metadata or {})[META_KEY])
                found = table.replace_schema_metadata(None), meta
            except (pa.ArrowException, OSError, KeyError, ValueError):
                found = None
        if found is None:
            logger.warning("ingest cache: part %s is damaged (%s); removing it, its file is read again",
                           self.store.uri(rel), "digest mismatch" if not digest_ok else "unreadable")
            self.store.delete(rel)
            self._forget(name)
        return found

    def _forget(self, name: str) -> None:
        names = self._names().get(name.split("-", 1)[0], [])
        if name in names:
            names.remove(name)
