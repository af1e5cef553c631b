"""The simulator and the daemon as child processes, each with its own GIL.

Run in one process, the simulator's token pacing and the daemon's
bookkeeping would compete for one interpreter, and the daemon would look
slower (or the model faster) than either is. As separate processes they
compete only for CPUs, as they would on a real machine. Every wait here is
bounded; every child is terminated (then killed) when the bench is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from ihld.common.errors import IhldError

IHLD = [sys.executable, "-m", "ihld"]
LISTENING = re.compile(r"listening on (http://\S+)")


class BenchError(IhldError):
    """A bench run could not be carried out (a child did not start, a run timed out)."""


def _readline(stream: IO[str], timeout_s: float) -> str:
    """One line from a child's stdout, or "" if none came within ``timeout_s``."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return stream.readline()


def reap(proc: subprocess.Popen[Any], timeout_s: float) -> float | None:
    """Wait up to ``timeout_s`` for ``proc`` to exit; its user + system CPU seconds.

    ``os.wait4`` rather than ``Popen.wait`` because it also returns the
    child's resource usage: how much CPU the daemon and the simulator burnt
    is part of the answer to "where does the time go". Raises
    ``subprocess.TimeoutExpired`` if the child is still running.
    """
    if proc.returncode is not None:
        return None
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        time.sleep(delay)
        delay = min(0.1, delay * 2)


def stop(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> float | None:
    """SIGTERM, wait, then SIGKILL; the child's CPU seconds if it could be reaped."""
    if proc.returncode is not None:
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        return reap(proc, timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return reap(proc, 5.0)


class SimProcess:
    """``python -m ihld sim`` on a free port; ``url`` once it listens."""

    def __init__(
        self,
        profile: str,
        speed: float,
        *,
        slots: int,
        max_loaded: int,
        seed: int,
        log: Path,
        timeout_s: float = 30.0,
        port: int = 0,
    ) -> None:
        args = [
            *IHLD, "sim", "--port", str(port), "--profile", profile, "--speed", repr(speed),
            "--seed", str(seed), "--slots", str(slots), "--max-loaded", str(max_loaded),
        ]  # fmt: skip
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True
            )
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout_s)
        match = LISTENING.search(line)
        if not match:
            stop(self.proc)
            raise BenchError(f"simulator did not start ({line!r}); see {log}")
        self.url = match.group(1)

    def get(self, path: str, timeout_s: float = 30.0) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def stop(self) -> float | None:
        """Stop the simulator; its CPU seconds."""
        return stop(self.proc)


class DaemonProcess:
    """``python -m ihld run --config FILE [--once]``, stderr to a file."""

    def __init__(self, config: Path, *, once: bool, log: Path, cprofile: bool = False) -> None:
        args = [*IHLD, "run", "--config", str(config), *(["--once"] if once else [])]
        if cprofile:  # the profile is written when the daemon exits (SIGTERM is graceful)
            args[2:2] = ["cProfile", "-o", str(log.with_name("daemon.prof")), "-m"]
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL
            )

    def running(self) -> bool:
        return self.proc.returncode is None

    def wait(self, timeout_s: float) -> float | None:
        """Wait for a ``--once`` daemon to exit by itself; its CPU seconds.

        BenchError on timeout (the daemon is stopped) or a non-zero exit.
        """
        try:
            cpu = reap(self.proc, timeout_s)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            raise BenchError(f"daemon did not finish within {timeout_s:g} s") from None
        if self.proc.returncode != 0:
            raise BenchError(f"daemon exited {self.proc.returncode}: {self.tail()}")
        return cpu

    def exited(self) -> bool:
        """True once the daemon has exited (reaps it, so ``wait`` is not needed after)."""
        if self.proc.returncode is not None:
            return True
        pid, status, _usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == self.proc.pid:
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            return True
        return False

    def stop(self) -> float | None:
        """SIGTERM (graceful stop), then wait; its CPU seconds."""
        return stop(self.proc, timeout_s=30.0)

    def tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``predicate()`` until true; BenchError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
