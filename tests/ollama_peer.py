"""A scripted fake Ollama: a real aiohttp server on 127.0.0.1 that records and misbehaves on cue.

Not the simulator (``ihld.sim``): this peer has no scheduling model at all. A
test enqueues exactly what the next requests get — a streamed reply, a status
code, a dropped connection, a stall — and then reads ``history`` to see what
the client sent. With nothing enqueued it answers as a healthy Ollama would.

Use it through the ``ollama_peer`` fixture (import ``ollama_peer_fixture`` into
the test module) or ``async with start_ollama_peer() as peer``::

    peer.enqueue(error_status(503, BUSY), reply("hi"))
    result = await backend.chat(...)
    assert len(peer.history) == 2

Wire shapes follow Ollama's ``server/routes.go``: NDJSON lines ending in ``\\n``,
a final ``done`` object with ``done_reason`` and nanosecond metrics, errors as
``{"error": "..."}`` (a status code before output, a 200 line after).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = [
    "BUSY",
    "DEFAULT_CONTENT",
    "DEFAULT_METRICS",
    "Behaviour",
    "OllamaPeer",
    "Recorded",
    "drop_before",
    "drop_mid_body",
    "error_mid_stream",
    "error_status",
    "json_reply",
    "load_reply",
    "no_done",
    "ollama_peer_fixture",
    "raw_status",
    "reply",
    "split_reply",
    "stall",
    "stall_mid_stream",
    "start_ollama_peer",
    "unload_reply",
]

# Ollama's ErrMaxQueue text, two spaces and all.
BUSY = "server busy, please try again.  maximum pending requests exceeded"
DEFAULT_CONTENT = "Hello from the peer."
DEFAULT_METRICS: dict[str, int] = {
    "total_duration": 2_500_000_000,
    "load_duration": 1_000_000_000,
    "prompt_eval_count": 12,
    "prompt_eval_duration": 100_000_000,
    "eval_count": 5,
    "eval_duration": 1_250_000_000,
}
CREATED_AT = "2024-01-01T00:00:00.000000Z"

Handler = Callable[[web.Request, "OllamaPeer", "Recorded"], Awaitable[web.StreamResponse]]


@dataclass
class Recorded:
    """One request as the peer saw it."""

    method: str
    path: str
    json: Any  # the decoded body, or None
    headers: dict[str, str]


@dataclass
class Behaviour:
    """What the peer does with one request. Build with the functions below."""

    name: str
    run: Handler


@dataclass
class OllamaPeer:
    """The fake server's state: what it was asked, and what it will do next."""

    url: str = ""
    history: list[Recorded] = field(default_factory=list)
    version: str = "0.12.0"
    ps_models: list[dict[str, Any]] = field(default_factory=list)
    tags_models: list[dict[str, Any]] = field(default_factory=list)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    _queues: dict[str, deque[Behaviour]] = field(default_factory=dict)

    def enqueue(self, *behaviours: Behaviour, path: str = "/api/chat") -> None:
        """The next requests to ``path`` get these behaviours, in order; then the default."""
        self._queues.setdefault(path, deque()).extend(behaviours)

    def requests(self, path: str = "/api/chat") -> list[Recorded]:
        """Recorded requests to one path."""
        return [r for r in self.history if r.path == path]

    @property
    def pending(self) -> int:
        """Behaviours enqueued and not used yet (a test that leaves some is suspect)."""
        return sum(len(q) for q in self._queues.values())

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake when the peer shuts down so teardown never waits on a stall."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = Recorded(request.method, request.path, body, dict(request.headers))
        self.history.append(rec)
        queue = self._queues.get(request.path)
        behaviour = queue.popleft() if queue else _default(request.path)
        return await behaviour.run(request, self, rec)


# ----------------------------------------------------------------- helpers


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _chunk(model: str, content: str) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": CREATED_AT,
        "message": {"role": "assistant", "content": content},
        "done": False,
    }


