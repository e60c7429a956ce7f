"""The sketch cache: parquet parts of sketch rows under ``<cache>/<spec hash>/parts/``.

A part is written as soon as a batch of sketches is computed (atomically, named by the sha256 of its
bytes: ``<sha256[:32]>.parquet``), so a run killed mid-way keeps every finished batch and a rerun
computes only the rest. Reading a part checks its bytes against its name: a truncated or altered
part is removed with a warning and its records are sketched again. A uid in two parts (two runs
that raced) is read from the first part in name order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from spice_ray.storage import Store

logger = logging.getLogger(__name__)

PARTS = "parts"
SPEC_FILE = "spec.json"
DIGEST_CHARS = 32


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class SketchCache:
    """One spec's cache directory (local or object storage)."""

    def __init__(self, uri: str) -> None:
        self.store = Store(uri)

    def write_spec(self, spec: dict) -> None:
        if not self.store.exists(SPEC_FILE):
            self.store.write_text(SPEC_FILE, json.dumps(spec, indent=2, sort_keys=True))

    def add(self, table: pa.Table) -> str:
        """Persist one batch of sketch rows; returns the part's name."""
        data = table_bytes(table)
        name = f"{hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]}.parquet"
        self.store.write_bytes(f"{PARTS}/{name}", data)
        return name

    def part_names(self) -> list[str]:
        if not self.store.exists(PARTS):
            return []
        infos = self.store.fs.get_file_info(pafs.FileSelector(self.store.path(PARTS)))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith((".", "_")))

    def _read_verified(self, name: str) -> pa.Table | None:
        """The part's table, or None (and the part removed) when its bytes do not match its name."""
        rel = f"{PARTS}/{name}"
        try:
            with self.store.fs.open_input_stream(self.store.path(rel)) as fh:
                data = fh.read()
        except (OSError, FileNotFoundError):
            return None
        digest_ok = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS] == name.removesuffix(".parquet")
        try:
            table = pq.read_table(io.BytesIO(data)) if digest_ok else None
        except (pa.ArrowException, OSError):
            table = None
        if table is None:
            logger.warning("sketch cache: part %s is damaged (%s); removing it, its records are sketched again",
                           self.store.uri(rel), "digest mismatch" if not digest_ok else "unreadable")
            self.store.delete(rel)
        return table

    def tables(self, uids: frozenset[str] | None = None) -> Iterator[pa.Table]:
        """Every verified part's rows (only ``uids`` when given), first occurrence of a uid only."""
        seen: set[str] = set()
        wanted = None if uids is None else pa.array(sorted(uids), pa.string())
        for name in self.part_names():
            table = self._read_verified(name)
            if table is None:
                continue
            if wanted is not None:
                table = table.filter(pc.is_in(table.column("uid"), value_set=wanted))
            keep = [u not in seen for u in table.column("uid").to_pylist()]
            seen.update(table.column("uid").to_pylist())
            if not all(keep):
                table = table.filter(pa.array(keep, pa.bool_()))
            if table.num_rows:
                yield table

    def uids(self) -> set[str]:
        out: set[str] = set()
        for table in self.tables():
            out.update(table.column("uid").to_pylist())
        return out


def publish(tables: Iterable[pa.Table], schema: pa.Schema, store: Store, rel: str, rows_per_file: int = 65536) -> int:
    """Write the rows of ``tables`` sorted by uid as ``rel/part-00000.parquet``, ... (whole: into a
    temporary directory first, then moved over ``rel``). The files depend only on the rows, not on
    how they were computed or cached. Returns the row count."""
    from spice_ray.storage import move_dir

    parts = [t.select(schema.names).cast(schema) for t in tables]
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    table = table.sort_by([("uid", "ascending")])
    tmp = f"{rel}.tmp"
    store.delete(tmp)
    for i, start in enumerate(range(0, max(1, table.num_rows), rows_per_file)):
        store.write_bytes(f"{tmp}/part-{i:05d}.parquet", table_bytes(table.slice(start, rows_per_file)))
    store.delete(rel)
    move_dir(store.fs, store.path(tmp), store.path(rel))
    return table.num_rows
