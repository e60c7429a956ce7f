"""Checkpoints of a greedy selection: the picks so far, written atomically; resume replays them.

No Ray. What is stored is only the list of picks (plus a fingerprint of the problem). That is
enough to resume *exactly*: the selected-side state is a deterministic function of the picks (each
pick's canonical ``u = M⁻¹g`` comes from the state before it), every engine decides by the
canonical score (see :mod:`spice_ray.select.state`), and the candidate-side state of a fresh engine
that replays the picks (eager: the updates applied in blocked products, O(t) passes' worth of work
in t/128 reads; lazy: only the selected-side updates, its initial bounds stay valid) leads to the
same decisions. So a killed selection that resumes ends with the same picks, gains and trace as an
uninterrupted one.

Layout: ``<dir>/picks.json`` = ``{"version", "fingerprint", "picks", "complete"}``. Local paths are
written to a temp file, fsynced and ``os.replace``d; ``scheme://`` URIs (pyarrow.fs) are written
with a single object put, which object stores make visible atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from typing import Any

import numpy as np
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "picks.json"
VERSION = 1


def fingerprint_data(G: np.ndarray, norm_sq: np.ndarray) -> str:
    """A content hash of the sketch matrix: its shape and dtype, all row norms, ≤ 1024 sampled rows."""
    h = hashlib.sha256()
    h.update(repr((G.shape, str(G.dtype))).encode())
    h.update(np.ascontiguousarray(norm_sq, dtype=np.float64).tobytes())
    if G.shape[0]:
        step = max(1, G.shape[0] // 1024)
        h.update(np.ascontiguousarray(G[::step]).tobytes())
        h.update(np.ascontiguousarray(G[-1]).tobytes())
    return h.hexdigest()


class PickCheckpoint:
    """``load`` / ``save`` the picks of one selection under ``directory`` (local path or URI)."""

    def __init__(self, directory: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.directory = str(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised (tuples → lists)
        self.remote = "://" in self.directory
        if self.remote:
            self.fs, root = pafs.FileSystem.from_uri(self.directory)
            self.root = root.rstrip("/")
        else:
            self.fs, self.root = None, os.path.abspath(self.directory)

    @property
    def path(self) -> str:
        return f"{self.root}/{CHECKPOINT_FILE}" if self.remote else os.path.join(self.root, CHECKPOINT_FILE)

    def _read(self) -> bytes | None:
        if self.remote:
            assert self.fs is not None
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        if not os.path.exists(self.path):
            return None
        with open(self.path, "rb") as f:
            return f.read()

    def load(self) -> list[int]:
        """The checkpointed picks, or [] when there is none or it belongs to another problem."""
        raw = self._read()
        if raw is None:
            return []
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("unreadable selection checkpoint %s; starting over", self.path)
            return []
        if data.get("version") != VERSION or data.get("fingerprint") != self.fingerprint:
            log.warning("selection checkpoint %s is for another problem or version; starting over", self.path)
            return []
        picks = [int(i) for i in data.get("picks", [])]
        log.info("resuming selection from %s: %d picks to replay", self.path, len(picks))
        return picks

    def save(self, picks: list[int], complete: bool = False) -> None:
        """Write the picks so far (atomically: a reader sees the old file or the new one)."""
        data = json.dumps(
            {"version": VERSION, "fingerprint": self.fingerprint, "picks": [int(i) for i in picks], "complete": complete}
        ).encode()
        if self.remote:
            assert self.fs is not None
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f".{CHECKPOINT_FILE}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def clear(self) -> None:
        """Remove the checkpoint (after the selection's outputs are safely written)."""
        if self.remote:
            assert self.fs is not None
            if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
                self.fs.delete_dir(self.root)
            return
        if os.path.exists(self.path):
            os.remove(self.path)
        try:
            os.rmdir(self.root)
        except OSError:
            pass
