"""Discovery: the corpus files to read, in order, from what the user named.

Inputs are files, folders (walked recursively; hidden names skipped) or glob patterns, read in
order (a folder's files sorted by their relative name); a file is read when its name ends with one
of :data:`~spice_ray.corpus.readers.files.SUPPORTED_SUFFIXES`.

Named inputs: a missing path, a broken symlink, something not a file or folder, a file with another
extension, or a glob pattern (``*``, ``?``, ``[...]``; ``**`` for any number of folders; a path that
exists is never a pattern) that matches nothing is an :class:`IngestError` with a one-line message
naming it. A file with another extension inside a folder (or matched by a pattern) is skipped with a
warning. Symlinks (files and folders) are followed while their real target stays inside one of the
named inputs (for a pattern, its literal leading folder); a link pointing outside is one
``symlink_outside_root`` row and is never opened (its ``raw`` is empty); a folder reached twice
(symlink loop) is read once. A named input that is itself a symlink is followed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from spice_ray.corpus.readers.base import _Flagged, _flagged, _shown
from spice_ray.corpus.readers.files import SUPPORTED_SUFFIXES, _suffix, _zstd_missing

logger = logging.getLogger(__name__)

_MAGIC = re.compile(r"[*?\[]")


class IngestError(ValueError):
    """An input that cannot be ingested at all (missing path, unsupported file named explicitly)."""


class _Roots:
    """The real paths of the inputs the user named; a symlink is followed only into them."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.real = [os.path.realpath(p) for p in paths]

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.real)


def _walk(root: Path, roots: _Roots) -> list[tuple[str, Path]]:
    """``(name relative to root, path)`` of every file under ``root``, sorted by name: hidden names
    skipped, symlinks followed while they stay inside ``roots`` (a link outside is a flagged path).
    Linked folders are walked after the real ones, and a folder already walked is skipped, so a
    folder is read once, at its real place when it has one there (and symlink loops end)."""
    found: list[tuple[str, Path]] = []
    visited: set[str] = set()
    folders: list[tuple[Path, str]] = [(root, "")]
    links: list[tuple[Path, str]] = []
    while folders or links:
        folder, prefix = folders.pop() if folders else links.pop(0)
        real = os.path.realpath(folder)
        if real in visited:
            logger.warning("skipping %s: folder already read (symlink loop or second link)", folder)
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            found.append((prefix.rstrip("/"), _flagged(folder, "unreadable_file", f"cannot list folder: {e.strerror}")))
            continue
        for entry in entries:
            name, path = prefix + entry.name, Path(entry.path)
            if entry.name.startswith("."):
                logger.debug("skipping hidden %s", path)
            elif entry.is_symlink() and not roots.inside(entry.path):
                target = _shown(os.path.realpath(entry.path))
                found.append((name, _flagged(path, "symlink_outside_root", f"symlink to {target}, outside the inputs")))
            elif entry.is_dir():
                (links if entry.is_symlink() else folders).append((path, name + "/"))
            elif entry.is_file() or entry.is_symlink():  # a broken link becomes an unreadable_file row
                found.append((name, path))
            else:
                logger.warning("skipping %s: not a regular file", path)
    return sorted(found, key=lambda t: t[0])


def _in_folder(path: Path) -> Path | None:
    """A file found in a folder or by a pattern: itself, flagged, or None (skipped with a warning)."""
    if isinstance(path, _Flagged):
        if path.reason == "symlink_outside_root" and not (path.is_dir() or _suffix(path)):
            logger.warning("skipping %s: not one of %s", path, ", ".join(SUPPORTED_SUFFIXES))
            return None
        return path
    if _suffix(path) is None:
        logger.warning("skipping %s: not one of %s", path, ", ".join(SUPPORTED_SUFFIXES))
        return None
    if _zstd_missing(path):
        return _flagged(path, "unsupported_compression", "reading .zst files needs the zstandard package")
    return path


def _named_file(path: Path) -> Path:
    if _suffix(path) is None:
        raise IngestError(f"{_shown(path)}: unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)})")
    if _zstd_missing(path):
        raise IngestError(f"{_shown(path)}: reading .zst files needs the zstandard package (pip install zstandard)")
    return path


def _is_pattern(item: str) -> bool:
    return _MAGIC.search(item) is not None and not os.path.lexists(item)


def _pattern_base(pattern: str) -> tuple[str, str]:
    """``(literal leading folder, the rest)`` of a glob pattern."""
    parts = pattern.split("/")
    i = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = "/".join(parts[:i]) or ("/" if pattern.startswith("/") else ".")
    return base, "/".join(parts[i:])


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        close = segment.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif close > 0:
            body = segment[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_regex(rest: str) -> re.Pattern[str]:
    """A regex for names relative to the pattern's base: ``*``, ``?`` and ``[...]`` within one name,
    ``**`` for any number of folders."""
    segments = rest.split("/")
    out = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            out.append(".*" if last else "(?:.*/)?")
        else:
            out.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


def _expand_pattern(pattern: str, roots: _Roots) -> list[Path]:
    """The corpus files matched by a glob pattern (a matched folder brings all its files)."""
    base, rest = _pattern_base(pattern)
    regex = _glob_regex(rest)
    found = _walk(Path(base), roots) if os.path.isdir(base) else []
    matched = []
    for name, path in found:
        parts = name.split("/")
        if any(regex.fullmatch("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            matched.append(path)
    if not matched:
        raise IngestError(f"no files match the corpus pattern {_shown(pattern)}")
    return [p for p in map(_in_folder, matched) if p is not None]


def _expand(item: str, roots: _Roots) -> list[Path]:
    if _is_pattern(item):
        return _expand_pattern(item, roots)
    path = Path(item)
    if path.is_dir():
        return [p for p in (_in_folder(found) for _, found in _walk(path, roots)) if p is not None]
    if path.is_file():
        return [_named_file(path)]
    if os.path.lexists(item) and not path.exists():
        raise IngestError(f"corpus input not found: {_shown(item)} is a broken symlink")
    if not path.exists():
        raise IngestError(f"corpus input not found: {_shown(item)}")
    raise IngestError(f"{_shown(item)}: not a regular file or folder")


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The input files, in order: each input as given, folders walked recursively (sorted), glob
    patterns expanded; symlinks followed only inside the inputs (see the module doc). A file that is
    quarantined as a whole without being opened (a link outside the inputs, a ``.zst`` file without
    zstandard, an unlistable folder) is returned as a path with ``reason`` and ``detail``
    attributes. Raises :class:`IngestError` (one line) for a missing input, an unsupported file named
    explicitly or a pattern that matches nothing."""
    items = [str(i) for i in inputs]
    roots = _Roots(_pattern_base(i)[0] if _is_pattern(i) else i for i in items)
    files: list[Path] = []
    seen: set[str] = set()
    for item in items:
        for path in _expand(item, roots):
            key = os.path.abspath(path) if isinstance(path, _Flagged) else os.path.realpath(path)
            if key in seen:
                logger.warning("skipping %s: already read as part of another input", path)
                continue
            seen.add(key)
            files.append(path)
    return files



def _file_size(path: Path) -> int:
    if isinstance(path, _Flagged):
        return 0
    try:
        return path.stat().st_size
    except OSError:
        return 0
