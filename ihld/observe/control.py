"""The control endpoint: a small HTTP API on a unix socket in the spool's run dir.

Only the daemon's user and group can connect (mode 0660), so the socket is
never world-writable and there is no network listener by default.

* ``GET /status`` — the live snapshot (``ihld.observe.status``), with Ollama's own
  ``/api/ps`` view per backend from a background poller (never waited on).
* ``GET /metrics`` — Prometheus text format (``ihld.observe.metrics``).
* ``POST /poke`` — scan the inbox now (``ihld submit`` uses it so a drop is
  claimed at once).

``[control] listen = "127.0.0.1:9464"`` adds a TCP listener for Prometheus.
It serves only the two read-only ``GET`` routes: anyone who can reach the
port can read them, but nobody can make the daemon do anything through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from ihld.common.errors import SpoolError
from ihld.observe.metrics import CONTENT_TYPE_LATEST, Metrics
from ihld.observe.ps_cache import PsCache

log = structlog.get_logger("ihld")

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included


def build_app(
    snapshot: Callable[[], dict[str, Any]],
    poke: Callable[[], None] | None,
    *,
    metrics: Metrics | None = None,
    ps: PsCache | None = None,
) -> web.Application:
    """The API; without ``poke`` (the TCP listener) only the read-only routes exist."""

    async def status(_request: web.Request) -> web.Response:
        snap = snapshot()
        if ps is not None:
            ps.annotate(snap)
        return web.json_response(snap)

    async def do_poke(_request: web.Request) -> web.Response:
        assert poke is not None
        poke()
        return web.json_response({"ok": True})

    async def scrape(_request: web.Request) -> web.Response:
        assert metrics is not None
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/status", status)
    if metrics is not None:
        app.router.add_get("/metrics", scrape)
    if poke is not None:
        app.router.add_post("/poke", do_poke)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class ControlServer:
    """The running endpoint(s): the unix socket, the optional TCP listener, the ps poller."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.tcp_addresses: list[tuple[str, int]] = []
        self._ps_task: asyncio.Task[None] | None = None

    async def cleanup(self) -> None:
        if self._ps_task is not None:
            self._ps_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ps_task
        for runner in reversed(self.runners):
            await runner.cleanup()


async def start_control(
    path: Path | None,
    snapshot: Callable[[], dict[str, Any]],
    poke: Callable[[], None],
    *,
    metrics: Metrics | None = None,
    ps: PsCache | None = None,
    listen: str | None = None,
) -> ControlServer:
    """Serve the control API on ``path`` (replacing a stale socket) and on ``listen``."""
    server = ControlServer()
    try:
        if path is not None:
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:  # else bind() dies with a traceback
                raise SpoolError(
                    f"control socket path {path} is {len(os.fsencode(path))} bytes, over the "
                    f"{MAX_SOCKET_PATH} a unix socket allows; use a shorter [spool] dir "
                    "(or [control] socket = false)"
                )
            path.unlink(missing_ok=True)  # noqa: ASYNC240 - once, at start-up
            app = build_app(snapshot, poke, metrics=metrics, ps=ps)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            server.runners.append(runner)
            old = os.umask(0o117)  # the socket is created 0660: owner and group only
            try:
                await web.UnixSite(runner, str(path)).start()
            finally:
                os.umask(old)
        if listen:
            host, port = parse_listen(listen)
            app = build_app(snapshot, None, metrics=metrics, ps=ps)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            server.runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            server.tcp_addresses = [
                (str(a[0]), int(a[1])) for a in runner.addresses if isinstance(a, tuple)
            ]
            log.info(
                "control_listening",
                address=[
                    f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in server.tcp_addresses
                ],
            )
        if ps is not None:
            server._ps_task = asyncio.create_task(ps.run(), name="ollama-ps")
    except BaseException:
        await server.cleanup()
        raise
    return server
