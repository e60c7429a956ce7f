"""Progress of long stage work, for whoever shows it: the CLI draws a bar, a library caller sees nothing.

A stage calls ``progress.update(task, done, total)`` as its work advances (the sketch stage per
finished batch, the bench per cell); ``progress.listen(callback)`` installs the one listener of this
process (the CLI's bar) and ``progress.listen(None)`` removes it.
"""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str, int, int], None]
_listener: Listener | None = None


def listen(callback: Listener | None) -> None:
    global _listener
    _listener = callback


def update(task: str, done: int, total: int) -> None:
    if _listener is not None:
        _listener(task, done, total)
