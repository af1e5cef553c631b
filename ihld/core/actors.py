"""The actor contract: what a plugin implements to run one stage.

An actor turns a job's input and its earlier stages' outputs into one chat
request, and turns the reply into the stage's output. It never calls a
backend, never sleeps and never knows about other jobs: the daemon owns
scheduling and every call to the server. That is what keeps a new actor one
short file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ihld.backends.base import ChatRequest, ChatResult
from ihld.common import jsonsafe
from ihld.common.errors import StageError
from ihld.core.jobs import JsonFormat, StageSpec
from ihld.core.schema import validate_schema


@dataclass(frozen=True)
class StageContext:
    """Everything an actor may read to build and parse one stage."""

    job_id: str
    input: Any  # the job's free ``input`` data
    stage: StageSpec  # resolved: ``model`` is set, ``needs`` is explicit
    outputs: Mapping[str, Any]  # parsed outputs of the stages finished so far, by name
    attempt: int = 1


@runtime_checkable
class ActorLike(Protocol):
    """What the daemon calls on an actor; subclass ``Actor`` rather than matching this."""

    name: str
    default_model: str | None

    def build_request(self, ctx: StageContext) -> ChatRequest: ...

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any: ...


class Actor:
    """A stage implementation: subclass it, set ``name``, write ``build_request``.

    ``name`` is what pipeline stages refer to in ``actor = "..."``.
    ``default_model`` is used when neither the stage, the config nor the job
    names a model. Register instances through ``register_actors``.

    The stage's settings win over the actor's: ``chat_request`` takes the
    model, ``options``, ``format`` and ``think`` from the stage (job file,
    config overrides) where it sets them, and the actor's own values only
    where it does not (docs/plugins.md, "Precedence").
    """

    name: str = ""
    default_model: str | None = None

    def build_request(self, ctx: StageContext) -> ChatRequest:
        """Build the chat request for this stage, usually with ``chat_request(ctx, messages)``."""
        raise NotImplementedError(f"actor {self.name!r} must define build_request")

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        """Turn the reply into this stage's output (JSON-serialisable).

        By default: the reply text, or the parsed JSON when the stage asked for a
        ``format``. Raise ``StageError`` to fail the attempt (a reply off the
        requested format); it is retried up to the attempt limit.
        """
        if ctx.stage.format is None:
            return result.content
        return parse_json_reply(result.content, ctx.stage.format)


def _strip_fence(text: str) -> str:
    """Drop a Markdown code fence: models add one even when asked for bare JSON."""
    if text.startswith("```") and text.endswith("```") and "\n" in text:
        return text[text.index("\n") + 1 : -3].strip()
    return text


def parse_json_reply(content: str, format: JsonFormat | Mapping[str, Any] | None) -> Any:
    """Parse a reply requested with ``format``; raise a retryable StageError if it is not valid.

    Retryable because sampling differs between attempts: a truncated or
    off-schema reply is often fine the second time.
    """
    try:
        value = jsonsafe.loads(_strip_fence(content.strip()))
    except ValueError as exc:
        raise StageError(
            f"reply is not valid JSON: {exc}", retryable=True, kind="invalid_reply"
        ) from None
    if isinstance(format, Mapping):
        problems = validate_schema(value, format)
        if problems:
            raise StageError(
                "reply does not match the requested schema: " + "; ".join(problems),
                retryable=True,
                kind="schema_mismatch",
            )
    return value


# A shorter prefix costs too little to re-evaluate to be worth ordering work by
# (about 250 tokens; prompt evaluation runs at ~250 tokens/s per slot on a CPU).
PREFIX_MIN_CHARS = 1000


def prompt_prefix(actor: ActorLike | None, ctx: StageContext) -> str | None:
    """A key for the long first message this stage's request starts with, or None.

    Requests that share it (a system prompt, a rubric, a document) can reuse a
    server slot's cached prompt; the scheduler keeps them on one slot in turn.
    The request is built as the actor will build it at dispatch; an actor that
    cannot build it yet (or fails) just gets no key.
    """
    if actor is None:
        return None
    try:
        request = actor.build_request(ctx)
    except Exception:
        return None
    if not request.messages:
        return None
    first = request.messages[0]
    content = first.get("content") if isinstance(first, Mapping) else None
    if not isinstance(content, str) or len(content) < PREFIX_MIN_CHARS:
        return None
    text = f"{request.model}\0{first.get('role')}\0{content}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
