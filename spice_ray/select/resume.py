"""Checkpoints of a greedy selection: the picks so far, written atomically; resume replays them.

No Ray. What is stored is only the list of picks (plus a fingerprint of the problem). That is
enough to resume *exactly*: the selected-side state is a deterministic function of the picks (each
pick's canonical ``u = M⁻¹g`` comes from the state before it), every engine decides by the
canonical score (see :mod:`spice_ray.select.state`), and the candidate-side state of a fresh engine
that replays the picks (eager: the updates applied in blocked products, O(t) passes' worth of work
in t/128 reads; lazy: only the selected-side updates, its initial bounds stay valid) leads to the
same decisions. So a killed selection that resumes ends with the same picks, gains and trace as an
uninterrupted one.

Layout: ``<dir>/picks.json`` = ``{"version", "fingerprint", "picks", "complete"}``, written with
``Store.write_text`` (atomic: a temp file renamed into place locally, one object put on a store).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from spice_ray.storage import Store

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


def fingerprint(*, groups: Any = None, **fields: Any) -> dict[str, Any]:
    """A checkpoint's fingerprint: ``fields`` (the problem's parameters and data hash) in order, then a
    hash of the per-row group labels when there are any."""
    fp = dict(fields)
    if groups is not None:
        fp["groups"] = hashlib.sha256("\n".join(map(str, np.asarray(groups).tolist())).encode()).hexdigest()
    return fp


class PickCheckpoint:
    """``load`` / ``save`` the picks of one selection under ``directory`` (local path or URI)."""

    def __init__(self, directory: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.directory = str(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised (tuples → lists)
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:  # on first use: a Store creates its directory
            self._store = Store(self.directory)
        return self._store

    @property
    def path(self) -> str:
        return self.store.uri(CHECKPOINT_FILE)

    def _read(self) -> str | None:
        return self.store.read_text(CHECKPOINT_FILE) if self.store.exists(CHECKPOINT_FILE) else None

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
        data = {"version": VERSION, "fingerprint": self.fingerprint, "picks": [int(i) for i in picks], "complete": complete}
        self.store.write_text(CHECKPOINT_FILE, json.dumps(data))

    def clear(self) -> None:
        """Remove the checkpoint and its directory (after the selection's outputs are safely written)."""
        self.store.delete(CHECKPOINT_FILE)
        if not self.store.is_local:
            self.store.delete("")  # the prefix: an object store has no directory to leave behind
            return
        with contextlib.suppress(OSError):
            os.rmdir(self.store.path())  # only when nothing else is in it
