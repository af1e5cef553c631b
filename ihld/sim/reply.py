"""Writing one simulated answer, whole or streamed, and the faults that cut or silence it."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ihld.sim.api import (
    CompletionCall,
    message_chunk,
)
from ihld.sim.stats import RequestRecord


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 kept as is (as Go's encoding/json writes it)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=dumps(obj), content_type="application/json", charset="utf-8"
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


def _drop(request: web.Request, resp: web.StreamResponse | None) -> web.StreamResponse:
    """Close the connection abruptly; aiohttp then ignores the dead response quietly."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return resp if resp is not None else web.Response()


async def _send_whole(
    request: web.Request, rec: RequestRecord, obj: dict[str, Any], done_reason: str
) -> web.StreamResponse:
    """Write one JSON object and note it as completed only once it is out."""
    resp = json_response(obj)
    rec.status = 200
    await resp.prepare(request)
    await resp.write_eof()
    rec.done_reason = done_reason
    rec.completed = True
    return resp


class _Reply:
    """The response under construction: NDJSON lines, or one object at the end.

    The OpenAI endpoints subclass it (SSE events, ``chat.completion`` objects)
    and reuse how a stream starts (``_write``) and ends (``_end``), and how a
    whole reply is cut (``_cut_whole``).
    """

    def __init__(self, request: web.Request, call: CompletionCall, rec: RequestRecord) -> None:
        self.request = request
        self.call = call
        self.rec = rec
        self.parts: list[str] = []
        self.thinking: list[str] = []
        self.resp: web.StreamResponse | None = None
        self.cached_tokens = 0  # prompt tokens the slot's cache held (not evaluated)

    def _stream_response(self) -> web.StreamResponse:
        """A streamed response, not yet prepared: NDJSON."""
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/x-ndjson"
        return resp

    async def _write(self, data: bytes) -> None:
        """Write to the stream, sending its status (200) and headers first if not yet sent."""
        if self.resp is None:
            resp = self._stream_response()
            self.rec.status = 200
            await resp.prepare(self.request)
            self.resp = resp
        await self.resp.write(data)

    async def _end(self, done_reason: str | None = None) -> web.StreamResponse:
        """End the stream; with a ``done_reason``, note the call as completed."""
        assert self.resp is not None
        await self.resp.write_eof()
        if done_reason is not None:
            self.rec.done_reason = done_reason
            self.rec.completed = True
        return self.resp

    async def _cut_whole(self, obj: dict[str, Any]) -> web.StreamResponse:
        """Announce ``obj`` as a whole JSON reply, send half of it, and drop the connection."""
        body = dumps(obj).encode()
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.charset = "utf-8"
        resp.content_length = len(body)
        self.rec.status = 200
        await resp.prepare(self.request)
        await resp.write(body[: len(body) // 2])
        return _drop(self.request, resp)

    async def _line(self, obj: dict[str, Any]) -> None:
        await self._write((dumps(obj) + "\n").encode())

    async def thought(self, text: str) -> None:
        """A thinking model's reasoning, streamed in ``message.thinking`` before the content."""
        self.thinking.append(text)
        if self.call.stream and self.call.endpoint == "chat":
            chunk = message_chunk(self.call, "")
            chunk["message"]["thinking"] = text
            await self._line(chunk)

    async def chunk(self, text: str) -> None:
        self.parts.append(text)
        if self.call.stream:
            await self._line(message_chunk(self.call, text))

    async def finish(self, final: dict[str, Any], done_reason: str) -> web.StreamResponse:
        if self.call.stream:
            await self._line(final)
            return await self._end(done_reason)
        return await _send_whole(self.request, self.rec, final, done_reason)

    async def fail(self, message: str) -> web.StreamResponse:
        """An error after output began: a final error line (200), else a real status."""
        if self.call.stream and self.resp is not None:
            await self._line({"error": message})
            return await self._end()
        self.rec.status = 500
        return error_response(500, message)

    async def end_silently(self) -> web.StreamResponse:
        """End the stream cleanly with neither a done object nor an error (llm/server.go)."""
        if self.resp is None:
            await self._write(b"")
        return await self._end()

    async def cut(self, final: dict[str, Any]) -> web.StreamResponse:
        """Drop the connection mid-body."""
        if not self.call.stream:
            return await self._cut_whole(final)
        return _drop(self.request, self.resp)
