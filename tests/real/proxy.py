"""A tiny recording HTTP proxy: ihld -> this -> llama.cpp's router, for the real-server suite.

The router does not log ihld's ``X-Ihld-Task: job/stage/attempt`` header, so a test that must
prove "no finished stage was sent again" puts this in front of it. Every request is appended
to a JSON-lines file when it arrives (``{"n", "method", "path", "task", "model"}``) and again
when it ends (``{"n", "status", "content_type", "completed"}``; completed: the whole
upstream answer was relayed). Bodies and streams (SSE) pass through unchanged.

    python -m tests.real.proxy --upstream http://127.0.0.1:PORT --log FILE [--port N]

prints ``listening on http://127.0.0.1:N`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
       "content-encoding", "upgrade", "proxy-connection", "te", "trailer"}
TASK_HEADER = "X-Ihld-Task"


class Recorder:
    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)
        self.counter = itertools.count(1)

    def write(self, entry: dict[str, Any]) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()


def make_app(upstream: str, recorder: Recorder) -> web.Application:
    session: aiohttp.ClientSession | None = None

    async def on_startup(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )

    async def on_cleanup(app: web.Application) -> None:
        if session is not None:
            await session.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        n = next(recorder.counter)
        model = None
        if body:
            with contextlib.suppress(ValueError, AttributeError):
                model = json.loads(body).get("model")
        recorder.write({"n": n, "method": request.method, "path": request.path_qs,
                        "task": request.headers.get(TASK_HEADER), "model": model})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        status = 0
        content_type = ""
        completed = False
        try:
            async with session.request(request.method, upstream + request.path_qs,
                                       data=body or None, headers=headers) as resp:
                status = resp.status
                content_type = resp.headers.get("Content-Type", "")
                out = web.StreamResponse(status=resp.status, reason=resp.reason)
                for key, value in resp.headers.items():
                    if key.lower() not in HOP:
                        out.headers[key] = value
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                # Every byte of the answer reached the client. It may hang up before the
                # chunked terminator (ihld stops at `data: [DONE]`): that is still complete.
                completed = True
                with contextlib.suppress(ConnectionError):
                    await out.write_eof()
                return out
        except aiohttp.ClientError as exc:
            # The upstream is down or cut the answer: the client sees its connection drop
            # (after headers) or a 502 (before), as it would from the router itself.
            recorder.write({"n": n, "error": repr(exc)})
            if status:
                raise ConnectionResetError("upstream cut the answer") from exc
            return web.json_response({"error": {"message": f"proxy: {exc}", "code": 502}},
                                     status=502)
        finally:
            recorder.write({"n": n, "status": status, "content_type": content_type,
                            "completed": completed})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(upstream: str, log: Path, port: int) -> None:
    app = make_app(upstream.rstrip("/"), Recorder(log))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.upstream, args.log, args.port))


if __name__ == "__main__":
    main()
