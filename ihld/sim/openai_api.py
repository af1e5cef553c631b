"""OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

What vLLM, llama-server, llama-swap and LM Studio serve, on the same
simulated server as the Ollama endpoints: one engine, one cost model, one
set of slots, one request log, one fault picker. A request is translated
into the Ollama handler's ``CompletionCall`` (``max_tokens`` ->
``num_predict``, ``response_format`` -> ``format``) and served by
``handlers._serve`` with an SSE reply instead of NDJSON; a model that is not
resident is loaded implicitly, as llama-swap does. Shapes follow OpenAI's
chat completion and chunk objects; errors are ``{"error": {"message",
"type", "param", "code"}}``.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ihld.sim.api import BadRequest, CompletionCall
from ihld.sim.handlers import STATE, TASK_HEADER, _serve, read_call
from ihld.sim.reply import _drop, _Reply, _send_whole, dumps, json_response
from ihld.sim.stats import RequestRecord

OWNED_BY = "ihld-sim"
SYSTEM_FINGERPRINT = "fp_ihld_sim"
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error"}
_ids = itertools.count(1)


def openai_error(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> web.Response:
    """An OpenAI error body with ``status``."""
    kind = ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json_response(body, status)


def _fail(rec: RequestRecord, status: int, message: str) -> web.Response:
    rec.status = status
    return openai_error(status, message)


# --- requests ----------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _text(content: Any, where: str) -> str:
    """A message's content: a string, null, or a list of ``{"type": "text"}`` parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise BadRequest(f"{where}.content[{i}]: the simulator takes text parts only")
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.content[{i}].text must be a string")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where}.content must be a string or an array, not {_json_type(content)}")


