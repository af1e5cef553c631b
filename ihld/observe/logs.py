"""Structured event log: structlog JSON lines to stderr (journald) and a file.

One event per state change, one JSON object per line::

    {"timestamp":"2026-05-09T07:35:25.123456Z","level":"info","event":"stage_finished",
     "job_id":"j1","stage":"critic","model":"gemma2","backend":"local","duration_s":1.9}

Event names are past-tense snake_case; ``job_id``, ``stage``, ``model`` and
``backend`` come from :func:`structlog.contextvars.bind_contextvars`, so a
task binds them once and every event it logs carries them.

Why it is built this way:

* **No stdlib logging.** The daemon logs several events per stage at more
  than a thousand stages a second; a custom logger that renders once to
  bytes and ``os.write``\\ s them to each target avoids the handler/
  formatter/lock machinery. Loggers are cached on first use.
* **Reconfigurable although cached.** SIGHUP may change level and targets,
  but cached loggers keep the objects they were built with. So the
  processor list, the output object and the level threshold are single
  long-lived objects that :func:`configure_logging` updates *in place*
  (the same trick :func:`structlog.testing.capture_logs` uses).
* **journald priorities.** When stderr is the journal (``$JOURNAL_STREAM``
  names stderr's device and inode), each line is prefixed with ``<N>``
  (syslog priority) so ``SyslogLevelPrefix=true`` files it at the right
  ``PRIORITY``. The file gets bare JSON.
* **Never crashes on data.** Lone surrogates (from ``surrogateescape``d file
  names, say) are written as ``\\udcxx`` escapes, not a UnicodeEncodeError;
  unserialisable values fall back to ``repr``; a full disk or closed stderr
  is reported once and the daemon keeps running.
* **Listeners see every event.** ``configure_logging(listeners=[...])``
  feeds each event dict (context merged, before level filtering) to the
  given callables, so metrics are derived from the same events the log
  records and the code that logs needs no separate metrics calls. A
  listener that raises is reported once on stderr and never breaks logging.
* **The log file is durable input.** Reports and timelines read it back with
  :func:`read_events`; each line is a single ``O_APPEND`` write, so a crash
  can tear at most the last line, which the reader skips.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from ihld.observe.logs_read import read_events
from ihld.observe.logs_render import _describe, _dumps, _render

__all__ = [
    "LOG_FILE",
    "Listener",
    "close_logging",
    "configure_logging",
    "log_path",
    "log_targets",
    "read_events",
    "stderr_is_journal",
]

LOG_FILE = Path("log") / "ihld.jsonl"  # relative to the spool directory

# Numeric thresholds for filtering (stdlib values, so they read familiarly).
_LEVEL_NUMBERS: dict[str, int] = {
    "debug": 10,
    "info": 20,
    "msg": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
    "fatal": 50,
}
# syslog priorities for journald's SyslogLevelPrefix= (sd-daemon(3)'s SD_* prefixes).
_PRIORITY_PREFIX: dict[str, bytes] = {
    "debug": b"<7>",
    "info": b"<6>",
    "msg": b"<6>",
    "warning": b"<4>",
    "warn": b"<4>",
    "error": b"<3>",
    "exception": b"<3>",
    "critical": b"<2>",
    "fatal": b"<2>",
}
_FILE_MODE = 0o640  # group ihld may read the event log (reports); nobody else

# A listener gets (level method name, event dict with the context merged).
Listener = Callable[[str, Mapping[str, Any]], None]


def log_path(spool_dir: Path) -> Path:
    """Where the daemon's event log lives inside the spool."""
    return spool_dir / LOG_FILE


