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
Quick transport retries live here; stage-level retries belong to the daemon.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog

from ihld.backends.base import (
    OLLAMA_METRICS,
    BackendError,
    BackendUnavailable,
    BadRequest,
    ChatRequest,
    ChatResult,
    KeepAlive,
    LoadResult,
    ModelNotFound,
    StreamBroken,
)
from ihld.backends.keepalive import format_keep_alive, parse_keep_alive
from ihld.config import BackendConfig

__all__ = [
    "TASK_HEADER",
    "ModelNotAllowed",
    "NdjsonLines",
    "OllamaBackend",
    "ProtocolError",
    "backoff_delay",
    "make_session",
]

log = structlog.get_logger("ihld.backends.ollama")

T = TypeVar("T")

# Sent with every chat so a test peer's request log can prove no finished stage
# is sent twice (docs/CONTRACTS.md). Ollama ignores unknown headers.
TASK_HEADER = "X-Ihld-Task"

# A streamed chunk is one token or so; a line this long means something is wrong.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
# How much of an error body to read: Ollama's are one short JSON object.
_ERROR_BODY_BYTES = 64 * 1024
# A bad URL is a config error, not an outage: never retried. (NonHttpUrlClientError
# appeared in aiohttp 3.10; pyproject allows 3.9.)
_BAD_URL_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (aiohttp.InvalidURL, getattr(aiohttp, "NonHttpUrlClientError", None))
    if isinstance(cls, type)
)


class ModelNotAllowed(ModelNotFound):
    """The model is not in this backend's ``models`` allow-list; nothing was sent."""

    kind = "model_not_allowed"


class ProtocolError(BackendError):
    """The server answered, but not as Ollama does (wrong shape, wrong done_reason).

    Not retried: asking the same server again gets the same answer. Usually the
    URL points at something that is not Ollama, or an Ollama too old for ihld.
    """

    retryable = False
    kind = "protocol_error"


def make_session() -> aiohttp.ClientSession:
    """Create THE daemon's one HTTP session (the daemon closes it).

    ``total=None``: a generation can stream for many minutes, and aiohttp's
    default 300 s total would cut it; each call sets connect and sock_read
    timeouts instead. The pool must hold every slot of every backend at once
    plus probes, so the per-host cap sits well above ``slots`` (at most 256).
    """
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=512, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
    )


