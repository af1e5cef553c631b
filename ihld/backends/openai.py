"""The OpenAI-compatible client: vLLM, llama.cpp's llama-server, llama-swap, LM Studio.

One ``OpenAIBackend`` per ``kind = "openai"`` server, over the daemon's one
session, on the transport ``ollama.OllamaBackend`` uses too
(``http.HttpBackend``: same retries, backoff and error classes). What it
relies on:

* ``POST /v1/chat/completions`` with ``stream: true`` answers Server-Sent
  Events: ``data: {chat.completion.chunk}`` lines (text in
  ``choices[0].delta.content``, ``finish_reason`` on the last choice chunk),
  then ``data: [DONE]``. ``stream_options.include_usage`` adds a last chunk
  with ``usage`` and empty ``choices``. llama-server also adds a ``timings``
  object (milliseconds). A stream that ends without ``[DONE]`` is cut.
* Errors before output have a real status and an OpenAI error body
  ``{"error": {"message", "type", "param", "code"}}``; llama-swap sends
  ``{"error": "text"}``, older vLLM ``{"object": "error", "message", ...}``.
  After output started, an error is an event: ``data: {"error": {...}}``
  (OpenAI, vLLM) or llama-server's non-standard ``error: {...}`` line.
* ``GET /v1/models`` lists the served models: ``{"object": "list", "data":
  [{"id", "object": "model", "created", "owned_by"}]}``.

None of these servers lets a client load or unload a model, so ``load`` only
checks that the model is listed and ``unload`` does nothing; ``keep_alive``
is not sent. docs/backends.md has the option mapping and the figures kept.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from ihld.backends.base import (
    BackendError,
    BadRequest,
    ChatRequest,
    ChatResult,
    KeepAlive,
    LoadResult,
    ModelNotFound,
    StreamBroken,
)
from ihld.backends.http import (
    DEFAULT_MAX_LINE_BYTES,
    HttpBackend,
    ProtocolError,
    Streamed,
    error_body,
    error_for_status,
    read_capped,
)
from ihld.backends.openai_wire import (
    OPTION_MAP,
    _as_int,
    _Error,
    openai_metrics,
    request_body,
)
from ihld.backends.settings import BackendConfig
from ihld.common.errors import ConfigError

__all__ = [
    "OPTION_MAP",
    "OpenAIBackend",
    "openai_metrics",
    "request_body",
]

log = structlog.get_logger("ihld.backends.openai")

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


@dataclass
class _Stream:
    """What one attempt has read so far."""

    parts: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)  # ``reasoning_content`` (vLLM, llama.cpp)
    finish_reason: str | None = None
    usage: Any = None
    timings: Any = None
    first_data_s: float | None = None
    event: str = ""  # the SSE ``event:`` field in force for the next data line

    @property
    def chars(self) -> int:
        return sum(len(p) for p in self.parts)


class OpenAIBackend(HttpBackend):
    """One OpenAI-compatible server, as the ``base.Backend`` protocol describes.

    Stateless apart from config and the API key read at construction; safe to
    share between concurrent tasks. ``stream=False`` asks for whole
    ``chat.completion`` objects instead of SSE (for servers whose streaming is
    broken); a server that answers JSON to a streamed request is read either way.
    """

    # Where chats go; a subclass may add a query (llama.cpp's ``?autoload=false``).
    chat_path = CHAT_PATH

    def __init__(
        self,
        config: BackendConfig,
        session: aiohttp.ClientSession,
        *,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 5.0,
        probe_timeout_s: float = 5.0,
        load_timeout_s: float = 600.0,
        stream: bool = True,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Raise ConfigError if ``config.api_key_env`` names an unset variable.

        ``load_timeout_s``: silence allowed for a non-streamed reply, which
        arrives only once the whole answer is generated (``read_timeout_s`` is
        meant for gaps between streamed chunks; the larger is used there).
        ``environ`` replaces ``os.environ`` (tests).
        """
        url = config.url.rstrip("/")
        super().__init__(
            config,
            session,
            url=url[: -len("/v1")] if url.endswith("/v1") else url,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            probe_timeout_s=probe_timeout_s,
            long_read_s=load_timeout_s,
            max_line_bytes=max_line_bytes,
            rng=rng,
        )
        self._stream = stream
        self._allowed = None if config.models is None else frozenset(config.models)
        self._dropped_warned: set[str] = set()
        self._auth: dict[str, str] = {}
        if config.api_key_env is not None:
            key = (os.environ if environ is None else environ).get(config.api_key_env, "")
            if not key.strip():
                raise ConfigError(
                    f"backend {self.name!r}: api_key_env = {config.api_key_env!r}, but that "
                    "environment variable is not set (or empty) in the daemon's environment"
                )
            self._auth = {"Authorization": f"Bearer {key.strip()}"}

    # ------------------------------------------------------------------ chat

    async def chat(
        self,
        request: ChatRequest,
        *,
        keep_alive: KeepAlive | None,
        task_tag: str = "",
        first_byte_s: float | None = None,
        path: str | None = None,
    ) -> ChatResult:
        """Run one chat (SSE unless ``stream=False``) and return the text with the server's figures.

        ``path``: where to send it (default ``chat_path``).

        ``keep_alive`` is accepted and not sent: these servers keep a model as
        long as they are configured to. ``done_reason`` is the server's
        ``finish_reason`` (``"stop"``, ``"length"``, or what else it sent; ``""``
        if none). Raises like ``OllamaBackend.chat``: ``ModelNotFound`` /
        ``BadRequest`` at once, ``BackendUnavailable`` / ``StreamBroken`` after
        ``config.retries`` quick retries.
        """
        self._check_allowed(request.model)
        try:
            body = request_body(request, stream=self._stream, dropped=self._note_dropped)
        except ValueError as exc:
            raise BadRequest(f"{self._who()}: {exc}") from None
        return await self._chat(request.model, body, task_tag, first_byte_s, path)

    def _note_dropped(self, name: str) -> None:
        if name not in self._dropped_warned:
            self._dropped_warned.add(name)
            log.warning(
                "backend_option_dropped",
                backend=self.name,
                option=name,
                reason="no OpenAI-compatible equivalent (docs/backends.md)",
            )

    async def _chat_once(
        self,
        payload: bytes,
        headers: Mapping[str, str],
        first_byte_s: float | None = None,
        path: str | None = None,
    ) -> Streamed:
        """One try: POST, then read SSE events until ``[DONE]`` (or one JSON object)."""
        reader = self._reader(first_byte_s)
        state = _Stream()
        async with self._response(
            "POST",
            path or self.chat_path,
            client_timeout=self._stream_timeout if self._stream else self._long_timeout,
            payload=payload,
            headers={**self._auth, **headers},
            reader=reader,
        ) as resp:
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                raw = await reader.whole(resp.content, self._max_line_bytes + 1)
                return self._whole(raw, reader.first_byte_s or 0.0)
            async for line in reader.lines(resp.content):
                if self._take_line(line, state, reader.t0):
                    return self._finished(state)
        reason = f", finish_reason {state.finish_reason!r}" if state.finish_reason else ""
        raise StreamBroken(
            f"{self._who()}: stream ended without data: [DONE] after {state.chars} "
            f"characters{reason}"
        )

    def _take_line(self, line: bytes, state: _Stream, t0: float) -> bool:
        """Fold one SSE line into ``state``; True at ``data: [DONE]``.

        Every server sends one ``data:`` line per event, so a line is handled
        as an event (blank separators are dropped by the splitter).
        """
        if line.startswith(b":"):
            return False  # a comment: keep-alive pings
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            state.event = value.decode("utf-8", "replace").strip()
            return False
        if name == b"error":  # llama-server: "error: {...}" instead of a data event
            raise self._event_error(self._json_or_text(value), state)
        if name != b"data":
            return False  # id:, retry:, or a field no server here sends
        event, state.event = state.event, ""
        if state.first_data_s is None:
            state.first_data_s = time.monotonic() - t0
        if value.strip() == b"[DONE]":
            return True
        obj = self._json_or_text(value)
        if event == "error":
            raise self._event_error(obj, state)
        if not isinstance(obj, dict):
            raise StreamBroken(
                f"{self._who()}: stream had a data line that is not a JSON object: {value[:200]!r}"
            )
        if _Error.parse(obj, "") is not None:
            raise self._event_error(obj, state)
        self._take_object(obj, state, "delta")
        return False

    def _take_object(self, obj: Mapping[str, Any], state: _Stream, key: str) -> None:
        """Text, finish_reason, usage, timings of a chunk (``key`` "delta") or reply ("message")."""
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                    continue
                part = choice.get(key)
                if isinstance(part, Mapping) and isinstance(part.get("content"), str):
                    state.parts.append(part["content"])
                if isinstance(part, Mapping) and isinstance(part.get("reasoning_content"), str):
                    state.thinking.append(part["reasoning_content"])
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    state.finish_reason = reason
        if isinstance(obj.get("usage"), Mapping):
            state.usage = obj["usage"]
        if isinstance(obj.get("timings"), Mapping):
            state.timings = obj["timings"]

    def _whole(self, raw: bytes, first_byte_s: float) -> Streamed:
        """A non-streamed ``chat.completion`` object."""
        if not raw.strip():
            raise StreamBroken(f"{self._who()}: empty response to {self.chat_path}")
        if len(raw) > self._max_line_bytes:
            raise ProtocolError(f"{self._who()}: reply exceeds {self._max_line_bytes} bytes")
        obj = self._json_or_text(raw)
        if _Error.parse(obj, "") is not None:
            raise self._event_error(obj, _Stream(), "status 200 with")
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            raise ProtocolError(
                f"{self._who()}: {CHAT_PATH} did not answer a chat.completion: {raw[:200]!r}"
            )
        state = _Stream(first_data_s=first_byte_s)
        self._take_object(obj, state, "message")
        return self._finished(state)

    def _finished(self, state: _Stream) -> Streamed:
        return Streamed(
            content="".join(state.parts),
            done_reason=state.finish_reason or "",
            metrics=openai_metrics(state.usage, state.timings),
            first_byte_s=state.first_data_s or 0.0,
            thinking="".join(state.thinking),
        )

    @staticmethod
    def _json_or_text(value: bytes) -> Any:
        try:
            return json.loads(value)
        except ValueError:
            return value.decode("utf-8", "replace").strip()

    def _event_error(
        self, obj: Any, state: _Stream, what: str = "stream ended with"
    ) -> BackendError:
        """An error sent with status 200 (in the stream, or as the whole reply).

        A stream error counts an attempt, unless the server gave it a
        client-error code (llama-server's context-size 400, a vLLM 400): asking
        again gets the same answer, so that is a BadRequest / ModelNotFound.
        """
        text = str(obj)[:500] or "unknown error"
        err = _Error.parse(obj, text, bare=True) or _Error(text)
        after = f" after {state.chars} characters" if state.parts else ""
        message = f"{self._who()}: {what} an error{after}: {err.describe()}"
        code = _as_int(err.code)
        if err.model_missing:
            return ModelNotFound(message)
        if code is not None and 400 <= code < 500 and code not in (408, 429):
            return ModelNotFound(message) if code == 404 else BadRequest(message)
        return StreamBroken(message)

    # ---------------------------------------------------------- load / unload

    async def load(
        self,
        model: str,
        *,
        keep_alive: KeepAlive | None,
        options: Mapping[str, Any] | None = None,
    ) -> LoadResult:
        """Check that ``model`` is listed by ``/v1/models``; the server has no load call.

        Returns at once with ``load_duration_ns`` 0 and the probe's wall time.
        Servers that swap models (llama-swap, LM Studio with JIT loading) load it
        on the first chat instead, so that chat's time includes the load.
        Raises ``ModelNotFound`` if the server does not list it.
        """
        self._check_allowed(model)
        started = time.monotonic()
        models, _ = await self._retrying("load", model, lambda: self._models_once(self._timeout))
        served = [m.get("id") for m in models]
        if model not in served:
            listed = ", ".join(str(s) for s in served[:20]) or "nothing"
            raise ModelNotFound(
                f"{self._who()}: model {model!r} is not served here ({MODELS_PATH} lists {listed})"
            )
        return LoadResult(model=model, load_duration_ns=0, wall_s=time.monotonic() - started)

    async def unload(self, model: str) -> None:
        """Nothing to do: an OpenAI-compatible server has no unload call."""

    # ------------------------------------------------------------- read-only

    async def ps(self) -> list[dict[str, Any]] | None:
        """None: these servers do not report what is resident."""
        return None

    async def version(self) -> str:
        """The health probe: one ``GET /v1/models`` with a short timeout, no retries.

        OpenAI's API has no version call; the answer is ``"openai"`` plus the
        first model's ``owned_by`` (``vllm``, ``llamacpp``, ...) when it has one.
        """
        models = await self._models_once(self._probe_timeout)
        owner = models[0].get("owned_by") if models else None
        return f"openai ({owner})" if isinstance(owner, str) and owner else "openai"

    async def _models_once(self, client_timeout: aiohttp.ClientTimeout) -> list[dict[str, Any]]:
        async with self._response(
            "GET", MODELS_PATH, client_timeout=client_timeout, headers=self._auth
        ) as resp:
            raw = await read_capped(resp.content, self._max_line_bytes)
        obj = self._json_or_text(raw)
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
            raise ProtocolError(
                f"{self._who()}: {MODELS_PATH} did not answer a model list: {raw[:200]!r}"
            )
        return data

    # --------------------------------------------------------------- plumbing

    def _check_allowed(self, model: str) -> None:
        """The allow-list, by exact id (OpenAI model ids have no Ollama-style ``:latest``)."""
        if self._allowed is not None and model not in self._allowed:
            raise self._not_allowed(model, self._allowed)

    async def _status_error(self, resp: aiohttp.ClientResponse, path: str) -> BackendError:
        """Map a non-200 answer to the error class the daemon acts on.

        As ``http.error_for_status``, and: a 404 without an OpenAI error body
        hints at a wrong url, 401/403 at the API key, and another 4xx whose body
        says the model is missing is a ``ModelNotFound``.
        """
        raw, text = await error_body(resp)
        return self._error_for(resp, raw, text, path)

    def _error_for(
        self, resp: aiohttp.ClientResponse, raw: bytes, text: str, path: str
    ) -> BackendError:
        """The error class for a non-200 answer whose body is ``raw`` (``text`` stripped)."""
        status = resp.status
        err = _Error.parse(self._json_or_text(raw), text[:500] or (resp.reason or ""))
        detail = err.describe() if err is not None else (text[:500] or (resp.reason or ""))
        message = f"{self._who()}: HTTP {status} from {path}: {detail}"
        if status == 404 and err is None:
            message += " (no OpenAI error body: is the url an OpenAI-compatible server?)"
        if status in (401, 403):
            return BadRequest(f"{message} (check the backend's api_key_env)")
        missing = err is not None and err.model_missing
        if missing and 400 <= status < 500 and status not in (408, 429):
            return ModelNotFound(message)
        return error_for_status(resp, message)
