"""Run-root storage: a local directory or an object store (``s3://``, ``gs://``) through pyarrow.fs.

Credentials come from the environment as pyarrow reads them (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS`` …); they are
never part of a URI we log or store. Paths under a root cannot escape it (``..`` is refused).

Writes are atomic: a local file is written under a temporary name and renamed; an object store PUT
of one object is atomic by itself. A local parquet file too large to hold in memory is streamed the
same way (:class:`AtomicParquet`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")

# Completion markers: a file in a finished directory holding the key it finished under and a newline,
# written last (the commit point). Two names, as existing run roots have them: a pipeline stage's
# ``_SUCCESS``, a bench cell's or a sketch warm-up's ``_DONE``. Read and write them with
# ``Store.mark_done`` / ``Store.done_key`` / ``Store.is_done`` / ``Store.clear_done``.
STAGE_MARKER = "_SUCCESS"
DONE_MARKER = "_DONE"


def is_remote(uri: str) -> bool:
    """An object store URI (``s3://``, ``gs://``, ``gcs://``): one that is downloaded, cached, timed out."""
    return uri.startswith(REMOTE_SCHEMES)


def is_uri(path: str | os.PathLike[str]) -> bool:
    """Anything with a scheme (``s3://``, ``gs://``, ``file://`` …), not a plain local path or a hub id.
    Wider than :func:`is_remote`: what pyarrow's filesystems, not ``pathlib``, should open."""
    return "://" in str(path)


S3_CONNECT_TIMEOUT_S = 5.0  # an unreachable endpoint fails in seconds, not minutes
# A request that receives no byte for this long fails (on Linux curl's low-speed limit: an idle
# connection, not a slow transfer). A request that times out is sent twice per attempt (6 connections
# for 3 attempts, as measured with pyarrow 26), so an endpoint that accepts connections and never
# answers fails after about 2 × 3 × 8 s = 48 s (50 s measured; 365 s with the former 60 s).
S3_REQUEST_TIMEOUT_S = 8.0
S3_ATTEMPTS = 3


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path or a remote URI. S3 gets
    connect and request timeouts of seconds and a bounded number of attempts (unless the URI's query
    sets its own options)."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return uri_filesystem(uri)


def uri_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pyarrow.fs.FileSystem.from_uri(uri)``, but S3 gets the timeouts, attempts and endpoint of
    :func:`s3_options` (unless the URI's query sets its own options). Every URI goes through here,
    never through ``from_uri`` directly."""
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.S3FileSystem) and "?" not in uri:
        fs = pafs.S3FileSystem(region=fs.region, **s3_options())
    return fs, path


def s3_options() -> dict[str, Any]:
    """The :class:`pyarrow.fs.S3FileSystem` keywords every S3 root and input gets: timeouts, attempts
    and the endpoint from the environment."""
    return {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        **_s3_endpoint(),
    }


def _s3_endpoint() -> dict[str, str]:
    """``endpoint_override`` and ``scheme`` from $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL (what
    ``FileSystem.from_uri`` honours and the constructor does not)."""
    from urllib.parse import urlsplit

    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return {"endpoint_override": parts.netloc + parts.path.rstrip("/"), "scheme": parts.scheme or "https"}


class StorageError(RuntimeError):
    """A run root or input location that cannot be reached or used (one line, fit to show a user)."""


_TIMED_OUT = ("curlCode: 28", "Timeout was reached", "timed out")


def _no_answer(detail: str) -> str:
    """A plain-words prefix for an S3 error that is a timeout (an endpoint that accepts connections
    and never answers), naming the endpoint and the limits; empty for any other error."""
    if not any(mark in detail for mark in _TIMED_OUT):
        return ""
    endpoint = _s3_endpoint()
    where = f"{endpoint['scheme']}://{endpoint['endpoint_override']}" if endpoint else "the S3 endpoint"
    attempts = f"{S3_ATTEMPTS} attempt{'s' if S3_ATTEMPTS != 1 else ''}"
    return (f"no answer from {redact_uri(where)} within {S3_REQUEST_TIMEOUT_S:g} s "
            f"({attempts}; check AWS_ENDPOINT_URL and that the server is up): ")


def redact_uri(uri: str) -> str:
    """``uri`` without a ``user:secret@`` part or secret query parameters."""
    from spice_ray.config import redact

    return str(redact(uri))


def _check_relative(rel: str) -> str:
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise ValueError(f"path {rel!r} would escape the run root")
    return "/".join(parts)


@dataclass
class Store:
    """A run root. ``uri(rel)`` gives a string that pyarrow, Ray Data and Ray Train all accept."""

    root: str
    fs: pafs.FileSystem = field(init=False, repr=False)
    base: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.fs, self.base = resolve_filesystem(self.root)
            self.base = self.base.rstrip("/")
            if self.is_local:
                self.root = self.base
            if self.is_local and Path(self.base).exists() and not Path(self.base).is_dir():
                raise NotADirectoryError(f"{self.base} is a file")
            self.fs.create_dir(self.base, recursive=True)
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())
            hint = _no_answer(detail) if isinstance(getattr(self, "fs", None), pafs.S3FileSystem) else ""
            raise StorageError(f"run root {redact_uri(self.root)} cannot be used: {hint}{detail[:300]}") from None

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """The filesystem path (no scheme) of ``rel`` under the root."""
        rel = _check_relative(rel) if rel else ""
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, rel: str = "") -> str:
        """``rel`` under the root as a full URI (a plain absolute path when local)."""
        if self.is_local:
            return self.path(rel)
        scheme = self.root.split("://", 1)[0]
        return f"{scheme}://{self.path(rel)}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read().decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one file atomically: locally under a temporary name, fsynced, then renamed; on an
        object store one PUT (atomic by itself)."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(target) as fh:
                fh.write(data)
            return
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def mark_done(self, rel: str, key: str, *, marker: str = DONE_MARKER) -> None:
        """Mark the directory ``rel`` finished under ``key`` (``rel/<marker>`` holding ``key`` and a newline)."""
        self.write_text(f"{rel}/{marker}" if rel else marker, key + "\n")

    def done_key(self, rel: str, *, marker: str = DONE_MARKER) -> str | None:
        """The key the directory ``rel`` finished under; None when it has no marker."""
        path = f"{rel}/{marker}" if rel else marker
        return self.read_text(path).strip() if self.exists(path) else None

    def is_done(self, rel: str, key: str, *, marker: str = DONE_MARKER) -> bool:
        """Whether the directory ``rel`` finished under ``key``."""
        return self.done_key(rel, marker=marker) == key

    def clear_done(self, rel: str, *, marker: str = DONE_MARKER) -> None:
        """Remove ``rel``'s marker (before its work is redone: unfinished work is never trusted)."""
        self.delete(f"{rel}/{marker}" if rel else marker)

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Copy one file under the root."""
        dst = self.path(dst_rel)
        self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        self.fs.copy_file(self.path(src_rel), dst)

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def upload_dir(self, local_dir: str | Path, rel: str, *, replace: bool = True) -> str:
        """Copy a local directory under the root (first removing what is there when ``replace``);
        returns its URI."""
        if self.is_local and Path(local_dir).resolve() == Path(self.path(rel)):
            return self.uri(rel)
        if replace:
            self.delete(rel)
        self.fs.create_dir(self.path(rel), recursive=True)
        pafs.copy_files(str(local_dir), self.path(rel), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return self.uri(rel)


    def size(self, rel: str) -> int:
        """Bytes under ``rel`` (a file, or every file of a directory; 0 when absent)."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            return sum(i.size or 0 for i in self.fs.get_file_info(pafs.FileSelector(info.path, recursive=True)))
        if info.type == pafs.FileType.File:
            return info.size or 0
        return 0

    def download(self, rel: str, local: str | Path) -> bool:
        """Copy ``rel`` (a file or a directory) to the local path ``local``; False when it is absent."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.NotFound:
            return False
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if info.type == pafs.FileType.Directory:
            Path(local).mkdir(exist_ok=True)
        pafs.copy_files(info.path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return True


def replace_atomically(src: str | Path, dst: str | Path) -> None:
    """Rename local ``src`` to ``dst`` in one step (``os.replace``): readers see the old ``dst`` or
    the new one, never a half-written one. A file replaces a file; a directory replaces only an
    absent (or empty) directory, else ``OSError`` (see :func:`publish_once`, :func:`replace_dir`)."""
    os.replace(src, dst)


def publish_once(tmp: str | Path, dst: str | Path) -> bool:
    """Rename the finished local directory ``tmp`` to ``dst`` unless another writer got there first
    (its ``dst`` is kept, ``tmp`` removed; False). For content that any writer makes identically."""
    try:
        os.replace(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished local directory ``src`` to ``dst``, replacing an older ``dst`` (a rerun's):
    the old one is renamed aside (``.<name>.old-<pid>``), the new one renamed in, then the old one
    deleted, so ``dst`` is always a whole directory except between the two renames."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move directory ``src`` to ``dst`` (which must not exist) on ``fs``.

    Locally one rename (atomic). Object stores have no directories to rename: every object is
    copied, then ``src`` is deleted; readers rely on the stage's completion marker instead.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    src = src.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, f"{dst.rstrip('/')}{info.path[len(src):]}")
    fs.delete_dir(src)


class AtomicParquet:
    """A local parquet file written under a temporary name, renamed into place on commit. Rows come as
    tables of any size and are written in row groups of exactly ``row_group`` rows (the last one
    shorter), so the file's bytes depend only on its rows, not on how they arrived."""

    def __init__(self, path: Path, schema: pa.Schema, row_group: int) -> None:
        self.path = path
        self.schema = schema
        self.row_group = row_group
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.n_pending += table.num_rows
        if self.n_pending >= self.row_group:
            self._write(whole=False)

    def _write(self, whole: bool) -> None:
        """Write the pending rows in row groups of ``row_group`` (keeping a short tail unless ``whole``)."""
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        size = self.row_group
        n = table.num_rows if whole else table.num_rows - table.num_rows % size
        for start in range(0, n, size):
            self.writer.write_table(table.slice(start, min(size, n - start)).combine_chunks())
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


def ensure_local(uri: str, cache_dir: str | Path | None = None) -> str:
    """A local path holding ``uri``: the path itself when local, else a cached download.

    The cache entry is keyed by the URI and its files' sizes and mtimes, so a remote directory that
    changed is downloaded again. Hub ids (neither a local path nor a remote URI) pass through
    unchanged for from_pretrained.
    """
    if not is_remote(uri):
        return uri
    cache = Path(cache_dir or os.environ.get("SPICE_CACHE", Path.home() / ".cache" / "spice-ray")) / "remote"
    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {uri}")
    target = cache / hashlib.sha256((uri + files_key([uri])).encode()).hexdigest()[:24]
    local = target / info.base_name if info.type == pafs.FileType.File else target  # a file keeps its name
    done = target / ".complete"
    if done.exists():
        return str(local)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".dl-"))
    dest = tmp / info.base_name if info.type == pafs.FileType.File else tmp
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    (tmp / ".complete").write_text(uri + "\n")
    try:
        os.replace(tmp, target)  # a complete download appears at once, or not at all
    except OSError:  # another worker on this node finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not done.exists():
            raise
    return str(local)


def files_key(paths: list[str] | tuple[str, ...]) -> str:
    """A key over input files' paths, sizes and mtimes, local or remote (content hashes go in manifests).

    A path that is not there contributes its name only; the reader that needs it raises.
    """
    h = hashlib.sha256()
    for p in paths:
        fs, path = resolve_filesystem(str(p))
        h.update(f"{p}\n".encode())
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda f: f.path)
        else:
            infos = [info]
        for f in infos:
            if f.type == pafs.FileType.File:
                h.update(f"{f.path}:{f.size}:{f.mtime_ns}\n".encode())
    return h.hexdigest()
