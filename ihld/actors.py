"""The actor contract: what a plugin implements to run one stage.

An actor turns a job's input and its earlier stages' outputs into one chat
request, and turns the reply into the stage's output. It never calls a
backend, never sleeps and never knows about other jobs: the daemon owns
scheduling and every call to the server. That is what keeps a new actor one
short file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ihld.backends.base import ChatRequest, ChatResult
from ihld.jobs import StageSpec


@dataclass(frozen=True)
class StageContext:
    """Everything an actor may read to build and parse one stage."""

    job_id: str
    input: Any  # the job's free ``input`` data
    stage: StageSpec  # resolved: ``model`` is set, ``needs`` is explicit
    outputs: Mapping[str, Any]  # parsed outputs of the stages finished so far, by name
    attempt: int = 1


@runtime_checkable
class Actor(Protocol):
    """A stage implementation. Register instances through ``register_actors``.

    ``name`` is what pipeline stages refer to in ``actor = "..."``.
    ``default_model`` is used when neither the stage, the config nor the job
    names a model.
    """

    name: str
    default_model: str | None

    def build_request(self, ctx: StageContext) -> ChatRequest:
        """Build the chat request for this stage. Use ``ctx.stage.model``."""
        ...

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        """Turn the reply into this stage's output (JSON-serialisable).

        Raise ``ihld.errors.StageError`` to fail the attempt (e.g. a reply
        that does not follow the requested format); it is retried up to the
        attempt limit.
        """
        ...
