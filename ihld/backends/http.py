"""HTTP transport for the backend clients: what ``ollama.py`` and ``openai.py`` share.

Both clients reach their server the same way: over the daemon's one aiohttp
session, with per-call connect and read timeouts, a few quick retries with
jittered backoff, a streamed body read line by line, and every failure mapped
onto the ``base.BackendError`` tree so the daemon can tell an outage (retry
later) from a bad request (fail the stage). That plumbing lives here once, so
a fix to the retry loop or to the error classification reaches every API; a
client keeps only what its API says (paths, request bodies, stream format,
error bodies).

Quick transport retries live here; stage-level retries belong to the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp
import structlog

from ihld.backends.base import (
    BackendError,
    BackendUnavailable,
    BadRequest,
    ChatResult,
    LoadFailed,
    ModelNotFound,
    ServerError,
)
from ihld.backends.settings import BackendConfig
from ihld.backends.stream import (
    DEFAULT_MAX_LINE_BYTES as DEFAULT_MAX_LINE_BYTES,
)
from ihld.backends.stream import (
    BodyReader as BodyReader,
)
from ihld.backends.stream import (
    NdjsonLines as NdjsonLines,
)
from ihld.backends.stream import (
    ProtocolError as ProtocolError,
)
from ihld.backends.stream import (
    ReadTimeout as ReadTimeout,
)
from ihld.backends.stream import (
    Streamed as Streamed,
)
from ihld.backends.stream import (
    read_capped as read_capped,
)
from ihld.common.backoff import Backoff, backoff_delay

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "ERROR_BODY_BYTES",
    "TASK_HEADER",
    "BodyReader",
    "HttpBackend",
    "ModelNotAllowed",
    "NdjsonLines",
    "ProtocolError",
    "Streamed",
    "backoff_delay",
    "error_body",
    "error_for_status",
    "error_for_transport",
    "make_session",
    "read_capped",
]

log = structlog.get_logger("ihld.backends.http")

T = TypeVar("T")

# Sent with every chat so a test peer's request log can prove no finished stage
# is sent twice (docs/CONTRACTS.md). Servers ignore unknown headers.
TASK_HEADER = "X-Ihld-Task"

# How much of an error body to read: servers send one short JSON object.
ERROR_BODY_BYTES = 64 * 1024
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


async def error_body(resp: aiohttp.ClientResponse) -> tuple[bytes, str]:
    """A non-200 answer's body (its first ``ERROR_BODY_BYTES``), raw and as stripped text."""
    raw = await read_capped(resp.content, ERROR_BODY_BYTES)
    return raw, raw.decode("utf-8", "replace").strip()


# 500 texts that are permanent: Ollama's llm/server.go ("model requires more system
# memory", "unable to load model") and server/routes.go ("invalid format", sent after the
# load). "llama runner process has terminated" is not here: a runner also dies of
# transient causes, so it counts an attempt. docs/backends.md has the table.
_LOAD_FAILURES = ("requires more system memory", "unable to load model")


def error_for_status(resp: aiohttp.ClientResponse, message: str) -> BackendError:
    """The error class a non-200 status (sent before any output) means; ``message`` says it.

    404: the model is missing. 408, 429, 502, 503, 504: the server, not the
    request (transient). A 500 names its cause in the text: a load that cannot
    succeed fails the model, ``invalid format`` the stage, anything else counts an
    attempt. A redirect: the URL is wrong. Other 4xx: the request. Anything else
    (1xx, another 2xx) is not an answer this API gives.
    """
    status = resp.status
    lowered = message.lower()
    if status == 404:
        return ModelNotFound(message)
    if status in (408, 429, 502, 503, 504):
        return BackendUnavailable(message)
    if status >= 500:
        if "invalid format" in lowered:
            return BadRequest(message)
        if any(text in lowered for text in _LOAD_FAILURES):
            return LoadFailed(message)
        return ServerError(message)
    if 300 <= status < 400:
        where = resp.headers.get("Location", "?")
        return BadRequest(f"{message} (redirected to {where}; check the backend url)")
    if 400 <= status < 500:
        return BadRequest(message)
    return ProtocolError(message)


def error_for_transport(exc: BaseException, who: str, *, output_started: bool) -> BackendError:
    """A connection-level failure.

    Refused, reset or a connect timeout: the server (transient; the health probe
    decides whether it is down). Silence past the read timeout: this request
    (counts an attempt), so a server that probes fine but never answers cannot
    hold a stage for ever.
    """
    if isinstance(exc, _BAD_URL_ERRORS):
        return BadRequest(f"{who}: invalid backend url: {exc}")
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    when = "after output started" if output_started else "before any output"
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ReadTimeout(f"{who}: no answer within the read timeout {when} ({detail})")
    if output_started:
        return BackendUnavailable(f"{who}: stream cut {when} ({detail})")
    return BackendUnavailable(f"{who}: connection failed ({detail})")


