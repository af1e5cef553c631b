"""An Ollama that fails on purpose, per model: the peer of the fault matrix and property tests.

A real aiohttp server on 127.0.0.1. Each model name picks a fault, so one
daemon run can meet every fault at once; the wire shapes and texts are
Ollama's (server/routes.go, llm/server.go; docs/backends.md has the table):

==================  ===========================================================
model               what the server does
==================  ===========================================================
``ok``              answers (loads, chats)
``missing-load``    404 ``model 'x' not found`` at load and at chat
``missing-chat``    loads, then 404 at chat
``badopt``          400 ``invalid option`` at chat
``noload``          500 ``model requires more system memory`` at load and chat
``invalidfmt``      500 ``invalid format: …`` at chat (after its load)
``midstream``       200, some output, then an ``{"error": …}`` line
``silent``          200, some output, then the stream ends: no done, no error
``reset``           the first ``transient`` chats: connection reset; then answers
``busy``            the first ``transient`` chats: 503 server busy; then answers
``hang``            accepts the chat and never answers
==================  ===========================================================

``schedule``: instead of by model, the n-th chat gets ``schedule[n]`` (then
``ok``), for property tests over random fault sequences. ``completed`` counts
each task (the ``X-Ihld-Task`` header's job/stage) the peer answered fully.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

FAULTS = (
    "ok",
    "missing-load",
    "missing-chat",
    "badopt",
    "noload",
    "invalidfmt",
    "midstream",
    "silent",
    "reset",
    "busy",
    "hang",
)
BUSY = "server busy, please try again.  maximum pending requests exceeded"
METRICS = {
    "total_duration": 20_000_000,
    "load_duration": 1_000_000,
    "prompt_eval_count": 12,
    "prompt_eval_duration": 5_000_000,
    "eval_count": 5,
    "eval_duration": 10_000_000,
}


@dataclass
class FaultPeer:
    transient: int = 2  # how many chats ``reset`` / ``busy`` fail before answering
    schedule: list[str] = field(default_factory=list)
    url: str = ""
    chats: int = 0
    seen: Counter[str] = field(default_factory=Counter)  # chats per fault
    completed: Counter[str] = field(default_factory=Counter)  # job/stage answered in full
    loads: Counter[str] = field(default_factory=Counter)
    resident: set[str] = field(default_factory=set)  # what /api/ps lists

    def fault_of(self, model: str, *, load: bool) -> str:
        if self.schedule and not load:
            index = self.chats - 1
            return self.schedule[index] if index < len(self.schedule) else "ok"
        fault = model.split(":", 1)[0]
        return fault if fault in FAULTS else "ok"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", ""))
        if not model:
            return _error(400, "model is required")
        if not body.get("messages"):
            return await self._load(model, body)
        self.chats += 1
        fault = self.fault_of(model, load=False)
        self.seen[fault] += 1
        if fault in ("missing-load", "missing-chat"):
            return _error(404, f"model '{model}' not found")
        if fault == "badopt":
            return _error(400, "invalid option provided: num_bogus")
        if fault == "noload":
            return _error(500, "model requires more system memory (9.1 GiB) than is available")
        if fault == "invalidfmt":
            return _error(500, "invalid format: expected \"json\" or a JSON schema")
        if fault in ("reset", "busy") and self.seen[fault] <= self.transient:
            if fault == "busy":
                return _error(503, BUSY)
            assert request.transport is not None
            request.transport.abort()  # a reset before any output
            return web.Response()
        if fault == "hang":
            await asyncio.sleep(3600)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(_line({"model": model, "message": {"role": "assistant",
                                                                "content": "partial "}}))
        if fault == "midstream":
            await response.write(_line({"error": "an error was encountered while running "
                                                 "the model: unexpected EOF"}))
            return response
        if fault == "silent":
            return response  # the token-repeat abort: neither done nor error
        done = {"model": model, "message": {"role": "assistant", "content": "answer"},
                "done": True, "done_reason": "stop", **METRICS}
        await response.write(_line(done))
        self.completed[request.headers.get("X-Ihld-Task", "").rsplit("/", 1)[0]] += 1
        return response

    async def _load(self, model: str, body: dict[str, Any]) -> web.Response:
        fault = self.fault_of(model, load=True)
        if fault == "missing-load":
            return _error(404, f"model '{model}' not found")
        if fault == "noload":
            return _error(500, "model requires more system memory (9.1 GiB) than is available")
        reason = "unload" if body.get("keep_alive") == 0 else "load"
        if reason == "load":
            self.loads[model] += 1
            self.resident.add(model)
        else:
            self.resident.discard(model)
        return web.json_response({"model": model, "done": True, "done_reason": reason})


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@asynccontextmanager
async def start_fault_peer(**options: Any) -> AsyncIterator[FaultPeer]:
    peer = FaultPeer(**options)
    app = web.Application()
    app.router.add_post("/api/chat", peer.chat)
    async def version(_request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def ps(_request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": m} for m in sorted(peer.resident)]})

    app.router.add_get("/api/version", version)
    app.router.add_get("/api/ps", ps)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    peer.url = str(server.make_url("")).rstrip("/")
    try:
        yield peer
    finally:
        await server.close()

