"""What the daemon needs from an inference server, independent of its API.

The scheduler decides *what* runs where; a backend only knows *how* to talk to
one server. Backends raise the errors below so the daemon can tell an outage
(delay the work) from a bad request (fail the stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# Ollama's keep_alive: a number of seconds, or a Go duration string ("10m", "-1").
KeepAlive = float | int | str

# Ollama's figures, in nanoseconds (counts for *_count), copied from the final chunk.
OLLAMA_METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@dataclass(frozen=True)
class ChatRequest:
    """One chat call, as an actor builds it. The daemon adds keep_alive and streaming."""

    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    format: str | dict[str, Any] | None = None
    # Ollama's ``think``: True/False, or a level ("high", "medium", "low"). None: the
    # model's default (thinking models think unless told not to).
    think: bool | str | None = None


@dataclass
class ChatResult:
    """A finished chat call: the text, why it stopped, and the server's own figures."""

    content: str
    done_reason: str
    metrics: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0  # our own wall time for the whole call
    first_byte_s: float = 0.0  # time until the first streamed chunk arrived
    attempts: int = 1  # transport-level tries inside the client (503 / reset retries)
    thinking: str = ""  # a thinking model's reasoning (``message.thinking``), apart from content


@dataclass
class LoadResult:
    """A deliberate model load: the server's load figure and our wall time.

    ``parallel``: requests the server really runs at once for this model, when it
    says so (llama.cpp's ``total_slots``); None when it does not (Ollama).
    """

    model: str
    load_duration_ns: int
    wall_s: float
    parallel: int | None = None


# What ends a failed call; docs/backends.md has the table of every server answer.
#   "transient": the server, not the request (refused, reset, 502/503/504): retried with
#                backoff, no attempt counted; the health probe decides if the backend is down.
#   "attempt":   this try failed (a 500, an error line mid-stream, a stream that ends
#                silently): counts one of the stage's ``max_attempts``.
#   "stage":     the request itself is wrong (400, ``invalid format``): the stage fails now.
#   "model":     this backend cannot serve the model (404, a load that cannot succeed):
#                every stage for it fails, unless another backend may serve it.
Effect = Literal["transient", "attempt", "stage", "model"]


class BackendError(Exception):
    """A call to a backend failed; ``effect`` says what ends the work that made it."""

    effect: Effect = "attempt"
    kind = "backend_error"

    @property
    def retryable(self) -> bool:
        """Whether the client's quick retries may try again at once (transient only)."""
        return self.effect == "transient"


class BackendUnavailable(BackendError):
    """Connection refused/reset, timeouts, 502/503/504: the server, not the request."""

    effect: Effect = "transient"
    kind = "backend_unavailable"


class ModelNotLoaded(BackendUnavailable):
    """The server no longer holds a model the scheduler thought resident (llama.cpp's
    router with ``autoload=false``): reload it, then try again; no attempt counted."""

    kind = "model_not_loaded"

    @property
    def retryable(self) -> bool:
        return False  # asking again at once gets the same answer: the model must load first


class ServerError(BackendError):
    """A 500 on one request that names no permanent cause: counts an attempt."""

    kind = "server_error"


class StreamBroken(BackendError):
    """Output had started and an ``{"error": ...}`` line, or a silent end, cut it short."""

    kind = "stream_error"


class ModelNotFound(BackendError):
    """404 (or llama.cpp's 400 ``model 'x' not found``): the server lacks the model."""

    effect: Effect = "model"
    kind = "model_not_found"


class LoadFailed(BackendError):
    """The model cannot be loaded here ("requires more system memory", "unable to load")."""

    effect: Effect = "model"
    kind = "model_load_failed"


class BadRequest(BackendError):
    """400 and other 4xx, or ``invalid format``: the request itself is wrong."""

    effect: Effect = "stage"
    kind = "bad_request"


class Backend(Protocol):
    """One inference server. Implementations: ``ollama.OllamaBackend``."""

    name: str
    url: str

    async def chat(
        self,
        request: ChatRequest,
        *,
        keep_alive: KeepAlive | None,
        task_tag: str = "",
        first_byte_s: float | None = None,
    ) -> ChatResult:
        """Run one chat request (streamed); raise a BackendError subclass on failure.

        ``first_byte_s``: how long the server may hold the request before its first
        byte (a prefetched request waits for a slot, or a load); None: the idle read
        timeout. Between chunks the idle read timeout applies.
        """
        ...

    async def load(
        self,
        model: str,
        *,
        keep_alive: KeepAlive | None,
        options: Mapping[str, Any] | None = None,
    ) -> LoadResult:
        """Load ``model`` with the runner ``options`` its stages use; keep it ``keep_alive``."""
        ...

    async def unload(self, model: str) -> None:
        """Ask the server to unload ``model`` once its in-flight requests end."""
        ...

    async def ps(self) -> list[dict[str, Any]] | None:
        """Models resident now (Ollama's /api/ps ``models``: ``name`` each); None: unknown."""
        ...

    async def version(self) -> str:
        """The server's version; also the health probe."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
