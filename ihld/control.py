"""The control endpoint: a small HTTP API on a unix socket in the spool's run dir.

Only the daemon's user and group can connect (mode 0660), so the socket is
never world-writable and there is no network listener by default.
``GET /status`` returns the live snapshot; ``POST /poke`` asks for an inbox
scan now (``ihld submit`` uses it so a drop is claimed at once).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web


def build_app(snapshot: Callable[[], dict[str, Any]], poke: Callable[[], None]) -> web.Application:
    async def status(_request: web.Request) -> web.Response:
        return web.json_response(snapshot())

    async def do_poke(_request: web.Request) -> web.Response:
        poke()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/poke", do_poke)
    return app


async def start_control(
    path: Path, snapshot: Callable[[], dict[str, Any]], poke: Callable[[], None]
) -> web.AppRunner:
    """Serve the control API on ``path`` (replacing a stale socket)."""
    path.unlink(missing_ok=True)  # noqa: ASYNC240 - once, at start-up
    runner = web.AppRunner(build_app(snapshot, poke), access_log=None, handle_signals=False)
    await runner.setup()
    old = os.umask(0o117)  # the socket is created 0660: owner and group only
    try:
        site = web.UnixSite(runner, str(path))
        await site.start()
    finally:
        os.umask(old)
    return runner
