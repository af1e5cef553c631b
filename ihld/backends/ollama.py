"""The Ollama client: one ``OllamaBackend`` per configured server, over the daemon's one session.

What it relies on, from Ollama's ``server/routes.go`` and ``api/types.go``:

* ``POST /api/chat`` streams NDJSON (one object a line, ``stream`` defaults to
  true); the last object has ``"done": true``, ``done_reason`` and the metrics
  in nanoseconds. Metrics are ``omitempty`` in Go, so an absent one means 0.
* An error *before* output has a real status: 400 (bad request, bad
  ``keep_alive``), 404 (``model "x" not found, try pulling it first``), 499,
  500, 503 (``server busy, please try again.  maximum pending requests
  exceeded``). An error *after* output started keeps status 200 and ends the
  stream with a line ``{"error": "..."}``.
* ``{"model": m, "messages": []}`` loads ``m`` and answers ``done_reason:
  "load"``; with ``"keep_alive": 0`` it answers ``done_reason: "unload"`` at
  once. Neither answer carries metrics (Ollama does not fill them there).

Errors are mapped onto ``base.BackendError`` so the daemon can tell an outage
(retryable: delay the work) from a bad request (not retryable: fail the stage).
The transport (timeouts, quick retries, statuses and connection failures as
those errors) is ``http.HttpBackend``, shared with the OpenAI client; this
module says what Ollama's requests and answers are.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from ihld.backends.base import (
    OLLAMA_METRICS,
    BackendError,
    BadRequest,
    ChatRequest,
    ChatResult,
    KeepAlive,
    LoadResult,
    StreamBroken,
)
from ihld.backends.http import (
    DEFAULT_MAX_LINE_BYTES,
    TASK_HEADER,
    HttpBackend,
    ModelNotAllowed,
    NdjsonLines,
    ProtocolError,
    Streamed,
    backoff_delay,
    error_body,
    error_for_status,
    make_session,
)
from ihld.backends.keepalive import format_keep_alive, parse_keep_alive
from ihld.backends.settings import BackendConfig

# TASK_HEADER … make_session live in http.py (both clients use them) and stay
# importable from here, where they were first defined.
__all__ = [
    "TASK_HEADER",
    "ModelNotAllowed",
    "NdjsonLines",
    "OllamaBackend",
    "ProtocolError",
    "backoff_delay",
    "make_session",
]


def _metrics(final: Mapping[str, Any]) -> dict[str, int]:
    """Ollama's six figures from the done object; absent means 0 (Go ``omitempty``)."""
    out: dict[str, int] = {}
    for key in OLLAMA_METRICS:
        value = final.get(key, 0)
        out[key] = (
            int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
        )
    # Ollama counts the prompt tokens it evaluated, not those reused from the slot's cache.
    out["prompt_evaluated"] = out.get("prompt_eval_count", 0)
    return out


def _normalise_model(name: str) -> str:
    """Ollama's name identity for the allow-list: case-insensitive, ``:latest`` by default.

    A ``:`` before the last ``/`` is a registry port, not a tag.
    """
    name = name.strip().lower()
    tail = name.rsplit("/", 1)[-1]
    return name if ":" in tail else name + ":latest"