def stderr_is_journal() -> bool:
    """True when fd 2 is the stream systemd connected to journald.

    systemd sets ``JOURNAL_STREAM=<dev>:<ino>`` for a service whose stderr
    (or stdout) is the journal. Comparing with ``fstat(2)`` rather than
    trusting the variable alone matters because the variable is inherited:
    ``ihld`` started from a shell inside a unit, or with stderr redirected to
    a file, must not write ``<6>`` prefixes into that file.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(2)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


# -- processors --------------------------------------------------------------


class _LevelFilter:
    """Drops events below a threshold that reconfiguration can move.

    structlog's ``make_filtering_bound_logger`` would be a few hundred ns
    faster per dropped debug event, but fixes the level inside every cached
    logger for the life of the process, which a SIGHUP reload cannot undo.
    """

    def __init__(self) -> None:
        self.threshold = 20

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if _LEVEL_NUMBERS.get(method_name, 20) < self.threshold:
            raise structlog.DropEvent
        return event_dict


class _Tap:
    """First processor: hands every event, before level filtering, to the listeners.

    The listeners get a copy with the bound context (``job_id``, ``model`` …)
    merged, the way ``merge_contextvars`` would, so they may keep it. With no
    listeners this costs one attribute read per event.
    """

    def __init__(self) -> None:
        self.listeners: tuple[Listener, ...] = ()
        self._failed: set[int] = set()

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        listeners = self.listeners
        if listeners:
            event = {**structlog.contextvars.get_contextvars(), **event_dict}
            for listener in listeners:
                try:
                    listener(method_name, event)
                except Exception as exc:
                    self._report(listener, exc)
        return event_dict

    def _report(self, listener: Listener, exc: Exception) -> None:
        """The first failure of each listener goes to stderr, once; logging goes on."""
        if id(listener) in self._failed:
            return
        self._failed.add(id(listener))
        notice = {
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "level": "error",
            "event": "log_listener_failed",
            "listener": repr(listener),
            "error": _describe(exc),
        }
        with contextlib.suppress(Exception):
            _write_all(2, _dumps(notice))


# -- output ------------------------------------------------------------------


class _Targets:
    """An immutable snapshot of where lines go; swapped as a whole on reconfigure."""

    __slots__ = ("file_fd", "file_path", "journal", "stderr")

    def __init__(
        self, *, stderr: bool, journal: bool, file_fd: int | None, file_path: Path | None
    ) -> None:
        self.stderr = stderr
        self.journal = journal
        self.file_fd = file_fd
        self.file_path = file_path


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (pipes may take a line in pieces); raise OSError on failure."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _TeeLogger:
    """The wrapped logger structlog hands rendered lines to: file first, then stderr.

    One instance lives for the whole process (cached loggers hold it); its
    targets are replaced atomically by :func:`configure_logging`. Each line
    is a single ``write`` per target: ``O_APPEND`` keeps concurrent writers
    from interleaving within a line, and unbuffered output means nothing is
    lost on ``kill -9`` except a line being written.
    """

    def __init__(self) -> None:
        self.targets = _Targets(stderr=True, journal=False, file_fd=None, file_path=None)
        self._file_failing = False

    def _emit(self, prefix: bytes, line: bytes | str) -> None:
        if isinstance(line, str):  # another renderer (e.g. a test's) returned text
            line = line.encode("utf-8", "backslashreplace")
            if not line.endswith(b"\n"):
                line += b"\n"
        # The lock (uncontended: ~0.1 µs) keeps a reconfigure from closing the
        # file, and the kernel reusing its fd number, while a thread writes.
        with _LOCK:
            self._write(prefix, line)

    def _write(self, prefix: bytes, line: bytes) -> None:
        targets = self.targets
        if targets.file_fd is not None:
            try:
                _write_all(targets.file_fd, line)
            except OSError as exc:
                self._file_error(targets, exc)
            else:
                self._file_failing = False
        if targets.stderr:
            # try/except, not contextlib.suppress: this runs for every event and
            # a try block costs nothing when no exception is raised.
            try:  # noqa: SIM105
                _write_all(2, prefix + line if targets.journal else line)
            except OSError:
                # stderr closed or the journal stream broken: there is nowhere
                # left to report this, and the daemon must keep working.
                pass

    def _file_error(self, targets: _Targets, exc: OSError) -> None:
        """Report the first failure of a streak (ENOSPC, EIO …) on stderr, once."""
        if self._file_failing:
            return
        self._file_failing = True
        if targets.stderr:
            notice = {
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "level": "error",
                "event": "log_file_write_failed",
                "path": str(targets.file_path),
                "error": f"{type(exc).__name__}: {exc}",
            }
            with contextlib.suppress(OSError):
                _write_all(2, (b"<3>" if targets.journal else b"") + _dumps(notice))

    def debug(self, line: bytes | str) -> None:
        self._emit(b"<7>", line)

    def info(self, line: bytes | str) -> None:
        self._emit(b"<6>", line)

    msg = info

    def warning(self, line: bytes | str) -> None:
        self._emit(b"<4>", line)

    warn = warning

    def error(self, line: bytes | str) -> None:
        self._emit(b"<3>", line)

    exception = error

    def critical(self, line: bytes | str) -> None:
        self._emit(b"<2>", line)

    fatal = critical

    def __getattr__(self, name: str) -> Any:
        """Unknown method names (other wrapper classes) still log, at their priority or info."""
        prefix = _PRIORITY_PREFIX.get(name, b"<6>")
        return lambda line: self._emit(prefix, line)


# Re-entrant: an event logged from a signal handler that interrupted a write
# on the same thread must not deadlock.
_LOCK = threading.RLock()
_OUTPUT = _TeeLogger()
_LEVEL = _LevelFilter()
_TAP = _Tap()
_PROCESSORS: list[Processor] = []


def _logger_factory(*args: Any) -> _TeeLogger:
    """Every logger shares the one output object (``get_logger(__name__)`` args ignored)."""
    return _OUTPUT


def _open_log_file(path: Path) -> int:
    """Open for appending, creating it (0640 before umask) and its directory as needed.

    ``O_NOFOLLOW``: the log sits in a directory other users can reach; a
    symlink planted there must not make the daemon append to another file.
    """
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, _FILE_MODE)


def configure_logging(
    level: str = "info",
    *,
    log_file: Path | None = None,
    stderr: bool = True,
    listeners: Sequence[Listener] = (),
) -> None:
    """Set up (or change) structured logging; safe to call again on reload.

    The new file is opened before anything changes, so a failure (bad path,
    permissions) raises ``OSError`` and leaves the current setup working —
    a reload keeps its old log. The previous file is closed afterwards,
    which also makes SIGHUP the way to reopen a rotated log.

    ``listeners`` replace the previous ones: each is called with every event
    (any level) as ``listener(method_name, event_dict)``.
    """
    key = level.lower()
    if key not in _LEVEL_NUMBERS or key in {"msg", "warn", "exception", "fatal"}:
        raise ValueError(
            f"unknown log level {level!r}: use debug, info, warning, error or critical"
        )
    new_fd = _open_log_file(log_file) if log_file is not None else None
    with _LOCK:
        old = _OUTPUT.targets
        _OUTPUT.targets = _Targets(
            stderr=stderr,
            journal=stderr and stderr_is_journal(),
            file_fd=new_fd,
            file_path=log_file,
        )
        _LEVEL.threshold = _LEVEL_NUMBERS[key]
        _TAP.listeners = tuple(listeners)
        # In place: cached loggers (and capture_logs) hold this very list.
        _PROCESSORS[:] = [
            _TAP,
            _LEVEL,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _render,
        ]
        structlog.configure(
            processors=_PROCESSORS,
            # The threshold lives in _LEVEL, so the wrapper passes everything.
            wrapper_class=structlog.make_filtering_bound_logger(0),
            context_class=dict,
            logger_factory=_logger_factory,
            cache_logger_on_first_use=True,
        )
        if old.file_fd is not None:
            os.close(old.file_fd)


def close_logging() -> None:
    """Close the log file; later events still go to stderr if it was enabled.

    Called at the very end of shutdown. Loggers stay usable, so a late
    event (from a finally block, say) is never an error.
    """
    with _LOCK:
        old = _OUTPUT.targets
        _OUTPUT.targets = _Targets(
            stderr=old.stderr, journal=old.journal, file_fd=None, file_path=None
        )
        if old.file_fd is not None:
            os.close(old.file_fd)


# -- reading back --------------------------------------------------------------


def log_targets() -> dict[str, Any]:
    """Where events go right now (for ``ihld status`` and tests)."""
    t = _OUTPUT.targets
    return {"stderr": t.stderr, "journal": t.journal, "file": t.file_path}