def _done(model: str, done_reason: str, metrics: dict[str, int]) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": CREATED_AT,
        "message": {"role": "assistant", "content": ""},
        "done_reason": done_reason,
        "done": True,
        **metrics,
    }


def _model(rec: Recorded) -> str:
    return str(rec.json.get("model", "")) if isinstance(rec.json, dict) else ""


def _pieces(content: str, n: int) -> list[str]:
    """Split ``content`` into ``n`` nearly equal non-empty pieces (fewer if it is short)."""
    n = max(1, min(n, len(content))) if content else 1
    size, extra = divmod(len(content), n)
    out, i = [], 0
    for k in range(n):
        j = i + size + (1 if k < extra else 0)
        out.append(content[i:j])
        i = j
    return out


async def _ndjson(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    return resp


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _wants_stream(rec: Recorded) -> bool:
    return not (isinstance(rec.json, dict) and rec.json.get("stream") is False)


# -------------------------------------------------------------- behaviours


def reply(
    content: str = DEFAULT_CONTENT,
    *,
    chunks: int = 3,
    done_reason: str = "stop",
    metrics: dict[str, int] | None = None,
    first_delay_s: float = 0.0,
    delay_s: float = 0.0,
) -> Behaviour:
    """A normal answer: ``chunks`` content lines, then the done object (one if not streamed)."""
    figures = DEFAULT_METRICS if metrics is None else metrics

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        model = _model(rec)
        await peer.sleep(first_delay_s)
        if not _wants_stream(rec):
            final = _done(model, done_reason, figures)
            final["message"]["content"] = content
            return web.json_response(final)
        resp = await _ndjson(request)
        for i, piece in enumerate(_pieces(content, chunks)):
            if i and delay_s:
                await peer.sleep(delay_s)
            await resp.write(_line(_chunk(model, piece)))
        await resp.write(_line(_done(model, done_reason, figures)))
        await resp.write_eof()
        return resp

    return Behaviour(f"reply({done_reason})", run)


def split_reply(content: str = DEFAULT_CONTENT, *, piece_bytes: int = 7) -> Behaviour:
    """The same bytes as ``reply``, written ``piece_bytes`` at a time: lines split across writes."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        model = _model(rec)
        data = b"".join(_line(_chunk(model, p)) for p in _pieces(content, 4))
        data += _line(_done(model, "stop", DEFAULT_METRICS))
        resp = await _ndjson(request)
        for i in range(0, len(data), piece_bytes):
            await resp.write(data[i : i + piece_bytes])
            await asyncio.sleep(0.001)  # let each piece leave as its own segment
        await resp.write_eof()
        return resp

    return Behaviour("split_reply", run)


def no_done(content: str = "partial output") -> Behaviour:
    """Content lines, then a clean end of stream with no done object."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        resp = await _ndjson(request)
        await resp.write(_line(_chunk(_model(rec), content)))
        await resp.write_eof()
        return resp

    return Behaviour("no_done", run)


def error_mid_stream(message: str, *, before: str = "partial ") -> Behaviour:
    """Output starts (status 200), then Ollama's ``{"error": ...}`` line ends the stream."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        resp = await _ndjson(request)
        await resp.write(_line(_chunk(_model(rec), before)))
        await resp.write(_line({"error": message}))
        await resp.write_eof()
        return resp

    return Behaviour("error_mid_stream", run)


def error_status(status: int, message: str) -> Behaviour:
    """An error before output, as Ollama sends it: ``status`` with ``{"error": message}``."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        return web.json_response({"error": message}, status=status)

    return Behaviour(f"error_status({status})", run)


def raw_status(status: int, text: str, *, content_type: str = "text/plain") -> Behaviour:
    """A non-Ollama error body (a proxy's HTML 502, say)."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        return web.Response(status=status, text=text, content_type=content_type)

    return Behaviour(f"raw_status({status})", run)


def json_reply(obj: Any, *, status: int = 200) -> Behaviour:
    """Any JSON body (for shapes Ollama would not send)."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        return web.json_response(obj, status=status)

    return Behaviour("json_reply", run)


def drop_before() -> Behaviour:
    """Close the connection before any response byte (a crash, a reset)."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        _abort(request)
        return web.Response()

    return Behaviour("drop_before", run)


def drop_mid_body(before: str = "partial ") -> Behaviour:
    """Send the headers and one content line, then cut the connection."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        resp = await _ndjson(request)
        await resp.write(_line(_chunk(_model(rec), before)))
        await asyncio.sleep(0.01)  # let the line reach the client before the cut
        _abort(request)
        return resp

    return Behaviour("drop_mid_body", run)


def stall(seconds: float) -> Behaviour:
    """Say nothing at all for ``seconds`` (then a normal reply, if the client is still there)."""
    after = reply()

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        await peer.sleep(seconds)
        return await after.run(request, peer, rec)

    return Behaviour(f"stall({seconds})", run)


def stall_mid_stream(seconds: float, *, before: str = "partial ") -> Behaviour:
    """One content line, then silence for ``seconds``, then the done object."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        model = _model(rec)
        resp = await _ndjson(request)
        await resp.write(_line(_chunk(model, before)))
        await peer.sleep(seconds)
        await resp.write(_line(_done(model, "stop", DEFAULT_METRICS)))
        await resp.write_eof()
        return resp

    return Behaviour(f"stall_mid_stream({seconds})", run)


def load_reply(*, load_duration_ns: int | None = None, done_reason: str = "load") -> Behaviour:
    """Ollama's answer to ``messages: []``: one object, no metrics unless asked for."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        obj = _done(_model(rec), done_reason, {})
        if load_duration_ns is not None:
            obj["load_duration"] = load_duration_ns
        return web.json_response(obj)

    return Behaviour(f"load_reply({done_reason})", run)


def unload_reply() -> Behaviour:
    """Ollama's answer to ``messages: [], keep_alive: 0``."""
    return load_reply(done_reason="unload")


def _is_zero_keep_alive(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    return isinstance(value, str) and value.lstrip("+-") in ("0", "0s", "0m", "0h", "0ms")


def _default(path: str) -> Behaviour:
    """A healthy Ollama: load/unload/chat on /api/chat, simple JSON elsewhere."""
    if path == "/api/chat":

        async def chat(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
            body = rec.json if isinstance(rec.json, dict) else {}
            if not body.get("messages"):
                if _is_zero_keep_alive(body.get("keep_alive")):
                    return await unload_reply().run(request, peer, rec)
                return await load_reply().run(request, peer, rec)
            return await reply().run(request, peer, rec)

        return Behaviour("default_chat", chat)

    async def other(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        if path == "/api/ps":
            return web.json_response({"models": peer.ps_models})
        if path == "/api/tags":
            return web.json_response({"models": peer.tags_models})
        if path == "/api/version":
            return web.json_response({"version": peer.version})
        if path == "/":
            return web.Response(text="Ollama is running")
        return web.Response(status=404, text="404 page not found")

    return Behaviour("default", other)


# ----------------------------------------------------------------- fixture


@asynccontextmanager
async def start_ollama_peer() -> AsyncIterator[OllamaPeer]:
    """Run a peer on 127.0.0.1, a free port; stop it (stalls included) on exit."""
    peer = OllamaPeer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", peer._dispatch)
    # handler_cancellation: a client that gives up (read timeout) cancels the
    # handler, as a disconnect aborts a request in Ollama.
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True, shutdown_timeout=1.0)
    await server.start_server()
    peer.url = str(server.make_url("")).rstrip("/")
    try:
        yield peer
    finally:
        peer.closing.set()
        await server.close()


@pytest.fixture(name="ollama_peer")
async def ollama_peer_fixture() -> AsyncIterator[OllamaPeer]:
    """The ``ollama_peer`` fixture: a fresh scripted Ollama per test, stopped at teardown.

    Named apart from the fixture so a test module can import it
    (``from ollama_peer import ollama_peer_fixture``) without its parameters
    shadowing the import.
    """
    async with start_ollama_peer() as peer:
        yield peer
