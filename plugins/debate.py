"""The debate pipeline: a proposer argues, a critic rebuts, a judge decides.

The worked example of an ihld plugin. A job is as small as::

    {"pipeline": "debate", "input": {"topic": "Cities should ban cars"}}

and its result holds the proposer's and critic's text and the judge's verdict
``{"winner": "proposer" | "critic", "score": int, "reason": str}``.

The roles run on different models on purpose (qwen2.5 argues, gemma2
criticises): that is the workload ihld's scheduler batches so each model is
loaded a handful of times per batch rather than twice per job. Any model can
be changed per job (``"overrides": {"critic": {"model": "llama3.1:8b"}}``) or
in the config's ``[pipelines.debate.overrides.critic]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ihld import (
    Actor,
    ChatRequest,
    ChatResult,
    StageContext,
    StageError,
    StageSpec,
    chat_request,
    hookimpl,
    parse_json_reply,
)

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["proposer", "critic"]},
        "score": {"type": "integer"},
        "reason": {"type": "string"},
    },
    "required": ["winner", "score", "reason"],
}


def topic(ctx: StageContext) -> str:
    """The job's ``input.topic``; a job without one can never succeed, so no retry."""
    value = ctx.input.get("topic") if isinstance(ctx.input, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise StageError(
            'input.topic: a debate job needs {"input": {"topic": "..."}}',
            retryable=False,
            kind="invalid_input",
        )
    return value.strip()


def earlier(ctx: StageContext, stage: str) -> str:
    """The text output of an earlier stage (finished before this one by ``needs``)."""
    if stage not in ctx.outputs:
        raise StageError(
            f"stage {ctx.stage.name!r} reads the output of {stage!r}; add it to 'needs'",
            retryable=False,
            kind="invalid_stage",
        )
    return str(ctx.outputs[stage]).strip()


class Debater(Actor):
    """What the three roles share: a system prompt, a user prompt, a text reply."""

    system: str
    reply_format: dict[str, Any] | None = None  # a JSON schema, used if the stage sets none

    def prompt(self, ctx: StageContext) -> str:
        raise NotImplementedError

    def build_request(self, ctx: StageContext) -> ChatRequest:
        return chat_request(
            ctx,
            [
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.prompt(ctx)},
            ],
            format=self.reply_format,  # the stage's own format, if it sets one, wins
        )

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        return result.content.strip()


class Proposer(Debater):
    name = "proposer"
    default_model = "qwen2.5:7b"
    system = (
        "You are the proposer in a debate. Argue FOR the motion with your three "
        "strongest arguments, in under 200 words."
    )

    def prompt(self, ctx: StageContext) -> str:
        return f"Motion: {topic(ctx)}"


class Critic(Debater):
    name = "critic"
    default_model = "gemma2:9b"
    system = (
        "You are the critic in a debate. Rebut the proposer's argument: find its "
        "weakest points and argue AGAINST the motion, in under 200 words."
    )

    def prompt(self, ctx: StageContext) -> str:
        return f"Motion: {topic(ctx)}\n\nThe proposer argued:\n{earlier(ctx, 'proposer')}"


class Judge(Debater):
    name = "judge"
    default_model = "qwen2.5:7b"
    system = (
        "You are the judge of a debate. Decide who argued better. Reply with JSON: "
        '"winner" ("proposer" or "critic"), "score" (1 to 10, how clear the win '
        'was) and "reason" (one sentence).'
    )
    reply_format = VERDICT_SCHEMA

    def prompt(self, ctx: StageContext) -> str:
        return (
            f"Motion: {topic(ctx)}\n\n"
            f"Proposer:\n{earlier(ctx, 'proposer')}\n\n"
            f"Critic:\n{earlier(ctx, 'critic')}"
        )

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        # Invalid JSON or a verdict off the schema raises a retryable StageError.
        return parse_json_reply(result.content, ctx.stage.format or self.reply_format)


@hookimpl
def register_actors(register: Callable[[Actor], None]) -> None:
    register(Proposer())
    register(Critic())
    register(Judge())


@hookimpl
def register_pipelines(register: Callable[[str, Sequence[StageSpec]], None]) -> None:
    register(
        "debate",
        [
            StageSpec(name="proposer", actor="proposer"),
            StageSpec(name="critic", actor="critic", needs=("proposer",)),
            # needs critic, which needs proposer: both outputs are there for the judge.
            StageSpec(name="judge", actor="judge", needs=("critic",), format=VERDICT_SCHEMA),
        ],
    )