def _messages(raw: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise BadRequest(f"{where} must be an object, not {_json_type(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"{where}.role is required")
        out.append({"role": role, "content": _text(message.get("content"), where)})
    return tuple(out)


def _format(raw: Any) -> str | Mapping[str, Any] | None:
    """``response_format`` as Ollama's ``format``: json_object -> "json", json_schema -> schema."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise BadRequest("response_format.json_schema.name is required")
        schema = spec.get("schema")
        if schema is None:
            return "json"
        if not isinstance(schema, Mapping):
            raise BadRequest("response_format.json_schema.schema must be an object")
        return schema
    raise BadRequest("response_format.type must be one of 'text', 'json_object', 'json_schema'")


def _int(body: Mapping[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer, not {_json_type(value)}")
    if minimum is not None and value < minimum:
        raise BadRequest(f"'{key}' must be >= {minimum}, got {value}")
    return value


def parse_request(body: Any) -> tuple[CompletionCall, bool]:
    """Validate a chat completion request: the call, and whether the stream ends with usage."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"the request body must be a JSON object, not {_json_type(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter")
    messages = _messages(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, not {_json_type(stream)}")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is true")
        if not isinstance(stream_options, Mapping):
            raise BadRequest("'stream_options' must be an object")
        include_usage = stream_options.get("include_usage") is True
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise BadRequest("the simulator answers n = 1 only")
    options: dict[str, Any] = {}
    limit = _int(body, "max_completion_tokens", 1)
    if limit is None:
        limit = _int(body, "max_tokens", 1)
    if limit is not None:
        options["num_predict"] = limit
    seed = _int(body, "seed")
    if seed is not None:
        options["seed"] = seed
    call = CompletionCall(
        endpoint="chat",
        model=model,
        messages=messages,
        stream=stream,
        format=_format(body.get("response_format")),
        options=options,
    )
    return call, include_usage


# --- replies -----------------------------------------------------------------------


class _OpenAIReply(_Reply):
    """An SSE stream of ``chat.completion.chunk`` events, or one ``chat.completion``."""

    def __init__(
        self,
        request: web.Request,
        call: CompletionCall,
        rec: RequestRecord,
        *,
        include_usage: bool,
    ) -> None:
        super().__init__(request, call, rec)
        self.include_usage = include_usage
        self.created = int(time.time())
        self.id = f"chatcmpl-sim{next(_ids)}"

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.call.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = self._object("chat.completion.chunk", [choice])
        if self.include_usage:
            obj["usage"] = None  # as OpenAI: null on every chunk but the last
        return obj

    def _stream_response(self) -> web.StreamResponse:
        """A streamed response, not yet prepared: Server-Sent Events."""
        resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        return resp

    async def _event(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else dumps(data)
        await self._write(f"data: {text}\n\n".encode())

    def _usage(self, final: Mapping[str, Any]) -> dict[str, int]:
        prompt = int(final.get("prompt_eval_count", 0)) + self.cached_tokens
        completion = int(final.get("eval_count", 0))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _timings(self, final: Mapping[str, Any]) -> dict[str, float]:
        """llama-server's ``timings``: what the slot evaluated (``prompt_n``) and reused
        from its cache (``cache_n``)."""
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": int(final.get("prompt_eval_count", 0)),
            "prompt_ms": int(final.get("prompt_eval_duration", 0)) / 1e6,
            "predicted_n": int(final.get("eval_count", 0)),
            "predicted_ms": int(final.get("eval_duration", 0)) / 1e6,
        }

    def _completion(self, final: Mapping[str, Any], done_reason: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.parts)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done_reason}
        obj = self._object("chat.completion", [choice])
        obj["usage"] = self._usage(final)
        obj["timings"] = self._timings(final)
        return obj

    async def thought(self, text: str) -> None:
        """A thinking model's reasoning: ``reasoning_content`` (llama-server, vLLM)."""
        if self.call.stream:
            await self._event(self._chunk({"reasoning_content": text}, None))

    async def chunk(self, text: str) -> None:
        first = not self.parts
        self.parts.append(text)
        if self.call.stream:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            await self._event(self._chunk(delta, None))

    async def finish(self, final: dict[str, Any], done_reason: str) -> web.StreamResponse:
        if not self.call.stream:
            obj = self._completion(final, done_reason)
            return await _send_whole(self.request, self.rec, obj, done_reason)
        closing = self._chunk({}, done_reason)
        closing["timings"] = self._timings(final)  # llama-server sends them in the last chunk
        await self._event(closing)
        if self.include_usage:
            last = self._object("chat.completion.chunk", [])
            last["usage"] = self._usage(final)
            await self._event(last)
        await self._event("[DONE]")
        return await self._end(done_reason)

    async def fail(self, message: str) -> web.StreamResponse:
        """After output began: an error event, then ``[DONE]`` (as vLLM and llama-server)."""
        if self.call.stream and self.resp is not None:
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            await self._event({"error": error})
            await self._event("[DONE]")
            return await self._end()
        return _fail(self.rec, 500, message)

    async def cut(self, final: dict[str, Any]) -> web.StreamResponse:
        if self.call.stream:
            return _drop(self.request, self.resp)
        return await self._cut_whole(self._completion(final, str(final.get("done_reason", ""))))


# --- handlers ----------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: validate (400), find the model (404), then serve."""
    started = time.monotonic()
    parsed = await read_call(
        request,
        parse_request,
        empty="the request body is empty",
        invalid="the request body is not valid JSON",
        kind=lambda body: "chat",
        fail=_fail,
    )
    if isinstance(parsed, web.Response):
        return parsed
    call, include_usage = parsed
    state = request.app[STATE]
    rec = state.stats.record_request(call.model, request.headers.get(TASK_HEADER), "chat")
    if state.profile.spec(call.model) is None:
        rec.status = 404
        return openai_error(
            404,
            f"The model `{call.model}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    make_reply = functools.partial(_OpenAIReply, include_usage=include_usage)
    return await _serve(request, state, call, rec, started, fail=_fail, make_reply=make_reply)


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: every model of the profile (any of them can be loaded on demand)."""
    state = request.app[STATE]
    created = int(state.modified_at)
    data = [
        {"id": spec.name, "object": "model", "created": created, "owned_by": OWNED_BY}
        for spec in state.profile.models
    ]
    return json_response({"object": "list", "data": data})
