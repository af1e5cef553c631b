"""Building, starting and running the simulator as an aiohttp server.

``build_app`` gives an application tests can mount anywhere; ``start_sim``
serves it on a real socket (port 0 picks a free one) and hands back a
``SimHandle``; ``run_sim`` is the blocking entry point behind the CLI. The
runner cancels a request's handler when its client disconnects, because
Ollama ties a load to the request that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from ihld.sim import handlers, openai_api
from ihld.sim.engine import Engine
from ihld.sim.faults import FaultPicker, Faults
from ihld.sim.handlers import STATE, SimState
from ihld.sim.profiles import Profile, get_profile
from ihld.sim.stats import SimStats

# How long a stopping server waits for open streams before cutting them.
SHUTDOWN_GRACE_S = 1.0
MAX_BODY_BYTES = 64 * 1024 * 1024


def build_app(
    profile: Profile,
    *,
    speed: float = 1.0,
    faults: Faults | None = None,
    seed: int = 0,
    slots: int | None = None,
    max_loaded: int | None = None,
    vram_bytes: int | None = None,
    max_queue: int | None = None,
    default_keep_alive: float | None = None,
) -> web.Application:
    """The simulator as an aiohttp application (serve it with handler cancellation on).

    ``speed`` divides every simulated duration (loads, prompt evaluation,
    tokens, keep_alive); the reported ``*_duration`` metrics are the real
    elapsed nanoseconds. The other keywords override the profile's settings.
    """
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    profile = profile.with_overrides(
        slots=slots,
        max_loaded=max_loaded,
        vram_bytes=vram_bytes,
        max_queue=max_queue,
        default_keep_alive=default_keep_alive,
    )
    stats = SimStats(speed)
    state = SimState(
        profile=profile,
        engine=Engine(profile, speed, stats),
        stats=stats,
        faults=FaultPicker(faults if faults is not None else Faults(), seed),
        speed=speed,
        modified_at=time.time(),
    )
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = state

    async def on_startup(app: web.Application) -> None:
        app[STATE].engine.start()

    async def on_shutdown(app: web.Application) -> None:
        app[STATE].engine.closing.set()

    async def on_cleanup(app: web.Application) -> None:
        await app[STATE].engine.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/", handlers.root)
    app.router.add_get("/api/version", handlers.version)
    app.router.add_get("/api/tags", handlers.tags)
    app.router.add_get("/api/ps", handlers.ps)
    app.router.add_post("/api/show", handlers.show)
    app.router.add_post("/api/chat", handlers.chat)
    app.router.add_post("/api/generate", handlers.generate)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.models)
    app.router.add_get("/sim/stats", handlers.sim_stats)
    app.router.add_get("/sim/requests", handlers.sim_requests)
    app.router.add_post("/sim/reset", handlers.sim_reset)
    app.router.add_get("/sim/faults", handlers.sim_faults_get)
    app.router.add_post("/sim/faults", handlers.sim_faults_set)
    return app


@dataclass
class SimHandle:
    """A running simulator: where it listens, its app, and how to stop it."""

    url: str
    port: int
    app: web.Application
    runner: web.AppRunner

    closed: bool = False

    async def close(self) -> None:
        """Stop listening, cut open streams after a short grace, stop timers."""
        if not self.closed:
            self.closed = True
            await self.runner.cleanup()

    async def __aenter__(self) -> SimHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_sim(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    profile: Profile | str = "laptop-6gb",
    speed: float = 1.0,
    faults: Faults | None = None,
    seed: int = 0,
    slots: int | None = None,
    max_loaded: int | None = None,
    vram_bytes: int | None = None,
    max_queue: int | None = None,
    default_keep_alive: float | None = None,
) -> SimHandle:
    """Serve a simulator on ``host:port`` (0: any free port) until ``close()``."""
    app = build_app(
        get_profile(profile) if isinstance(profile, str) else profile,
        speed=speed,
        faults=faults,
        seed=seed,
        slots=slots,
        max_loaded=max_loaded,
        vram_bytes=vram_bytes,
        max_queue=max_queue,
        default_keep_alive=default_keep_alive,
    )
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return SimHandle(url=f"http://{url_host}:{bound}", port=bound, app=app, runner=runner)


def run_sim(
    host: str,
    port: int,
    profile: str,
    speed: float,
    faults: Faults,
    seed: int,
    slots: int | None,
    max_loaded: int | None,
    *,
    vram_bytes: int | None = None,
    max_queue: int | None = None,
    default_keep_alive: float | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; print one "listening" line once the port is bound."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        handle = await start_sim(
            host,
            port,
            profile=profile,
            speed=speed,
            faults=faults,
            seed=seed,
            slots=slots,
            max_loaded=max_loaded,
            vram_bytes=vram_bytes,
            max_queue=max_queue,
            default_keep_alive=default_keep_alive,
        )
        try:
            print(
                f"ihld-sim listening on {handle.url} profile={profile} speed={speed:g}",
                flush=True,
            )
            await stop.wait()
        finally:
            await handle.close()

    asyncio.run(main())
    sys.stdout.flush()
