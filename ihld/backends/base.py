"""What the daemon needs from an inference server, independent of its API.

The scheduler decides *what* runs where; a backend only knows *how* to talk to
one server. Backends raise the errors below so the daemon can tell an outage
(delay the work) from a bad request (fail the stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    think: bool | None = None


@dataclass
class ChatResult:
    """A finished chat call: the text, why it stopped, and the server's own figures."""

    content: str
    done_reason: str
    metrics: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0  # our own wall time for the whole call
    first_byte_s: float = 0.0  # time until the first streamed chunk arrived
    attempts: int = 1  # transport-level tries inside the client (503 / reset retries)


@dataclass
class LoadResult:
    """A deliberate model load: Ollama's load_duration and our wall time."""

    model: str
    load_duration_ns: int
    wall_s: float


class BackendError(Exception):
    """A call to a backend failed. ``retryable``: another try may succeed."""

    retryable = True
    kind = "backend_error"


class BackendUnavailable(BackendError):
    """Connection refused/reset, 5xx, 503 busy, timeouts: the server, not the request."""

    kind = "backend_unavailable"


class StreamBroken(BackendError):
    """Output had started and then an ``{"error": ...}`` line or a cut ended the stream."""

    kind = "stream_error"


class ModelNotFound(BackendError):
    """404: the model is not installed on that server. Not retried."""

    retryable = False
    kind = "model_not_found"


class BadRequest(BackendError):
    """400 and other 4xx: the request itself is wrong. Not retried."""

    retryable = False
    kind = "bad_request"


class Backend(Protocol):
    """One inference server. Implementations: ``ollama.OllamaBackend``."""

    name: str
    url: str

    async def chat(
        self, request: ChatRequest, *, keep_alive: KeepAlive | None, task_tag: str = ""
    ) -> ChatResult:
        """Run one chat request (streamed); raise a BackendError subclass on failure."""
        ...

    async def load(self, model: str, *, keep_alive: KeepAlive | None) -> LoadResult:
        """Load ``model`` and keep it for ``keep_alive``."""
        ...

    async def unload(self, model: str) -> None:
        """Ask the server to unload ``model`` once its in-flight requests end."""
        ...

    async def ps(self) -> list[dict[str, Any]]:
        """Models resident now (Ollama's /api/ps ``models`` list)."""
        ...

    async def version(self) -> str:
        """The server's version; also the health probe."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
