"""Backend health and residency: which servers are up, and what each really holds.

A request that fails the server's way (refused, reset, 503) only makes the
backend *suspect*: one health probe (``/api/version``, llama.cpp's
``/health``) decides. While the probe fails the backend is down: nothing is
sent and the scheduler forgets what it held; the probe keeps asking, with
backoff, and the backend comes back when it answers. A 500 or a broken
stream never marks a backend down (docs/backends.md, "Errors").

Residency: every ``reconcile_s`` each up server's own list (Ollama's
``/api/ps``, the router's ``/models``) is read back into the scheduler, so a
model the server dropped on its own is no longer counted resident and one
someone else loaded is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import structlog

from ihld.backends.base import Backend, BackendError
from ihld.backends.settings import BackendConfig
from ihld.common.backoff import Backoff
from ihld.core.scheduler import Scheduler

log = structlog.get_logger("ihld")


class BackendHealth:
    """Owns ``down`` (backend -> why) and the probe and reconcile tasks."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        scheduler: Scheduler,
        configs: Mapping[str, BackendConfig],
        *,
        on_change: Callable[[], None],
    ) -> None:
        self.backends = backends
        self.scheduler = scheduler
        self.configs = configs
        self.on_change = on_change
        self.down: dict[str, str] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._reconciler: asyncio.Task[None] | None = None
        self._running = False

    def start(self, interval_s: Callable[[], float]) -> None:
        """Reconcile every ``interval_s()`` seconds (read each time: reload may change it)."""
        self._running = True
        self._reconciler = asyncio.create_task(self._reconcile_loop(interval_s))

    def stop(self) -> None:
        self._running = False
        for task in [*self._probes.values(), self._reconciler]:
            if task is not None:
                task.cancel()

    # -- health -----------------------------------------------------------------

    def suspect(self, name: str, reason: str) -> None:
        """A request failed the server's way: probe its health once; down only if that fails."""
        if name in self.down or name in self._probes or not self._running:
            return
        self._probes[name] = asyncio.create_task(self._probe(name, reason))

    async def _probe(self, name: str, reason: str) -> None:
        backend = self.backends[name]
        backoff = Backoff(0.25, 5.0)
        try:
            while True:
                try:
                    await backend.version()
                except BackendError as exc:
                    if name not in self.down:
                        self.down[name] = reason
                        self.scheduler.backend_down(name)
                        log.warning("backend_down", backend=name, error=reason, probe=str(exc))
                    await asyncio.sleep(backoff.next())
                    continue
                break
        finally:
            self._probes.pop(name, None)
        if self.down.pop(name, None) is not None:
            self.scheduler.backend_up(name)
            log.info("backend_up", backend=name)
            await self.reconcile()
        self.on_change()

    # -- residency ----------------------------------------------------------------

    async def _reconcile_loop(self, interval_s: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(interval_s())
            await self.reconcile()

    async def reconcile(self) -> None:
        """Align the scheduler's residency with each up backend's own list, once."""
        for name, backend in self.backends.items():
            if name in self.down:
                continue
            asked_at = time.monotonic()
            try:
                async with asyncio.timeout(self.configs[name].connect_timeout_s + 5):
                    listed = await backend.ps()
            except (BackendError, TimeoutError):
                continue  # the probe, not this, decides whether the backend is down
            if listed is None:
                continue  # the server does not say (OpenAI-style servers)
            names = [str(m.get("name") or m.get("model") or "") for m in listed]
            dropped = self.scheduler.reconcile(name, [n for n in names if n], asked_at)
            for model in dropped:
                log.warning("model_dropped_by_server", backend=name, model=model)
            if dropped:
                self.on_change()