class HttpBackend(ABC):
    """One server reached over HTTP: the part of a ``base.Backend`` that is not its API.

    Holds the config, the daemon's session, the timeouts and the retry policy.
    A subclass says how to read one chat attempt (``_chat_once``) and how its
    API words an error status (``_status_error``). Stateless apart from
    config; safe to share between concurrent tasks.
    """

    def __init__(
        self,
        config: BackendConfig,
        session: aiohttp.ClientSession,
        *,
        url: str,
        backoff_base_s: float,
        backoff_cap_s: float,
        probe_timeout_s: float,
        long_read_s: float,
        max_line_bytes: int,
        rng: random.Random | None,
    ) -> None:
        """``long_read_s``: silence allowed on a call that answers only once it is done.

        ``config.read_timeout_s`` is meant for gaps between streamed chunks;
        the larger of the two is used for such calls (``_long_timeout``).
        """
        self.config = config
        self.name: str = config.name
        self.url: str = url
        self._session = session
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._read_timeout_s = config.read_timeout_s
        self._max_line_bytes = max_line_bytes
        self._rng = rng or random.Random()
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        # Streamed chats: the BodyReader times the first byte and each gap between chunks.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_connect=config.connect_timeout_s
        )
        self._long_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=max(config.read_timeout_s, long_read_s),
        )
        self._probe_timeout = aiohttp.ClientTimeout(
            total=probe_timeout_s,
            sock_connect=min(config.connect_timeout_s, probe_timeout_s),
        )

    def __repr__(self) -> str:  # never shows an API key
        return f"{type(self).__name__}(name={self.name!r}, url={self.url!r})"

    async def close(self) -> None:  # noqa: B027  (a no-op for every subclass, not a hook)
        """Nothing to release: the session is the daemon's and it closes it."""

    @abstractmethod
    async def _chat_once(
        self,
        payload: bytes,
        headers: Mapping[str, str],
        first_byte_s: float | None = None,
        path: str | None = None,
    ) -> Streamed:
        """One try of a chat: send ``payload`` (to ``path``, else the API's chat path) and
        read the whole answer. ``first_byte_s``: silence allowed before the first chunk.
        """

    @abstractmethod
    async def _status_error(self, resp: aiohttp.ClientResponse, path: str) -> BackendError:
        """Map a non-200 answer to ``path`` to the error class the daemon acts on."""

    # ------------------------------------------------------------------ calls

    async def _chat(
        self,
        model: str,
        body: Mapping[str, Any],
        task_tag: str,
        first_byte_s: float | None = None,
        path: str | None = None,
    ) -> ChatResult:
        """Send a chat ``body`` with quick retries; the result, timed over every try."""
        payload = self._encode(body)
        headers = {TASK_HEADER: task_tag} if task_tag else {}
        started = time.monotonic()
        streamed, attempts = await self._retrying(
            "chat", model, lambda: self._chat_once(payload, headers, first_byte_s, path)
        )
        return ChatResult(
            content=streamed.content,
            done_reason=streamed.done_reason,
            metrics=streamed.metrics,
            wall_s=time.monotonic() - started,
            first_byte_s=streamed.first_byte_s,
            attempts=attempts,
            thinking=streamed.thinking,
        )

    async def _retrying(
        self, op: str, model: str | None, call: Callable[[], Awaitable[T]]
    ) -> tuple[T, int]:
        """Run ``call`` with up to ``config.retries`` quick retries; return (result, tries).

        Only transient errors are retried here; the last one is re-raised with a
        note saying how many tries were made.
        """
        backoff = Backoff(self._backoff_base_s, self._backoff_cap_s, self._rng)
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
                delay = backoff.next()
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

    @contextlib.asynccontextmanager
    async def _response(
        self,
        method: str,
        path: str,
        *,
        client_timeout: aiohttp.ClientTimeout,
        payload: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        reader: BodyReader | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``async with``: the 200 response to one request (no redirects followed).

        Any other status raises what ``_status_error`` maps it to. A connection
        failure or timeout, while connecting or while the block reads the body,
        raises ``error_for_transport``'s error: a broken stream once ``reader``
        has seen output, an outage before.
        """
        sent = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            # A server may send its headers only with the first chunk (Ollama does), so
            # with a reader they arrive within the reader's first-byte allowance.
            wait = None if reader is None else reader.first_deadline - time.monotonic()
            async with asyncio.timeout(wait):
                response = await self._session.request(
                    method,
                    self.url + path,
                    data=payload,
                    headers={**sent, **(headers or {})},
                    timeout=client_timeout,
                    allow_redirects=False,
                )
            async with response as resp:
                if resp.status != 200:
                    raise await self._status_error(resp, path)
                yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            started = reader is not None and reader.started
            raise error_for_transport(exc, self._who(), output_started=started) from exc

    # --------------------------------------------------------------- plumbing

    def _who(self) -> str:
        return f"backend {self.name!r} ({self.url})"

    def _reader(self, first_byte_s: float | None = None) -> BodyReader:
        """A reader for one attempt's body; its clock starts now."""
        return BodyReader(
            self._who(),
            self._max_line_bytes,
            idle_s=self._read_timeout_s,
            first_byte_s=first_byte_s,
        )

    def _not_allowed(self, model: str, allowed: Iterable[str]) -> ModelNotAllowed:
        """The error for a model outside the allow-list ``allowed`` (listed, sorted)."""
        listed = ", ".join(sorted(allowed))
        return ModelNotAllowed(
            f"{self._who()}: model {model!r} is not in this backend's allow-list "
            f"(models = [{listed}]); add it to the config or route it elsewhere"
        )

    def _encode(self, body: Mapping[str, Any]) -> bytes:
        """JSON-encode the request; what JSON cannot carry (NaN, objects) is a bad request."""
        try:
            return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"{self._who()}: request cannot be sent as JSON: {exc}") from exc
