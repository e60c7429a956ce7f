"""Corpus files as bytes: which names are read (format suffix, then compression suffix), the
decompressed stream of one, and the sha256 of its stored bytes (hashed while it is read)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

SUPPORTED_SUFFIXES = (
    ".jsonl", ".ndjson", ".json", ".parquet",
    ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl.zst", ".ndjson.zst", ".json.zst",
)
READ_CHUNK = 1 << 20  # bytes read at a time

_BY_LENGTH = sorted(SUPPORTED_SUFFIXES, key=len, reverse=True)


def _gunzip(raw: BinaryIO) -> BinaryIO:
    return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]


def _unzstd(raw: BinaryIO) -> BinaryIO:
    import zstandard  # only reached when importable (collect_files checks)

    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Compression:
    """A compression suffix: its name in messages and how to decompress a stream of it."""

    name: str
    open: Callable[[BinaryIO], BinaryIO]


COMPRESSIONS = {".gz": Compression("gzip", _gunzip), ".zst": Compression("zstd", _unzstd)}


def _suffix(path: Path) -> str | None:
    """The supported suffix that ``path``'s name ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in _BY_LENGTH if name.endswith(s) and len(name) > len(s)), None)


def _split_suffix(suffix: str) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)``: ``.jsonl.gz`` -> ``(".jsonl", ".gz")``."""
    base, dot, last = suffix.rpartition(".")
    return (base, dot + last) if dot + last in COMPRESSIONS and base else (suffix, None)


def _stem(path: Path) -> str:
    """The file name without its corpus suffix (``alpaca.jsonl.gz`` -> ``alpaca``)."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _zstd_missing(path: Path) -> bool:
    suffix = _suffix(path) or ""
    return suffix.endswith(".zst") and importlib.util.find_spec("zstandard") is None


class _Hashing(io.RawIOBase):
    """A read-only wrapper of a binary file that hashes (sha256) every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
        return n

    def readall(self) -> bytes:
        data = self.raw.read()
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """The sha256 of the whole file: what was not read yet is read and hashed first."""
        for chunk in iter(lambda: self.raw.read(READ_CHUNK), b""):
            self.digest.update(chunk)
        return self.digest.hexdigest()


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, _Hashing]]:
    """The (decompressed) content of ``path`` as a binary stream, and the hashing wrapper of the
    file itself (call its ``finish`` for the sha256 of the stored bytes)."""
    with path.open("rb") as raw:
        hashing = _Hashing(raw)
        compression = _split_suffix(_suffix(path) or "")[1]
        stream: BinaryIO = hashing  # type: ignore[assignment]
        if compression is not None:
            stream = COMPRESSIONS[compression].open(hashing)  # type: ignore[arg-type]
        try:
            yield stream, hashing
        finally:
            if stream is not hashing:
                stream.close()


def _chunks(stream: BinaryIO, first: bytes) -> Iterator[bytes]:
    yield first
    yield from iter(lambda: stream.read(READ_CHUNK), b"")


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the file itself could not be read (not one bad row)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, pa.ArrowException)
    zstd = sys.modules.get("zstandard")
    return errors + (zstd.ZstdError,) if zstd is not None else errors


def _sha256(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            return _Hashing(fh).finish()
    except OSError:
        return ""
