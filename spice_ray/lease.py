"""One writer per run root: a lease file (``_lease.json``) with a heartbeat.

A run takes the lease before it writes anything and gives it back when it ends. A second run on
the same root (a scheduled tick that overlaps the previous one, a resubmitted job whose first
driver still runs) finds a live lease and stops at once with :class:`LeaseHeld` (exit code 3). A
lease whose heartbeat is older than ``ttl`` seconds, or whose owner is a dead process on this host,
belongs to a dead driver and is taken over, with a warning.

Taking a lease: locally, an exclusive create (``O_EXCL``); a stale lease is replaced and then read
back. On object storage there is no exclusive create, so the writer puts its lease, waits
``settle`` seconds and reads it back: of two writers that raced, the one whose lease is there owns
it and the other stops. While held, a thread renews the heartbeat every ``ttl / 4`` seconds and
notes when the lease is no longer ours (:meth:`Lease.check` raises :class:`LeaseLost` then).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from spice_ray.storage import Store

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL = 120.0


class LeaseHeld(RuntimeError):
    """Another live run holds the run root."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (its heartbeat stopped for longer than the TTL)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    store: Store
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ttl: float = DEFAULT_TTL
    settle: float | None = None  # wait before the read-back; None: 0.5 s on a local root, 2 s on object storage
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lost: bool = field(default=False, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), "ttl": self.ttl}

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_text(LEASE_FILE))
        except (FileNotFoundError, OSError, ValueError):
            return None

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder``'s lease is stale, or None when it is live."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > float(holder.get("ttl", self.ttl)):
            return f"its last heartbeat was {age:.0f} s ago"
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        return None

    def _create_local(self) -> bool:
        try:
            fd = os.open(self.store.path(LEASE_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._record(), fh)
        return True

    def acquire(self) -> Lease:
        holder = self.read()
        if holder is None and self.store.is_local and self._create_local():
            return self._start()
        holder = holder or self.read()
        if holder is not None and holder.get("run_id") != self.run_id:
            reason = self.stale_reason(holder)
            if reason is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise LeaseHeld(
                    f"run root {self.store.uri()} is held by run {holder.get('run_id')} (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, heartbeat {age:.0f} s ago); wait for it to finish, or rerun after "
                    f"{holder.get('ttl', self.ttl):.0f} s without a heartbeat if it died"
                )
            logger.warning("taking over the lease of run %s on %s: %s", holder.get("run_id"), self.store.uri(), reason)
        self.store.write_text(LEASE_FILE, json.dumps(self._record()))
        time.sleep(self.settle if self.settle is not None else (0.5 if self.store.is_local else 2.0))
        now = self.read()
        if now is None or now.get("run_id") != self.run_id:
            raise LeaseHeld(f"run root {self.store.uri()}: another run took the lease at the same moment ({(now or {}).get('run_id')})")
        return self._start()

    def _start(self) -> Lease:
        self._thread = threading.Thread(target=self._beat, name="spice-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            holder = self.read()
            if holder is None or holder.get("run_id") != self.run_id:
                self._lost = True
                logger.error("lost the lease on %s to run %s", self.store.uri(), (holder or {}).get("run_id"))
                return
            self.store.write_text(LEASE_FILE, json.dumps(self._record()))

    def check(self) -> None:
        if self._lost:
            raise LeaseLost(f"run root {self.store.uri()}: another run took over this run's lease; stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder is not None and holder.get("run_id") == self.run_id:
            self.store.delete(LEASE_FILE)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
