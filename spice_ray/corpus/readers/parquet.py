"""A ``.parquet`` file: one row per table row; ``line`` is the 1-based row number. A row Python
cannot represent is one ``unreadable_row`` row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.corpus.readers.base import _FileInfo, _Item, _limit
from spice_ray.corpus.readers.files import _sha256

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
