"""Loading and unloading models where the scheduler asks, and what a failed load means.

A failed load backs off. A transient failure (the server, not the model) is
not counted and makes the health probe look at the backend; any other counts,
and ``max_attempts`` failures in a row, or one that says the model cannot be
served there, make the model unusable on that backend: the scheduler sends
its stages elsewhere or, where no backend can serve it, drops them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import structlog

from ihld.backends.base import Backend, BackendError
from ihld.backends.settings import BackendConfig
from ihld.common.backoff import backoff_delay
from ihld.core.figures import ModelFigures
from ihld.core.health import BackendHealth
from ihld.core.parallelism import ParallelWatch
from ihld.core.scheduler import Scheduler
from ihld.core.tasks import Load, Unload

log = structlog.get_logger("ihld")

# Failed loads back off from this, doubling, up to the cap.
LOAD_BACKOFF = (0.5, 30.0)


class ModelActions:
    def __init__(
        self,
        *,
        backends: Mapping[str, Backend],
        configs: Mapping[str, BackendConfig],
        scheduler: Scheduler,
        figures: Mapping[str, ModelFigures],
        parallel: ParallelWatch,
        health: BackendHealth,
        max_attempts: Callable[[], int],
        kick: Callable[[], None],
    ) -> None:
        self.backends = backends
        self.configs = configs
        self.scheduler = scheduler
        self.figures = figures
        self.parallel = parallel
        self.health = health
        self.max_attempts = max_attempts
        self.kick = kick

    async def load(self, action: Load) -> None:
        backend = self.backends[action.backend]
        cfg = self.configs[action.backend]
        structlog.contextvars.bind_contextvars(model=action.model, backend=action.backend)
        log.info("model_loading")
        try:
            result = await backend.load(
                action.model, keep_alive=cfg.keep_alive, options=action.options
            )
        except BackendError as exc:
            self._load_failed(action, exc)
            return
        self.scheduler.loaded(
            action.backend, action.model_key, time.monotonic(), parallel=result.parallel
        )
        self.parallel.forget(action.backend, action.model_key)
        self.figures[action.model_key].learn_load(result.wall_s)
        log.info(
            "model_loaded",
            load_s=round(result.wall_s, 6),
            load_duration=result.load_duration_ns,
            parallel=result.parallel,
        )

    def _load_failed(self, action: Load, exc: BackendError) -> None:
        """A failed load backs off; one that cannot succeed fails the model's stages.

        Transient: the server, not the model (no count). Otherwise each failure
        counts, and ``max_attempts`` of them in a row mean the model cannot load.
        """
        transient = exc.effect == "transient"
        now = time.monotonic()
        failures = self.scheduler.backends[action.backend].load_failures.get(action.model_key, 0)
        base, cap = LOAD_BACKOFF
        delay = backoff_delay(failures + 1, base_s=base, cap_s=cap)
        count = self.scheduler.load_failed(action.backend, action.model_key, retry_at=now + delay)
        log.error("model_load_failed", kind=exc.kind, error=str(exc), failures=count)
        if transient:
            self.health.suspect(action.backend, str(exc))
        elif exc.effect == "model" or count >= self.max_attempts():
            self.unusable(action.backend, action.model_key, exc.kind, str(exc))
        self.kick()

    async def unload(self, action: Unload) -> None:
        structlog.contextvars.bind_contextvars(model=action.model, backend=action.backend)
        try:
            await self.backends[action.backend].unload(action.model)
        except BackendError as exc:
            log.warning("model_unload_failed", error=str(exc))
        self.scheduler.unloaded(action.backend, action.model_key, time.monotonic())
        log.info("model_unloaded")

    def unusable(self, backend: str, model_key: str, kind: str, message: str) -> None:
        """This backend cannot serve the model. The scheduler sends its stages elsewhere,
        or, where no backend can, drops every one of them (each job fails with ``message``)."""
        log.error("model_unusable", backend=backend, model_key=model_key, kind=kind, error=message)
        self.scheduler.model_missing(backend, model_key, kind, message)
        self.kick()
