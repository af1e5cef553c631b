"""What each server says is resident (``/api/ps``, ``/models``), polled in the background.

``/status`` shows it beside the scheduler's own idea of residency; polling
never makes ``/status`` wait on a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

from ihld.backends.base import Backend, BackendError


@dataclass
class PsEntry:
    at: float  # monotonic time of the last attempt
    models: list[dict[str, Any]] | None  # the last good answer (kept across errors)
    ok_at: float | None  # monotonic time of the last good answer
    error: str | None = None


_PS_KEYS = ("name", "size", "size_vram", "expires_at")


class PsCache:
    """What each backend says is resident (``/api/ps``), polled in the background.

    ``/status`` shows the scheduler's idea of what is resident *and* the
    server's: they differ when something else uses the server, when Ollama
    evicted a model on its own, or while a keep_alive runs out. Polling runs
    in its own task with a short timeout and skips backends marked down, so a
    slow or dead server never delays ``/status``; each answer carries its age.

    It polls every ``interval_s`` while the daemon has work (``active()``) or
    someone asked for the status in the last ``linger_s``, and not at all
    otherwise: Ollama logs every request, and an idle daemon should not fill
    its journal. A status request after a quiet spell shows the last answer
    (with its age) and wakes the poller.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        down: Callable[[], Container[str]] = frozenset,
        active: Callable[[], bool] = lambda: True,
        *,
        interval_s: float = 3.0,
        timeout_s: float = 2.0,
        linger_s: float = 60.0,
    ) -> None:
        self.backends = backends
        self.down = down
        self.active = active
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.linger_s = linger_s
        self.entries: dict[str, PsEntry] = {}
        self._wanted_at = time.monotonic()  # a first answer at start-up
        self._last_poll = float("-inf")
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            if self.active() or time.monotonic() - self._wanted_at < self.linger_s:
                self._last_poll = time.monotonic()
                await self.refresh()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()

    async def refresh(self) -> None:
        down = self.down()
        await asyncio.gather(
            *(self._refresh_one(name, b, name in down) for name, b in self.backends.items())
        )

    async def _refresh_one(self, name: str, backend: Backend, is_down: bool) -> None:
        old = self.entries.get(name)
        models, ok_at = (old.models, old.ok_at) if old else (None, None)
        if is_down:
            self.entries[name] = PsEntry(time.monotonic(), models, ok_at, "backend down")
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await backend.ps()
        except (BackendError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.entries[name] = PsEntry(time.monotonic(), models, ok_at, error)
            return
        if answer is None:  # the server does not say what it holds
            self.entries[name] = PsEntry(time.monotonic(), None, None, "not reported")
            return
        trimmed = [{k: m[k] for k in _PS_KEYS if k in m} for m in answer if isinstance(m, dict)]
        now = time.monotonic()
        self.entries[name] = PsEntry(now, trimmed, now)

    def _disagrees(self, snap: dict[str, Any]) -> bool:
        """True when the last answer differs from what the scheduler holds loaded."""
        for name, backend in snap.get("backends", {}).items():
            entry = self.entries.get(name)
            if entry is None or entry.models is None:
                continue
            held = {m for m, state in backend.get("resident", {}).items() if state == "loaded"}
            seen = {str(m.get("name")) for m in entry.models}
            if held and not held <= seen:
                return True
        return False

    def annotate(self, snap: dict[str, Any]) -> dict[str, Any]:
        """Add ``ollama_ps`` to each backend of a snapshot (None until a first answer)."""
        now = time.monotonic()
        self._wanted_at = now
        since = now - self._last_poll
        if since > self.interval_s or (since > 1.0 and self._disagrees(snap)):
            self._wake.set()  # after a quiet spell, or a model switch: ask again now
        for name, backend in snap.get("backends", {}).items():
            entry = self.entries.get(name)
            if entry is None:
                backend["ollama_ps"] = None
                continue
            backend["ollama_ps"] = {
                "models": entry.models,
                "age_s": None if entry.ok_at is None else round(now - entry.ok_at, 1),
                "error": entry.error,
            }
        return snap
