"""Cross-file dedup: the files' parts, in file order, become ``records.parquet`` (the kept rows)
and ``quarantine.parquet`` (every other row, with its reason).

A candidate record is a ``duplicate`` when its uid is that of an already kept row, a
``duplicate_id`` when its explicit record id is that of an already kept row with other content
(``detail`` names that row's ``file:line``); else it is kept and claims its uid and id. Rows without
an id are only deduplicated by content.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from spice_ray.corpus.readers.base import _FileInfo
from spice_ray.storage import AtomicParquet

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


def _id_key(rid: str) -> bytes:
    return hashlib.blake2b(rid.encode("utf-8"), digest_size=16).digest()


class _Merge:
    """Cross-file dedup over the files' parts, in file order: writes records and quarantine."""

    def __init__(self, records: AtomicParquet, quarantine: AtomicParquet) -> None:
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