class OllamaBackend(HttpBackend):
    """One Ollama server, as the ``base.Backend`` protocol describes.

    Stateless apart from config: the scheduler owns what is loaded where, this
    class only talks HTTP (``http.HttpBackend``). Safe to share between
    concurrent tasks.
    """

    def __init__(
        self,
        config: BackendConfig,
        session: aiohttp.ClientSession,
        *,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 5.0,
        probe_timeout_s: float = 5.0,
        load_timeout_s: float = 600.0,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        """``load_timeout_s``: silence allowed before a deliberate load answers.

        Ollama sends nothing until the model is resident, and that includes
        waiting in its pending queue and for evictions (minutes on a busy
        server), so ``read_timeout_s`` (meant for gaps between tokens) is too
        short for ``load``. The larger of the two is used there.
        """
        super().__init__(
            config,
            session,
            url=config.url.rstrip("/"),
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            probe_timeout_s=probe_timeout_s,
            long_read_s=load_timeout_s,
            max_line_bytes=max_line_bytes,
            rng=rng,
        )
        self._allowed = (
            None if config.models is None else {_normalise_model(m) for m in config.models}
        )

    # ------------------------------------------------------------------ chat

    async def chat(
        self,
        request: ChatRequest,
        *,
        keep_alive: KeepAlive | None,
        task_tag: str = "",
        first_byte_s: float | None = None,
    ) -> ChatResult:
        """Run one streamed chat and return the whole text with Ollama's figures.

        ``done_reason`` is returned exactly as Ollama sent it. ``"length"`` means
        the output was cut at ``num_predict`` or the context size: the text is
        incomplete, and it is the caller's job to mark or fail it — this method
        never treats it as a normal finish. (``""`` means the server sent none.)

        Raises ``ModelNotFound`` (404, or not in the allow-list) and ``BadRequest``
        (other 4xx, invalid keep_alive, unserialisable request) without retrying;
        ``BackendUnavailable`` (no output yet) and ``StreamBroken`` (output had
        started) after ``config.retries`` quick retries. ``ChatResult.attempts``
        counts the tries used.
        """
        self._check_allowed(request.model)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "stream": True,
        }
        if request.options:
            body["options"] = request.options
        if request.format is not None:
            body["format"] = request.format
        if request.think is not None:  # absent: a thinking model thinks (routes.go)
            body["think"] = request.think
        if keep_alive is not None:
            body["keep_alive"] = self._wire_keep_alive(keep_alive)
        return await self._chat(request.model, body, task_tag, first_byte_s)

    async def _chat_once(
        self,
        payload: bytes,
        headers: Mapping[str, str],
        first_byte_s: float | None = None,
        path: str | None = None,
    ) -> Streamed:
        """One try: POST, then read NDJSON until the done object.

        ``first_byte_s`` is measured from the start of this try, so a retry's
        backoff does not inflate the time-to-first-token figure.
        """
        reader = self._reader(first_byte_s)
        parts: list[str] = []
        thinking: list[str] = []
        async with self._response(
            "POST",
            path or "/api/chat",
            client_timeout=self._stream_timeout,
            payload=payload,
            headers=headers,
            reader=reader,
        ) as resp:
            async for line in reader.lines(resp.content):
                final = self._take_chunk(line, parts, thinking)
                if final is not None:
                    done = self._finished(final, parts, reader.first_byte_s or 0.0)
                    done.thinking = "".join(thinking)
                    return done
        # Ollama's token-repeat abort (llm/server.go) ends a stream like this: neither a
        # done object nor an error. It counts an attempt; the server is not down.
        raise StreamBroken(
            f"{self._who()}: stream ended without a done object after "
            f"{sum(len(p) for p in parts)} characters"
        )

    def _take_chunk(
        self, line: bytes, parts: list[str], thinking: list[str]
    ) -> dict[str, Any] | None:
        """Fold one streamed object into ``parts`` (and ``thinking``); return the done object."""
        try:
            obj = json.loads(line)
        except ValueError:
            raise StreamBroken(
                f"{self._who()}: stream had a line that is not JSON: {line[:200]!r}"
            ) from None
        if not isinstance(obj, dict):
            raise StreamBroken(f"{self._who()}: stream had a non-object line: {line[:200]!r}")
        if "error" in obj:
            raise StreamBroken(f"{self._who()}: stream ended with an error: {obj['error']}")
        message = obj.get("message")
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            thought = message.get("thinking")
            if isinstance(thought, str):
                thinking.append(thought)
        return obj if obj.get("done") is True else None

    def _finished(self, final: dict[str, Any], parts: list[str], first_byte_s: float) -> Streamed:
        reason = final.get("done_reason")
        return Streamed(
            content="".join(parts),
            done_reason=reason if isinstance(reason, str) else "",
            metrics=_metrics(final),
            first_byte_s=first_byte_s,
        )

    # ---------------------------------------------------------- load / unload

    async def load(
        self,
        model: str,
        *,
        keep_alive: KeepAlive | None,
        options: Mapping[str, Any] | None = None,
    ) -> LoadResult:
        """Load ``model`` (``messages: []``) with runner ``options``; pin it for ``keep_alive``.

        The options go with the load because Ollama compares them with the next
        chat's (server/sched.go ``needsReload``): a load without them would be
        followed by a reload at the first chat that sets ``num_ctx`` and friends.

        ``load_duration_ns`` is Ollama's figure when the reply has one; Ollama's
        load reply carries no metrics, so it is usually 0 and ``wall_s`` (which
        includes Ollama's queueing and evictions, as its own load_duration
        would) is the measure to learn from.
        """
        self._check_allowed(model)
        body: dict[str, Any] = {"model": model, "messages": [], "stream": False}
        if options:
            body["options"] = dict(options)
        if keep_alive is not None:
            wire = self._wire_keep_alive(keep_alive)
            if parse_keep_alive(wire) == 0:
                # Ollama reads "no messages + keep_alive 0" as an unload request.
                raise BadRequest(
                    f"{self._who()}: load of {model!r} with keep_alive 0 would unload it"
                )
            body["keep_alive"] = wire
        started = time.monotonic()
        reply, _ = await self._retrying(
            "load", model, lambda: self._post_once("/api/chat", body, self._long_timeout)
        )
        self._expect_done(reply, "load", model)
        ns = reply.get("load_duration", 0)
        return LoadResult(
            model=model,
            load_duration_ns=ns if isinstance(ns, int) and not isinstance(ns, bool) else 0,
            wall_s=time.monotonic() - started,
        )

    async def unload(self, model: str) -> None:
        """Ask Ollama to unload ``model`` once its in-flight requests end (``keep_alive: 0``).

        Not limited by the allow-list: freeing memory held by a model someone
        else loaded is exactly what a scheduler may need to do.
        """
        body = {"model": model, "messages": [], "keep_alive": 0, "stream": False}
        reply, _ = await self._retrying(
            "unload", model, lambda: self._post_once("/api/chat", body, self._timeout)
        )
        self._expect_done(reply, "unload", model)

    def _expect_done(self, reply: Mapping[str, Any], reason: str, model: str) -> None:
        if reply.get("done") is not True or reply.get("done_reason") != reason:
            raise ProtocolError(
                f"{self._who()}: expected done_reason {reason!r} for {model!r}, got "
                f"done={reply.get('done')!r} done_reason={reply.get('done_reason')!r}"
            )

    # ------------------------------------------------------------- read-only

    async def ps(self) -> list[dict[str, Any]]:
        """Models resident now: ``/api/ps``'s ``models`` (name, size, size_vram, expires_at…)."""
        reply, _ = await self._retrying(
            "ps", None, lambda: self._get_once("/api/ps", self._timeout)
        )
        return self._models(reply, "/api/ps")

    async def tags(self) -> list[dict[str, Any]]:
        """Models installed: ``/api/tags``'s ``models``."""
        reply, _ = await self._retrying(
            "tags", None, lambda: self._get_once("/api/tags", self._timeout)
        )
        return self._models(reply, "/api/tags")

    async def version(self) -> str:
        """The server's version; the health probe.

        One try with a short total timeout and no retries: a probe reports the
        state now, and the daemon decides how often to ask.
        """
        reply = await self._get_once("/api/version", self._probe_timeout)
        version = reply.get("version")
        if not isinstance(version, str):
            raise ProtocolError(
                f"{self._who()}: /api/version answered without a version: {reply!r}"
            )
        return version

    def _models(self, reply: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
        models = reply.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise ProtocolError(f"{self._who()}: {path} answered without a models list")
        return models

    # --------------------------------------------------------------- plumbing

    def _check_allowed(self, model: str) -> None:
        if self._allowed is not None and _normalise_model(model) not in self._allowed:
            raise self._not_allowed(model, self.config.models or [])

    def _wire_keep_alive(self, keep_alive: KeepAlive) -> int | float | str:
        try:
            return format_keep_alive(keep_alive)
        except ValueError as exc:
            raise BadRequest(f"{self._who()}: {exc}") from exc

    async def _post_once(
        self, path: str, body: Mapping[str, Any], client_timeout: aiohttp.ClientTimeout
    ) -> dict[str, Any]:
        return await self._request_once("POST", path, client_timeout, self._encode(body))

    async def _get_once(self, path: str, client_timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
        return await self._request_once("GET", path, client_timeout, None)

    async def _request_once(
        self, method: str, path: str, client_timeout: aiohttp.ClientTimeout, payload: bytes | None
    ) -> dict[str, Any]:
        """One non-streamed call; return the (last) JSON object of the body."""
        async with self._response(
            method, path, client_timeout=client_timeout, payload=payload
        ) as resp:
            raw = await resp.read()
        # A server that streamed anyway sends NDJSON; its last object is the answer.
        lines = [ln for ln in raw.splitlines() if ln.strip()]
        try:
            obj = json.loads(lines[-1]) if lines else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise ProtocolError(
                f"{self._who()}: {path} did not answer a JSON object: {raw[:200]!r}"
            )
        if "error" in obj:
            raise StreamBroken(f"{self._who()}: {path} answered an error: {obj['error']}")
        return obj

    async def _status_error(self, resp: aiohttp.ClientResponse, path: str) -> BackendError:
        """Map a non-200 answer (sent before any output) to the error class the daemon acts on.

        Ollama's body is ``{"error": "text"}``, which names the problem well
        enough that the message leaves ``path`` out.
        """
        _, text = await error_body(resp)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            detail = parsed["error"]
        else:
            detail = text[:500] or (resp.reason or "")
        return error_for_status(resp, f"{self._who()}: HTTP {resp.status}: {detail}")
