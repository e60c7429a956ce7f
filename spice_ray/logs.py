"""What reaches the terminal: spice-ray's stage lines and warnings, and nothing of the frameworks
underneath unless ``-v`` (everything still goes to the run's ``driver.log``).

- :func:`setup_console_logging`: the terminal handler on the root logger, filtered by
  :class:`ConsoleFilter` and formatted by :class:`ConsoleFormatter` (``12:03:04 sketch: started``,
  no ``INFO spice_ray.pipeline:`` prefix); with ``verbose`` every record, with its level and logger.
- :func:`route_framework_logs`: Ray's Python loggers write to the terminal with handlers of their
  own and do not propagate; this removes those terminal handlers and lets the records propagate to
  the root logger, so they land in ``driver.log`` and the console filter decides.
- :func:`drop_native_lines`: lines that native code (Ray's C++ core worker) writes straight to file
  descriptor 2 and that match a known false alarm are dropped (logged to ``driver.log`` instead).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

STAGE_LOGGERS = ("spice_ray.pipeline", "spice_ray.cli")  # their INFO lines are the stage lines a user reads
FRAMEWORK_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")  # loggers with terminal handlers of their own
NOISY = ("transformers", "datasets", "deepspeed", "torch", "urllib3", "filelock", "py.warnings")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # -v: everything, with level and logger
DATEFMT = "%H:%M:%S"


class ConsoleFilter(logging.Filter):
    """The terminal shows spice-ray's stage lines, spice-ray's warnings and anyone's errors; the rest
    (framework INFO and WARNING lines included) goes to the run's driver.log (and, with -v, here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):  # Ray Data's mark for a record meant for its log file only
            return False
        ours = record.name == "spice_ray" or record.name.startswith("spice_ray.")
        if record.levelno >= logging.ERROR:
            return True
        if ours and record.levelno >= logging.WARNING:
            return True
        return record.levelno >= logging.INFO and record.name in STAGE_LOGGERS


class ConsoleFormatter(logging.Formatter):
    """``12:03:04 sketch: started`` for a stage line; ``12:03:04 warning: ...`` for a warning or worse."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt=DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno < logging.WARNING:
            return line
        stamp, _, rest = line.partition(" ")
        return f"{stamp} {record.levelname.lower()}: {rest}"


def _is_console(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_spice", False))


def follow_stderr() -> None:
    """Point the terminal log handler at the current ``sys.stderr`` (rich swaps it while a bar runs)."""
    for h in logging.getLogger().handlers:
        if _is_console(h):
            h.stream = sys.stderr  # type: ignore[attr-defined]


def setup_console_logging(verbose: bool = False) -> logging.Handler:
    """Install the terminal handler once per process (later calls only re-point it at sys.stderr)."""
    root = logging.getLogger()
    root.setLevel(os.environ.get("SPICE_LOG_LEVEL", "INFO").upper())
    for h in root.handlers:
        if _is_console(h):
            follow_stderr()
            return h
    if verbose:
        os.environ["SPICE_VERBOSE"] = "1"  # the executor passes Ray's own logs through
    handler = logging.StreamHandler()
    if verbose:
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt=DATEFMT))
    else:
        handler.setFormatter(ConsoleFormatter())
        handler.addFilter(ConsoleFilter())
        _quiet_libraries()
    handler._spice = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    return handler


def _quiet_libraries() -> None:
    """Library notices go to driver.log, not the terminal."""
    if not Path("/dev/nvidiactl").exists():  # no NVIDIA driver (asking torch would cost 1.4 s of start-up)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on import that it found none
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.captureWarnings(True)  # the other Python warnings become py.warnings records: driver.log
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def route_framework_logs(names: tuple[str, ...] = FRAMEWORK_LOGGERS, level: int = logging.INFO) -> None:
    """Ray's loggers (``ray``, and ``ray.data`` once imported) print with their own stream handlers
    and ``propagate=False``. Drop their terminal handlers (file handlers such as Ray Data's
    ``ray-data.log`` stay) and let the records propagate: they reach ``driver.log``, and the terminal
    only through :class:`ConsoleFilter`."""
    for name in names:
        framework = logging.getLogger(name)
        for h in list(framework.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                framework.removeHandler(h)
        framework.propagate = True
        if framework.level == logging.NOTSET:  # a level Ray set (ray.data: DEBUG, for ray-data.log) stays
            framework.setLevel(level)


def route_raylet_notices() -> None:
    """The driver prints the raylet's notices (``(raylet) WARNING: 8 PYTHON worker processes have been
    started …``, which any 2-core machine running fractional-CPU actors triggers) straight to stdout
    from a thread of Ray's (``ray._private.worker.listen_error_messages``). Send them to the ``ray``
    logger instead: ``driver.log``, and the terminal only with ``-v``. Ray's own function is kept for
    everything else; if Ray renames it, nothing is changed."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_spice", False):
        return

    def to_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        for line in data.get("lines", []):
            logging.getLogger("ray").warning("(raylet) %s", line)
        return None

    to_log._spice = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_log


# Native (C++) lines on fd 2 that are known false alarms. Ray Data always hands a MapWorker its
# transformer and DataContext as object-store refs (ray.put in MapOperator) and makes the pool
# restartable (max_restarts=-1): Ray's core worker then logs this once per process as an ERROR,
# although Ray Data holds those refs for the whole execution, so a restart does find them.
RAY_FALSE_ALARMS = ("has constructor arguments in the object store and max_restarts > 0",)


def _pump(read_fd: int, out_fd: int, drop: tuple[str, ...], stop: threading.Event) -> None:
    """Copy ``read_fd`` to ``out_fd`` line by line, without the lines that contain one of ``drop``;
    a partial line (a prompt, a bar) passes on after 0.1 s of quiet. Ends at EOF, or once ``stop``
    is set and the pipe is drained."""
    pending = b""
    with contextlib.suppress(OSError, ValueError):
        while True:
            ready, _, _ = select.select([read_fd], [], [], 0.1)
            if not ready:
                if pending:
                    _write_all(out_fd, pending)
                    pending = b""
                if stop.is_set():
                    return
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:  # every write end closed
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _forward(line, out_fd, drop)
        if pending:
            _forward(pending, out_fd, drop, newline=False)


def _forward(line: bytes, out_fd: int, drop: tuple[str, ...], newline: bool = True) -> None:
    text = line.decode(errors="replace")
    if any(d in text for d in drop):
        logger.info("dropped from the terminal: %s", text.strip())
        return
    _write_all(out_fd, line + (b"\n" if newline else b""))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def drop_native_lines(drop: tuple[str, ...] = RAY_FALSE_ALARMS) -> Iterator[None]:
    """While inside, lines written to file descriptor 2 that contain one of ``drop`` are dropped (and
    logged at INFO, for driver.log); every other byte passes through to the original descriptor.
    Python's ``sys.stderr`` keeps writing through descriptor 2 too (unchanged, a few ms later).
    Meant for a short stretch of the driver (a Ray Data pool start-up), not a whole process."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (an embedded interpreter)
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    stop = threading.Event()
    thread = threading.Thread(target=_pump, args=(read_fd, saved, drop, stop), name="spice-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's write end closes here (unless a child inherited it)
        stop.set()
        thread.join(timeout=5)
        os.close(read_fd)
        os.close(saved)