def backoff_delay(
    retry: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``retry`` (1 = the first retry).

    Exponential (``base * 2**(retry-1)``, capped), with jitter over the upper
    half, so clients that failed together (a 503 burst) do not retry together,
    and the wait still grows.
    """
    ceiling = min(cap_s, base_s * (2 ** max(0, retry - 1)))
    return (rng or random).uniform(ceiling / 2, ceiling)


class NdjsonLines:
    """Split a byte stream into lines, whatever the chunking.

    aiohttp's ``readline`` raises on lines over twice its read buffer (128 KiB
    by default); a final chunk or a long thinking trace may be longer, so the
    buffering is done here with an explicit, generous limit. Only bytes not yet
    searched are scanned for a newline, so a long line costs linear time.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes at the start of _buf known to hold no newline
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the lines it completed, without ``\\n``/``\\r``, blanks dropped."""
        self._buf += data
        lines: list[bytes] = []
        start = 0
        search_from = self._scanned
        while (nl := self._buf.find(b"\n", search_from)) >= 0:
            if nl - start > self._max:
                raise ValueError(f"a line exceeds {self._max} bytes")
            line = bytes(self._buf[start:nl]).rstrip(b"\r")
            if line.strip():
                lines.append(line)
            start = search_from = nl + 1
        if start:
            del self._buf[:start]
        self._scanned = len(self._buf)
        if self._scanned > self._max:
            raise ValueError(f"a line exceeds {self._max} bytes without a newline")
        return lines

    def finish(self) -> list[bytes]:
        """The last line, if the stream ended without a newline (gin's ``c.JSON`` adds none)."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        self._scanned = 0
        return [rest] if rest else []


@dataclass
class _Streamed:
    """What one successful chat attempt produced."""

    content: str
    done_reason: str
    metrics: dict[str, int]
    first_byte_s: float


def _metrics(final: Mapping[str, Any]) -> dict[str, int]:
    """Ollama's six figures from the done object; absent means 0 (Go ``omitempty``)."""
    out: dict[str, int] = {}
    for key in OLLAMA_METRICS:
        value = final.get(key, 0)
        out[key] = (
            int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
        )
    return out


def _normalise_model(name: str) -> str:
    """Ollama's name identity for the allow-list: case-insensitive, ``:latest`` by default.

    A ``:`` before the last ``/`` is a registry port, not a tag.
    """
    name = name.strip().lower()
    tail = name.rsplit("/", 1)[-1]
    return name if ":" in tail else name + ":latest"


class OllamaBackend:
    """One Ollama server, as the ``base.Backend`` protocol describes.

    Stateless apart from config: the scheduler owns what is loaded where, this
    class only talks HTTP. Safe to share between concurrent tasks.
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
        self.config = config
        self.name: str = config.name
        self.url: str = config.url.rstrip("/")
        self._session = session
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._max_line_bytes = max_line_bytes
        self._rng = rng or random.Random()
        self._allowed = (
            None if config.models is None else {_normalise_model(m) for m in config.models}
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        self._load_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=max(config.read_timeout_s, load_timeout_s),
        )
        self._probe_timeout = aiohttp.ClientTimeout(
            total=probe_timeout_s,
            sock_connect=min(config.connect_timeout_s, probe_timeout_s),
        )

    def __repr__(self) -> str:
        return f"OllamaBackend(name={self.name!r}, url={self.url!r})"

    # ------------------------------------------------------------------ chat

    async def chat(
        self, request: ChatRequest, *, keep_alive: KeepAlive | None, task_tag: str = ""
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
        if request.think is not None:
            body["think"] = request.think
        if keep_alive is not None:
            body["keep_alive"] = self._wire_keep_alive(keep_alive)
        payload = self._encode(body)
        headers = {TASK_HEADER: task_tag} if task_tag else {}

        started = time.monotonic()
        streamed, attempts = await self._retrying(
            "chat", request.model, lambda: self._chat_once(payload, headers)
        )
        return ChatResult(
            content=streamed.content,
            done_reason=streamed.done_reason,
            metrics=streamed.metrics,
            wall_s=time.monotonic() - started,
            first_byte_s=streamed.first_byte_s,
            attempts=attempts,
        )

    async def _chat_once(self, payload: bytes, headers: Mapping[str, str]) -> _Streamed:
        """One try: POST, then read NDJSON until the done object.

        ``first_byte_s`` is measured from the start of this try, so a retry's
        backoff does not inflate the time-to-first-token figure.
        """
        t0 = time.monotonic()
        first_byte_s: float | None = None
        parts: list[str] = []
        try:
            async with self._session.post(
                self.url + "/api/chat",
                data=payload,
                headers={"Content-Type": "application/json", **headers},
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise await self._status_error(resp)
                lines = NdjsonLines(self._max_line_bytes)
                async for chunk in resp.content.iter_any():
                    if first_byte_s is None:
                        first_byte_s = time.monotonic() - t0
                    for line in self._split(lines, chunk):
                        final = self._take_chunk(line, parts)
                        if final is not None:
                            return self._finished(final, parts, first_byte_s)
                for line in lines.finish():
                    final = self._take_chunk(line, parts)
                    if final is not None:
                        return self._finished(final, parts, first_byte_s or 0.0)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc, output_started=first_byte_s is not None) from exc
        if first_byte_s is None:
            raise BackendUnavailable(f"{self._who()}: empty response to /api/chat")
        raise StreamBroken(
            f"{self._who()}: stream ended without a done object after "
            f"{sum(len(p) for p in parts)} characters"
        )

    def _split(self, lines: NdjsonLines, chunk: bytes) -> list[bytes]:
        try:
            return lines.feed(chunk)
        except ValueError as exc:
            raise ProtocolError(f"{self._who()}: {exc}") from None

    def _take_chunk(self, line: bytes, parts: list[str]) -> dict[str, Any] | None:
        """Fold one streamed object into ``parts``; return it if it is the done object."""
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
        return obj if obj.get("done") is True else None

    def _finished(self, final: dict[str, Any], parts: list[str], first_byte_s: float) -> _Streamed:
        reason = final.get("done_reason")
        return _Streamed(
            content="".join(parts),
            done_reason=reason if isinstance(reason, str) else "",
            metrics=_metrics(final),
            first_byte_s=first_byte_s,
        )

    # ---------------------------------------------------------- load / unload

    async def load(self, model: str, *, keep_alive: KeepAlive | None) -> LoadResult:
        """Load ``model`` (``messages: []``) and pin it for ``keep_alive``.

        ``load_duration_ns`` is Ollama's figure when the reply has one; Ollama's
        load reply carries no metrics, so it is usually 0 and ``wall_s`` (which
        includes Ollama's queueing and evictions, as its own load_duration
        would) is the measure to learn from.
        """
        self._check_allowed(model)
        body: dict[str, Any] = {"model": model, "messages": [], "stream": False}
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
            "load", model, lambda: self._post_once("/api/chat", body, self._load_timeout)
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

    async def close(self) -> None:
        """Nothing to release: the session is the daemon's and it closes it."""

    def _models(self, reply: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
        models = reply.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise ProtocolError(f"{self._who()}: {path} answered without a models list")
        return models

    # --------------------------------------------------------------- plumbing

    def _who(self) -> str:
        return f"backend {self.name!r} ({self.url})"

    def _check_allowed(self, model: str) -> None:
        if self._allowed is not None and _normalise_model(model) not in self._allowed:
            allowed = ", ".join(sorted(self.config.models or []))
            raise ModelNotAllowed(
                f"{self._who()}: model {model!r} is not in this backend's allow-list "
                f"(models = [{allowed}]); add it to the config or route it elsewhere"
            )

    def _wire_keep_alive(self, keep_alive: KeepAlive) -> int | float | str:
        try:
            return format_keep_alive(keep_alive)
        except ValueError as exc:
            raise BadRequest(f"{self._who()}: {exc}") from exc

    def _encode(self, body: Mapping[str, Any]) -> bytes:
        """JSON-encode the request; what JSON cannot carry (NaN, objects) is a bad request."""
        try:
            return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"{self._who()}: request cannot be sent as JSON: {exc}") from exc

    async def _retrying(
        self, op: str, model: str | None, call: Callable[[], Awaitable[T]]
    ) -> tuple[T, int]:
        """Run ``call`` with up to ``config.retries`` quick retries; return (result, tries).

        Only retryable errors are retried; the last one is re-raised with a note
        saying how many tries were made.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(), attempt
            except BackendError as exc:
                if not exc.retryable or attempt > self.config.retries:
                    if attempt > 1:
                        exc.add_note(f"gave up after {attempt} tries")
                    raise
                delay = backoff_delay(
                    attempt, base_s=self._backoff_base_s, cap_s=self._backoff_cap_s, rng=self._rng
                )
                log.warning(
                    "backend_call_retried",
                    backend=self.name,
                    op=op,
                    model=model,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error_kind=exc.kind,
                    error=str(exc),
                )
                await asyncio.sleep(delay)

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
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            async with self._session.request(
                method,
                self.url + path,
                data=payload,
                headers=headers,
                timeout=client_timeout,
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise await self._status_error(resp)
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc, output_started=False) from exc
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

    async def _status_error(self, resp: aiohttp.ClientResponse) -> BackendError:
        """Map a non-200 answer (sent before any output) to the error class the daemon acts on."""
        status = resp.status
        raw = await _read_capped(resp.content, _ERROR_BODY_BYTES)
        text = raw.decode("utf-8", "replace").strip()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            detail = parsed["error"]
        else:
            detail = text[:500] or (resp.reason or "")
        message = f"{self._who()}: HTTP {status}: {detail}"
        if status == 404:
            return ModelNotFound(message)
        if status in (408, 429) or status >= 500:
            return BackendUnavailable(message)
        if 300 <= status < 400:
            where = resp.headers.get("Location", "?")
            return BadRequest(f"{message} (redirected to {where}; check the backend url)")
        if 400 <= status < 500:
            return BadRequest(message)
        return ProtocolError(message)

    def _transport_error(self, exc: BaseException, *, output_started: bool) -> BackendError:
        """A connection-level failure: an outage before output, a broken stream after."""
        if isinstance(exc, _BAD_URL_ERRORS):
            return BadRequest(f"{self._who()}: invalid backend url: {exc}")
        what = "timed out" if isinstance(exc, TimeoutError) else "connection failed"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if output_started:
            return StreamBroken(f"{self._who()}: stream {what} after output started ({detail})")
        return BackendUnavailable(f"{self._who()}: {what} ({detail})")


async def _read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read up to ``limit`` bytes or to EOF (``read(n)`` may return after the first chunk)."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = await content.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
