"""OpenAI Batch files in the inbox, and their output files in the outbox.

A ``*.jsonl`` whose lines are OpenAI batch requests (``custom_id``,
``method``, ``url``, ``body``) is a batch of single-stage jobs: each line
becomes a job ``<batch>.<line>`` run by the ``openai-chat`` actor, scheduled
like any other job. When every line has ended, ihld writes
``outbox/<batch>.output.jsonl`` (successes) and ``outbox/<batch>.errors.jsonl``
(failures) in OpenAI's per-line output format (``id``, ``custom_id``,
``response: {status_code, request_id, body}``, ``error``), with bodies in the
Chat Completions format, so existing tooling reads them unchanged.

It is a plugin on the general intake-format hook (``register_intake_formats``,
``ihld.core.formats``): the core knows nothing of OpenAI. Which batch a job
belongs to survives restarts in the core's batch manifests (``ihld.core.batches``).

Honoured body fields: ``model``, ``messages``, ``temperature``, ``top_p``,
``seed``, ``max_tokens`` / ``max_completion_tokens`` (Ollama's
``num_predict``), ``stop``, ``presence_penalty``, ``frequency_penalty``,
``response_format`` (``text``, ``json_object``, ``json_schema``). Ignored:
``user``, ``metadata``, ``store``, ``stream`` (results are collected, not
streamed), ``service_tier``. Rejected (the line fails with a reason): ``n`` other
than 1, ``tools``, ``functions``, ``logprobs``, and any other field.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ihld import (
    Actor,
    ActorLike,
    ChatRequest,
    ChatResult,
    FinishedBatch,
    IntakeFormat,
    JobError,
    JobSpec,
    StageContext,
    StageSpec,
    hookimpl,
    parse_json_reply,
)

FORMAT = "openai-batch"
ACTOR = "openai-chat"
CHAT_URL = "/v1/chat/completions"
OPTION_MAP = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
IGNORED = frozenset({"user", "metadata", "store", "stream", "stream_options", "service_tier"})
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def is_batch_line(value: Any) -> bool:
    """True for a decoded line that is an OpenAI batch request, not an ihld job."""
    return isinstance(value, dict) and "custom_id" in value and "body" in value


def _fail(message: str, path: str) -> JobError:
    return JobError(f"{path}: {message}", kind="invalid_batch_line", path=path)


def _format(response_format: Any) -> Literal["json"] | dict[str, Any] | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _fail("must be an object", "body.response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise _fail("json_schema.schema must be an object", "body.response_format")
        return schema
    raise _fail(f"unsupported type {kind!r}", "body.response_format.type")


def to_spec(value: dict[str, Any]) -> JobSpec:
    """One batch line → a single-stage job spec, or a JobError naming the field."""
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        raise _fail("must be a non-empty string of at most 512 characters", "custom_id")
    if value.get("method", "POST") != "POST":
        raise _fail("only POST is supported", "method")
    if value.get("url") != CHAT_URL:
        raise _fail(f"only {CHAT_URL} is supported, got {value.get('url')!r}", "url")
    extra = set(value) - {"custom_id", "method", "url", "body"}
    if extra:
        raise _fail(f"unknown field(s) {sorted(extra)}", sorted(extra)[0])
    body = value["body"]
    if not isinstance(body, dict):
        raise _fail("must be an object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("must be a model name", "body.model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("must be a non-empty list", "body.messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _fail(f"role must be one of {sorted(ROLES)}", f"body.messages[{index}].role")
    if body.get("n", 1) != 1:
        raise _fail("only n = 1 is supported", "body.n")
    options: dict[str, Any] = {}
    for key, item in body.items():
        if key in ("model", "messages", "n", "response_format") or key in IGNORED:
            continue
        if key not in OPTION_MAP:
            raise _fail("not supported by ihld (see docs/backends.md)", f"body.{key}")
        options[OPTION_MAP[key]] = item
    stage = StageSpec(
        name="chat",
        actor=ACTOR,
        model=model,
        options=options,
        format=_format(body.get("response_format")),
    )
    return JobSpec(stages=[stage], input={"custom_id": custom_id, "messages": messages})


class OpenAIChatActor(Actor):
    """Sends a batch line's messages as they are; the output is the reply text.

    With a ``response_format`` the reply must parse (and match the schema),
    else the attempt is retried; the text itself is what the output file
    carries, as OpenAI's would.
    """

    name = ACTOR

    def build_request(self, ctx: StageContext) -> ChatRequest:
        return ChatRequest(
            model=ctx.stage.model or "",
            messages=list(ctx.input["messages"]),
            options=dict(ctx.stage.options),
            format=ctx.stage.format,
        )

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        if ctx.stage.format is not None:
            parse_json_reply(result.content, ctx.stage.format)
        return result.content


# -- output files ---------------------------------------------------------------------


def _request_id(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:24]


def output_line(job_id: str, custom_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """A finished job's result as an OpenAI batch output line (Chat Completions body)."""
    stage = result["stages"][0]
    prompt = int(stage.get("prompt_eval_count") or 0)
    completion = int(stage.get("eval_count") or 0)
    rid = _request_id(job_id)
    return {
        "id": f"batch_req_{rid}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"req_{rid}",
            "body": {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": int(result.get("finished_at") or time.time()),
                "model": stage.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": stage.get("output"),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": "length"
                        if stage.get("done_reason") == "length"
                        else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
                "system_fingerprint": f"ihld_{stage.get('backend')}",
            },
        },
        "error": None,
    }


def error_line(job_id: str, custom_id: str | None, record: Mapping[str, Any]) -> dict[str, Any]:
    error = record.get("error") or {}
    return {
        "id": f"batch_req_{_request_id(job_id)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": error.get("kind", "failed"), "message": error.get("message", "")},
    }


class OpenAIBatchFormat:
    """The intake format: recognise batch lines, and write the batch's two output files."""

    name = FORMAT

    def recognise(self, value: Any) -> bool:
        return is_batch_line(value)

    def to_spec(self, value: Any) -> JobSpec:
        return to_spec(value)

    def tag(self, value: Any) -> dict[str, Any]:
        custom_id = value.get("custom_id")
        return {"custom_id": custom_id if isinstance(custom_id, str) else None}

    def finish(self, batch: FinishedBatch) -> dict[str, bytes]:
        outputs, errors = [], []
        for line in batch.lines:
            custom_id = line.tag.get("custom_id")
            if line.result is not None:
                outputs.append(output_line(line.job_id, custom_id or "", line.result))
            else:
                errors.append(error_line(line.job_id, custom_id, line.failure or {}))
        return {
            f"{batch.name}.output.jsonl": _jsonl(outputs),
            f"{batch.name}.errors.jsonl": _jsonl(errors),
        }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)


@hookimpl
def register_actors(register: Callable[[ActorLike], None]) -> None:
    register(OpenAIChatActor())


@hookimpl
def register_intake_formats(register: Callable[[IntakeFormat], None]) -> None:
    register(OpenAIBatchFormat())
