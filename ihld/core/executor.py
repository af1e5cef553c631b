"""Running one stage: actor → backend → actor, and what came of it.

The executor turns a dispatched task into exactly one ``Outcome``; it never
touches the scheduler or the spool. It separates failures by what ends them
(the backend error's ``effect``, docs/backends.md): the server (transient:
delays the job, costs no attempt), this try (a 500, a cut stream, a timeout, a
plugin error: costs an attempt), the request (a 400: fails the stage at once),
or the model (no such model here: fails every stage for it, unless another
backend has it).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from ihld.backends.base import (
    Backend,
    BackendError,
    ChatRequest,
    ChatResult,
    KeepAlive,
    ModelNotLoaded,
)
from ihld.common import jsonsafe
from ihld.common.errors import StageError
from ihld.core.actors import ActorLike, StageContext
from ihld.core.jobs import StageSpec


@dataclass(frozen=True)
class StageDone:
    output: Any
    record: dict[str, Any]


@dataclass(frozen=True)
class StageRetry:
    """The attempt failed; another may succeed. ``counts``: it used up an attempt."""

    kind: str
    message: str
    counts: bool = True


@dataclass(frozen=True)
class StageFailed:
    """The stage cannot succeed (unknown model, bad request, a plugin said so)."""

    kind: str
    message: str


@dataclass(frozen=True)
class ModelUnusable:
    """This backend cannot serve the stage's model (not found, cannot load)."""

    kind: str
    message: str


@dataclass(frozen=True)
class Transient:
    """The server is unreachable or busy past the client's own quick retries.

    ``residency_lost``: the server no longer holds the model (llama.cpp's router).
    """

    kind: str
    message: str
    residency_lost: bool = False


Outcome = StageDone | StageRetry | StageFailed | ModelUnusable | Transient


def outcome_for(exc: BackendError) -> Outcome:
    """What a failed call means for its stage, by the error's ``effect``."""
    message = str(exc)
    if exc.effect == "transient":
        return Transient(exc.kind, message, residency_lost=isinstance(exc, ModelNotLoaded))
    if exc.effect == "model":
        return ModelUnusable(exc.kind, message)
    if exc.effect == "stage":
        return StageFailed(exc.kind, message)
    return StageRetry(exc.kind, message)


def finalize_request(request: ChatRequest, stage: StageSpec) -> ChatRequest:
    """The stage's model, options and format win over what the actor built.

    The scheduler queued the task under the stage's model key; sending
    anything else would make the server load a model the scheduler does not
    know about.
    """
    options = {**request.options, **stage.options}
    return replace(
        request,
        model=stage.model or request.model,
        options=options,
        format=stage.format if stage.format is not None else request.format,
        think=stage.think if stage.think is not None else request.think,
    )


def stage_record(
    stage: StageSpec,
    backend: str,
    attempt: int,
    result: ChatResult,
    *,
    queued_s: float,
    started_at: float,
) -> dict[str, Any]:
    """What the outbox keeps of one stage: who ran it, Ollama's figures and our own."""
    metrics = result.metrics
    load_ns = metrics.get("load_duration", 0)
    return {
        "model": stage.model,
        "actor": stage.actor,
        "backend": backend,
        "attempts": attempt,
        "done_reason": result.done_reason,
        "truncated": result.done_reason == "length",
        **({"thinking": result.thinking} if result.thinking else {}),
        **{key: metrics[key] for key in sorted(metrics)},
        "queue_s": round(queued_s, 6),  # ready → dispatched, in ihld
        "wall_s": round(result.wall_s, 6),  # the whole HTTP call
        "first_byte_s": round(result.first_byte_s, 6),
        # Ollama's load_duration includes its own queue wait; this is ours.
        "server_wait_s": round(max(0.0, result.first_byte_s - load_ns / 1e9), 6)
        if load_ns
        else 0.0,
        "started_at": round(started_at, 6),
        "finished_at": round(time.time(), 6),
    }


async def run_stage(
    *,
    actor: ActorLike,
    ctx: StageContext,
    backend: Backend,
    keep_alive: KeepAlive | None,
    timeout_s: float,
    queued_s: float,
    first_byte_s: float | None = None,
) -> Outcome:
    """Run one attempt of one stage. Never raises (except cancellation)."""
    stage = ctx.stage
    started_at = time.time()
    try:
        request = finalize_request(actor.build_request(ctx), stage)
    except StageError as exc:
        return _stage_error(exc)
    except Exception as exc:  # a plugin bug fails its stage, never the daemon
        return StageRetry("plugin_error", f"actor {actor.name!r} build_request raised {exc!r}")
    tag = f"{ctx.job_id}/{stage.name}/{ctx.attempt}"
    try:
        async with asyncio.timeout(timeout_s):
            result = await backend.chat(
                request, keep_alive=keep_alive, task_tag=tag, first_byte_s=first_byte_s
            )
    except TimeoutError:
        return StageRetry(
            "stage_timeout", f"no complete reply within {timeout_s:g} s ([limits] stage_timeout_s)"
        )
    except BackendError as exc:
        return outcome_for(exc)
    try:
        output = actor.parse_response(ctx, result)
        jsonsafe.dumps(output).encode()  # it goes into checkpoints and results: strict JSON
    except StageError as exc:
        return _stage_error(exc)
    except (TypeError, ValueError) as exc:
        return StageRetry(
            "plugin_error", f"actor {actor.name!r} returned an output that is not JSON: {exc}"
        )
    except Exception as exc:
        return StageRetry("plugin_error", f"actor {actor.name!r} parse_response raised {exc!r}")
    record = stage_record(
        stage, backend.name, ctx.attempt, result, queued_s=queued_s, started_at=started_at
    )
    return StageDone(output, record)


def _stage_error(exc: StageError) -> Outcome:
    if exc.retryable:
        return StageRetry(exc.kind, str(exc))
    return StageFailed(exc.kind, str(exc))
