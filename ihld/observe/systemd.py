"""sd_notify for a ``Type=notify`` service, in plain stdlib.

Why not libsystemd or a PyPI package: the protocol is one datagram of
``KEY=value`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace), and owning those ~100
lines lets us promise two things the daemon depends on:

* **It never raises.** A notification is advice to the service manager; a
  vanished or full socket (systemd restarting, a test harness gone) must not
  take the scheduler down. Failures are logged once per streak and reported
  as ``False``.
* **It never blocks.** The socket is non-blocking, so a stalled receiver
  cannot stall the event loop; the message is dropped instead.

Without ``$NOTIFY_SOCKET`` (a terminal, a test, ``ihld demo``) every method
returns ``False`` at once, so callers never need to ask "am I under systemd?".

The watchdog is deliberately pinged *from the event loop*
(:func:`watchdog_loop`): if the loop is stuck, pings stop and systemd kills
and restarts the daemon; if the scheduler reports itself unhealthy, pings
are withheld for the same effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

__all__ = ["Notifier", "watchdog_loop"]


def _log() -> Any:
    """Looked up per use (all uses are rare): follows reconfiguration and capture_logs."""
    return structlog.get_logger(__name__)


# systemd's own field names are upper-case identifiers; anything else is a
# programming error that would silently be ignored by the manager.
_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# A newline inside a value would start a new (forged) field; NUL ends the C
# string on the receiving side. Both are replaced, never sent.
_UNSAFE = str.maketrans({"\n": " ", "\r": " ", "\0": ""})

FieldValue = str | int | float | bool


def _clean(value: FieldValue) -> str:
    """Render one field value as a single line the manager parses as we meant."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return value.translate(_UNSAFE)


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends state changes to the service manager over ``$NOTIFY_SOCKET``.

    Build it with :meth:`from_env` once at start-up; the environment is read
    then, so tests and the daemon see one consistent view. Every method
    returns ``True`` if the datagram was handed to the kernel, ``False`` when
    there is no socket or sending failed (already logged).
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        """``address`` is ``$NOTIFY_SOCKET`` verbatim (``/path`` or ``@abstract``) or None."""
        self._address: str | bytes | None = None
        self._display = address or ""
        self._unsupported = False
        if address:
            if address.startswith("@"):
                # Abstract namespace: a leading NUL instead of '@', no filesystem entry,
                # which is why systemd uses it (works after chroot/ProtectSystem).
                self._address = b"\0" + os.fsencode(address[1:])
            elif address.startswith("/"):
                self._address = address
            else:
                # e.g. "vsock:..." (systemd ≥ 254, VMs): not something ihld runs under.
                self._unsupported = True
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: os.environ).

        Malformed watchdog values are treated as "no watchdog": systemd never
        sets them that way, so a bad value came from a user's shell, and
        guessing an interval would be worse than not pinging.
        """
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(env.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to (i.e. running under a service manager)."""
        return self._address is not None

    # -- the generic sender -------------------------------------------------

    def send(self, **fields: FieldValue) -> bool:
        """Send one datagram of ``KEY=value`` lines, in argument order.

        ``send(READY=1, STATUS="idle")`` → ``b"READY=1\\nSTATUS=idle"``. Values
        are forced onto one line. Field names must be systemd-style upper-case
        identifiers (ValueError otherwise: that is a bug, not a runtime fault).
        """
        if self._address is None:
            if self._unsupported and not self._failing:
                self._failing = True
                _log().warning(
                    "sd_notify_unsupported",
                    notify_socket=self._display,
                    hint="only /path and @abstract AF_UNIX sockets are supported",
                )
            return False
        for name in fields:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"sd_notify field name {name!r} is not an upper-case identifier")
        payload = "\n".join(f"{name}={_clean(value)}" for name, value in fields.items())
        return self._send_bytes(payload.encode("utf-8", "backslashreplace"))

    def _send_bytes(self, data: bytes) -> bool:
        """Hand one datagram to the kernel; log the first failure of a streak, never raise."""
        assert self._address is not None
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(data, self._address)
        except OSError as exc:
            # ENOENT/ECONNREFUSED: the socket is gone; EAGAIN: the manager is not
            # reading. Either way the daemon carries on; retrying happens naturally
            # with the next notification.
            if not self._failing:
                self._failing = True
                _log().warning(
                    "sd_notify_failed",
                    notify_socket=self._display,
                    error=f"{type(exc).__name__}: {exc}",
                    message=data.decode("utf-8", "replace").replace("\n", " "),
                )
            return False
        if self._failing:
            self._failing = False
            _log().info("sd_notify_recovered", notify_socket=self._display)
        return True

    # -- well-known states --------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1`` and optionally ``STATUS=``.

        With ``Type=notify``, ``systemctl start`` returns only now, so call it
        after the spool is recovered and the inbox scanned, not before.
        """
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status`` (live counts)."""
        return self.send(STATUS=text)

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts: ``RELOADING=1`` plus ``MONOTONIC_USEC=`` (now, CLOCK_MONOTONIC µs).

        The timestamp lets systemd ≥ 253 tell this reload apart from an older
        one (it is required for ``Type=notify-reload``); older managers ignore
        it. Follow with :meth:`ready` when the reload is done, whether the new
        config was accepted or rejected, or the unit stays "reloading".
        """
        fields: dict[str, FieldValue] = {"RELOADING": 1, "MONOTONIC_USEC": _monotonic_usec()}
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def stopping(self, status: str | None = None) -> bool:
        """Graceful stop has begun: ``STOPPING=1`` (the unit shows "deactivating")."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``); see :func:`watchdog_loop` for the cadence."""
        return self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop/reload timeout fires.

        ``EXTEND_TIMEOUT_USEC`` is relative to *now*, not cumulative: a long
        spool recovery or drain calls this repeatedly, each time asking for
        the time the next step may take.
        """
        if seconds <= 0:
            raise ValueError("extend_timeout needs a positive number of seconds")
        return self.send(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))

    # -- watchdog -----------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None if no watchdog applies to *this* process.

        ``WATCHDOG_PID`` pins the setting to one pid so a forked child that
        inherited the environment does not ping on the parent's behalf.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    def close(self) -> None:
        """Release the socket (later sends reopen it; closing is only tidiness)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(address={self._display!r}, watchdog_usec={self._watchdog_usec})"


def _positive_int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def _is_healthy(healthy: Callable[[], bool] | None) -> bool:
    """A health check that raises counts as unhealthy: a bug there must not end the loop."""
    if healthy is None:
        return True
    try:
        return bool(healthy())
    except Exception as exc:
        _log().error("watchdog_health_check_failed", error=f"{type(exc).__name__}: {exc}")
        return False


async def watchdog_loop(
    notifier: Notifier,
    stop: asyncio.Event,
    healthy: Callable[[], bool] | None = None,
) -> None:
    """Ping the watchdog at half its interval until ``stop`` is set.

    Runs as a sibling task of the scheduler on the same event loop, on
    purpose: a blocked loop cannot ping, so systemd's watchdog catches a
    hung daemon. ``healthy`` lets the scheduler withhold pings (e.g. it has
    made no progress for too long) to get the same restart on a logical
    hang; pings resume if it recovers before systemd gives up. Returns at
    once when no watchdog is configured for this process.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    period = interval / 2
    withheld = False
    while not stop.is_set():
        if _is_healthy(healthy):
            if withheld:
                withheld = False
                _log().info("watchdog_resumed")
            notifier.watchdog()
        elif not withheld:
            withheld = True
            _log().warning("watchdog_withheld", timeout_s=interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)
