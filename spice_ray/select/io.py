"""Read the sketch parquet (a file or a directory of files) into one (N, d) float32 array.

No Ray here: the selector actor, the report and the tests share this reader. Rows come back sorted
by uid, the order selection indices refer to (ties in the greedy go to the smallest uid).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from spice_ray.storage import is_uri, uri_filesystem

log = logging.getLogger(__name__)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return uri_filesystem(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _parquet_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The parquet files at ``path`` (itself, or every ``*.parquet`` below it, sorted)."""
    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"sketches not found: {path}")
    if info.type == pafs.FileType.File:
        return fs, [root]
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File
        and f.base_name.endswith(".parquet")
        and not f.base_name.startswith(("_", "."))
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return fs, files


def sketch_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A (fixed-size) list column of floats as one (N, d) float32 array, without per-row loops."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if arr.null_count:
        raise ValueError(f"sketch column has {arr.null_count} null rows")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr)
        if n == 0:
            d = 0
        else:
            lo, hi = pc.min_max(lengths).values()
            if lo.as_py() != hi.as_py():
                raise ValueError(f"sketch rows have different lengths ({lo.as_py()}..{hi.as_py()})")
            d = int(lo.as_py())
    else:
        raise TypeError(f"sketch column must be a list of floats, got {arr.type}")
    values = arr.flatten()  # respects slicing offsets
    if values.null_count:
        raise ValueError("sketch column has null values inside rows")
    if not pa.types.is_floating(values.type):
        raise TypeError(f"sketch values must be floats, got {values.type}")
    flat = values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(n, d))


def read_sketch_uids(path: str) -> np.ndarray:
    """The uids of the sketch parquet at ``path``, sorted (the order selection indices refer to).

    Reads only the ``uid`` column, so a driver can plan shards without holding the sketches.
    """
    fs, files = _parquet_files(path)
    col = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["uid"]).column("uid")
    col = col.combine_chunks()
    if col.null_count:
        raise ValueError(f"{col.null_count} sketch rows have a null uid")
    uids = np.sort(col.to_numpy(zero_copy_only=False).astype(object))
    if len(uids) > 1 and np.any(uids[1:] == uids[:-1]):
        raise ValueError(f"duplicate uids in the sketches at {path}")
    return uids


def read_sketches(path: str, uid_range: tuple[str | None, str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uids, G)`` from the sketch parquet at ``path``, rows sorted by uid.

    ``uids`` is a 1-d array of str (object dtype), ``G`` an (N, d) float32 array. Duplicate uids are
    an error (a sketch table holds one row per record). ``uid_range=(lo, hi)`` keeps only the rows
    with ``lo <= uid < hi`` (either end None: open) — one shard's slice.
    """
    fs, files = _parquet_files(path)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    flt = None
    if uid_range is not None:
        lo, hi = uid_range
        if lo is not None:
            flt = pc.field("uid") >= lo
        if hi is not None:
            cond = pc.field("uid") < hi
            flt = cond if flt is None else flt & cond
    table = dataset.to_table(columns=["uid", "sketch"], filter=flt)
    if table.num_rows:
        order = pc.sort_indices(table, sort_keys=[("uid", "ascending")])
        table = table.take(order)
    uid_col = table.column("uid").combine_chunks()
    if uid_col.null_count:
        raise ValueError(f"{uid_col.null_count} sketch rows have a null uid")
    if table.num_rows and pc.count_distinct(uid_col).as_py() != table.num_rows:
        raise ValueError(f"duplicate uids in the sketches at {path}")
    uids = uid_col.to_numpy(zero_copy_only=False)
    G = sketch_matrix(table.column("sketch"))
    log.info("read %d sketches (d=%d) from %d file(s) at %s", G.shape[0], G.shape[1], len(files), path)
    return uids, G


def read_sketch_column(path: str, column: str) -> np.ndarray | None:
    """One per-record column of the sketch parquet (e.g. ``n_loss_tokens``), in uid order; None when
    the sketches do not have it (an older sketch format)."""
    fs, files = _parquet_files(path)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    if column not in dataset.schema.names:
        return None
    table = dataset.to_table(columns=["uid", column])
    table = table.take(pc.sort_indices(table, sort_keys=[("uid", "ascending")]))
    return table.column(column).to_numpy(zero_copy_only=False)


def read_record_sources(records_path: str, uids: np.ndarray) -> np.ndarray:
    """The ``source`` of each of ``uids`` from the ingest records (object array, same order)."""
    fs, root = _filesystem(records_path)
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table(columns=["uid", "source"])
    by_uid = dict(zip(table.column("uid").to_pylist(), table.column("source").to_pylist(), strict=True))
    missing = [u for u in uids.tolist() if u not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} sketched uids are not in the records {records_path} (e.g. {missing[0]})")
    return np.asarray([by_uid[u] for u in uids.tolist()], dtype=object)


def read_target(target: str, pool_uids: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The target-set sketches, (M, d) float32, and the pool rows they are (None: not pool rows).

    ``target`` is either a ``.txt`` file of uids (one per line) whose rows are taken from the pool
    (``pool_uids`` sorted, as :func:`read_sketches` returns them), or the sketches of a separately
    sketched target corpus (a sketch directory or parquet, same sketch config as the pool).
    """
    if target.endswith(".txt"):
        fs, path = _filesystem(target)
        with fs.open_input_stream(path) as f:
            wanted = [line.strip() for line in f.read().decode().splitlines() if line.strip()]
        if not wanted:
            raise ValueError(f"the target uid list {target} is empty")
        wanted_arr = np.asarray(wanted, dtype=object)
        idx = np.searchsorted(pool_uids, wanted_arr).clip(0, max(len(pool_uids) - 1, 0))
        missing = [u for u, i in zip(wanted, idx, strict=True) if len(pool_uids) == 0 or pool_uids[i] != u]
        if missing:
            raise ValueError(f"{len(missing)} of {len(wanted)} target uids are not in the pool (first: {missing[0]})")
        rows = np.unique(idx)
        return pool[rows], rows
    _, target_sketches = read_sketches(target)
    if target_sketches.shape[1] != pool.shape[1]:
        raise ValueError(
            f"target sketches have d={target_sketches.shape[1]}, the pool d={pool.shape[1]}: sketch both with one config"
        )
    if not len(target_sketches):
        raise ValueError(f"no target sketches at {target}")
    return target_sketches, None
