"""The OpenAI-compatible client against a scripted peer: wire format, SSE, errors, retries.

The peer is ``ollama_peer``'s scripted server with OpenAI behaviours enqueued
on ``/v1/...`` paths: shapes the simulator does not produce (llama-server's
``timings`` and ``error:`` lines, llama-swap's and old vLLM's error bodies, a
stream without ``[DONE]``, CRLF and pings). tests/test_sim_openai.py runs the
client against the simulator.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from http_fixtures import session_fixture  # noqa: F401  (provides the session fixture)
from ollama_peer import (
    Behaviour,
    OllamaPeer,
    Recorded,
    drop_before,
    json_reply,
    ollama_peer_fixture,  # noqa: F401  (provides the ollama_peer fixture)
    raw_status,
)
from structlog.testing import capture_logs

from ihld.backends.base import (
    BackendUnavailable,
    BadRequest,
    ChatRequest,
    ModelNotFound,
    ServerError,
    StreamBroken,
)
from ihld.backends.http import ReadTimeout
from ihld.backends.ollama import TASK_HEADER, ModelNotAllowed, ProtocolError
from ihld.backends.openai import OpenAIBackend
from ihld.backends.openai_wire import OPTION_MAP, openai_metrics, request_body
from ihld.common.errors import ConfigError
from ihld.core.config import BackendConfig, parse_config

MODEL = "Qwen/Qwen2.5-7B-Instruct"
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
]
CONTENT = "Hello from the peer."
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
# llama-server's figures (tools/server/README.md): milliseconds, and counts.
TIMINGS = {
    "cache_n": 2,
    "prompt_n": 10,
    "prompt_ms": 30.958,
    "prompt_per_token_ms": 3.0958,
    "prompt_per_second": 323.0,
    "predicted_n": 5,
    "predicted_ms": 661.064,
    "predicted_per_token_ms": 132.2,
    "predicted_per_second": 7.56,
}
DONE = "data: [DONE]"

MakeBackend = Callable[..., OpenAIBackend]


# ------------------------------------------------------------- behaviours


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1735142223,
        "model": MODEL,
        "choices": [choice],
        **extra,
    }


def stream_events(
    content: str = CONTENT,
    *,
    pieces: int = 3,
    finish_reason: str | None = "stop",
    usage: dict[str, Any] | None = USAGE,
    timings: dict[str, Any] | None = None,
    usage_chunk: bool = True,
    done: bool = True,
) -> list[Any]:
    """The events of a stream: content chunks, the finish chunk, the usage chunk, [DONE].

    ``usage_chunk=False`` puts usage (and timings) on the finish chunk instead.
    """
    size = max(1, -(-len(content) // pieces))
    parts = [content[i : i + size] for i in range(0, len(content), size)]
    events: list[Any] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": p}) for p in parts]
    extra: dict[str, Any] = {}
    if timings is not None:
        extra["timings"] = timings
    if usage_chunk:
        events.append(chunk({}, finish_reason))
        if usage is not None:
            last = chunk({}, None, usage=usage, **extra)
            last["choices"] = []
            events.append(last)
    else:
        events.append(chunk({}, finish_reason, **({"usage": usage} if usage else {}), **extra))
    if done:
        events.append(DONE)
    return events


def sse(
    events: list[Any],
    *,
    eol: str = "\n",
    piece_bytes: int | None = None,
    abort: bool = False,
    stall_s: float = 0.0,
    content_type: str = "text/event-stream",
) -> Behaviour:
    """Write ``events`` as SSE: a dict is a ``data:`` event, a str a raw line (then a blank)."""

    async def run(request: web.Request, peer: OllamaPeer, rec: Recorded) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await resp.prepare(request)
        data = b""
        for event in events:
            line = event if isinstance(event, str) else "data: " + json.dumps(event)
            data += (line + eol + eol).encode()
        if piece_bytes is None:
            await resp.write(data)
        else:
            for i in range(0, len(data), piece_bytes):
                await resp.write(data[i : i + piece_bytes])
                await asyncio.sleep(0.001)
        if stall_s:
            await peer.sleep(stall_s)
        if abort:
            await asyncio.sleep(0.01)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    return Behaviour("sse", run)


def reply(**kw: Any) -> Behaviour:
    return sse(stream_events(**kw))


def completion(
    content: str | None = CONTENT, *, finish_reason: str = "stop", **extra: Any
) -> dict[str, Any]:
    """A whole (non-streamed) chat.completion object."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1735142223,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": USAGE,
        **extra,
    }


def openai_error(status: int, message: str, kind: str, code: Any = None) -> Behaviour:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return json_reply(body, status=status)


def models_reply(*ids: str, owned_by: str = "llamacpp") -> Behaviour:
    data = [{"id": i, "object": "model", "created": 1, "owned_by": owned_by} for i in ids]
    return json_reply({"object": "list", "data": data})


# --------------------------------------------------------------- fixtures


@pytest.fixture
def make_backend(ollama_peer: OllamaPeer, session: aiohttp.ClientSession) -> MakeBackend:
    """Backends on the peer, with tiny backoff so retry tests take milliseconds."""

    def make(
        *,
        url: str | None = None,
        stream: bool = True,
        environ: dict[str, str] | None = None,
        **cfg: Any,
    ) -> OpenAIBackend:
        settings: dict[str, Any] = {"retries": 3, "read_timeout_s": 5.0, "connect_timeout_s": 2.0}
        settings.update(cfg)
        config = BackendConfig(name="peer", url=url or ollama_peer.url, kind="openai", **settings)
        return OpenAIBackend(
            config,
            session,
            backoff_base_s=0.001,
            backoff_cap_s=0.004,
            probe_timeout_s=2.0,
            stream=stream,
            rng=random.Random(7),
            environ=environ,
        )

    return make


def chat_request(**kw: Any) -> ChatRequest:
    return ChatRequest(model=kw.pop("model", MODEL), messages=kw.pop("messages", MESSAGES), **kw)


# ------------------------------------------------------------ request body


async def test_minimal_request_body_and_headers(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(reply(), path=CHAT)
    result = await make_backend().chat(chat_request(), keep_alive="30m")
    assert result.content == CONTENT and result.done_reason == "stop"
    (rec,) = ollama_peer.history
    assert (rec.method, rec.path) == ("POST", CHAT)
    # keep_alive is not an OpenAI parameter: not sent.
    assert rec.json == {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert rec.headers["Content-Type"] == "application/json"
    assert TASK_HEADER not in rec.headers and "Authorization" not in rec.headers


async def test_options_format_and_think_are_mapped(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(reply(), path=CHAT)
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 42,
        "num_predict": 256,
        "stop": ["\n\n"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "num_keep": 5,
        "num_ctx": 8192,  # a server setting: dropped quietly
        "mystery": 1,  # unknown: dropped with one warning
        "tfs_z": None,  # None: as if absent
    }
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    request = chat_request(options=options, format=schema, think=False)
    with capture_logs() as logs:
        await make_backend().chat(request, keep_alive=None, task_tag="job-1/critic/2")
    (rec,) = ollama_peer.history
    assert rec.headers[TASK_HEADER] == "job-1/critic/2"
    assert rec.json == {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 42,
        "max_tokens": 256,
        "stop": ["\n\n"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "repetition_penalty": 1.1,
        "n_keep": 5,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "stage", "schema": schema, "strict": True},
        },
        "chat_template_kwargs": {"enable_thinking": False},
    }
    dropped = [e for e in logs if e["event"] == "backend_option_dropped"]
    assert [e["option"] for e in dropped] == ["mystery"]


def test_request_body_details() -> None:
    body = request_body(chat_request(format="json", options={"num_predict": -1}), stream=False)
    assert body["response_format"] == {"type": "json_object"}
    assert "max_tokens" not in body, "Ollama's -1 (no limit) sends no max_tokens"
    assert "stream_options" not in body and body["stream"] is False
    assert set(OPTION_MAP) >= {
        "temperature",
        "top_p",
        "seed",
        "num_predict",
        "stop",
        "presence_penalty",
        "frequency_penalty",
    }
    with pytest.raises(ValueError, match="format must be"):
        request_body(chat_request(format="yaml"), stream=True)


async def test_bad_format_and_unserialisable_requests_are_not_sent(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    backend = make_backend()
    with pytest.raises(BadRequest, match="format must be"):
        await backend.chat(chat_request(format="yaml"), keep_alive=None)
    with pytest.raises(BadRequest, match="cannot be sent as JSON"):
        await backend.chat(chat_request(options={"temperature": float("nan")}), keep_alive=None)
    assert ollama_peer.history == []


async def test_api_key_from_the_named_environment_variable(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(models_reply(MODEL), path=MODELS)
    ollama_peer.enqueue(reply(), path=CHAT)
    backend = make_backend(api_key_env="VLLM_KEY", environ={"VLLM_KEY": "sk-secret "})
    assert "sk-secret" not in repr(backend)
    await backend.load(MODEL, keep_alive=None)
    await backend.chat(chat_request(), keep_alive=None)
    assert [r.headers["Authorization"] for r in ollama_peer.history] == ["Bearer sk-secret"] * 2
    with pytest.raises(ConfigError, match=r"VLLM_KEY.*not set"):
        make_backend(api_key_env="VLLM_KEY", environ={})


def test_config_kind_and_api_key_env(tmp_path: Path) -> None:
    source = tmp_path / "ihld.toml"
    ok = parse_config(
        {"backends": [{"name": "v", "kind": "openai", "api_key_env": "IHLD_KEY"}]}, source
    )
    assert ok.backends[0].kind == "openai" and ok.backends[0].api_key_env == "IHLD_KEY"
    with pytest.raises(ConfigError, match=r"backends\.0.*only used with kind"):
        parse_config({"backends": [{"name": "o", "api_key_env": "IHLD_KEY"}]}, source)
    with pytest.raises(ConfigError, match=r"backends\.0\.api_key_env"):
        parse_config({"backends": [{"name": "v", "kind": "openai", "api_key_env": "sk-1"}]}, source)
    with pytest.raises(ConfigError, match=r"backends\.0\.kind"):
        parse_config({"backends": [{"name": "v", "kind": "tgi"}]}, source)


async def test_allow_list_is_exact(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    backend = make_backend(models=[MODEL])
    with pytest.raises(ModelNotAllowed, match="allow-list"):
        await backend.chat(chat_request(model=MODEL.lower()), keep_alive=None)
    with pytest.raises(ModelNotAllowed):
        await backend.load("other", keep_alive=None)
    assert ollama_peer.history == []


# ------------------------------------------------------------- streams


async def test_llama_server_timings_map_to_ollama_metrics(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 2}}
    ollama_peer.enqueue(reply(usage=usage, timings=TIMINGS, usage_chunk=False), path=CHAT)
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.content == CONTENT
    assert result.metrics == {
        "prompt_eval_count": 12,
        "eval_count": 5,
        "prompt_eval_duration": 30_958_000,
        "eval_duration": 661_064_000,
        "usage_prompt_tokens": 12,
        "usage_completion_tokens": 5,
        "usage_total_tokens": 17,
        "usage_prompt_tokens_details_cached_tokens": 2,
        "timings_cache_n": 2,
        "timings_prompt_n": 10,
        "prompt_evaluated": 10,  # the slot's cache held the other 2
        "timings_predicted_n": 5,
    }
    assert all(type(v) is int for v in result.metrics.values())


def test_metrics_from_timings_alone_and_from_nothing() -> None:
    assert openai_metrics(None, TIMINGS) == {
        "prompt_eval_duration": 30_958_000,
        "eval_duration": 661_064_000,
        "prompt_eval_count": 12,  # prompt_n + cache_n, as usage.prompt_tokens counts
        "eval_count": 5,
        "timings_cache_n": 2,
        "timings_prompt_n": 10,
        "prompt_evaluated": 10,  # the slot's cache held the other 2
        "timings_predicted_n": 5,
    }
    assert openai_metrics(None, None) == {}
    assert openai_metrics({"prompt_tokens": "x", "completion_tokens": 3.0}, {"prompt_ms": -1}) == {
        "eval_count": 3,
        "usage_completion_tokens": 3,
    }


async def test_sse_split_anywhere_crlf_pings_and_event_fields(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    events: list[Any] = [": ping", "event: message", "id: 1", "retry: 100"]
    events += stream_events("Über naïve café — done.")
    ollama_peer.enqueue(sse(events, eol="\r\n", piece_bytes=5), path=CHAT)
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.content == "Über naïve café — done."
    assert result.metrics["eval_count"] == 5
    assert result.attempts == 1
    assert 0 < result.first_byte_s <= result.wall_s


async def test_finish_reasons(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    ollama_peer.enqueue(
        reply(finish_reason="length"),
        reply(finish_reason="content_filter"),
        reply(finish_reason=None, usage=None),
        path=CHAT,
    )
    backend = make_backend()
    reasons = [(await backend.chat(chat_request(), keep_alive=None)).done_reason for _ in range(3)]
    assert reasons == ["length", "content_filter", ""]


async def test_missing_done_is_a_broken_stream_not_retried_here(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    """It counts an attempt in the daemon; the client does not hide it with a quick retry."""
    ollama_peer.enqueue(reply(done=False), path=CHAT)
    with pytest.raises(StreamBroken, match=r"without data: \[DONE\].*finish_reason 'stop'"):
        await make_backend(retries=1).chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


async def test_error_event_mid_stream_is_stream_broken(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    events = [*stream_events(done=False)[:2], error, DONE]
    ollama_peer.enqueue(sse(events), path=CHAT)
    with pytest.raises(StreamBroken, match="engine died") as info:
        await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert "after 0 characters" not in str(info.value)
    assert info.value.effect == "attempt" and len(ollama_peer.history) == 1


async def test_llama_server_error_line_and_event_error(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    llama = 'error: {"code": 500, "message": "slot crashed", "type": "server_error"}'
    ollama_peer.enqueue(
        sse([*stream_events(done=False)[:2], llama, DONE]),
        sse(["event: error", json.dumps({"message": "overloaded"}).join(["data: ", ""])]),
        path=CHAT,
    )
    backend = make_backend(retries=0)
    with pytest.raises(StreamBroken, match="slot crashed"):
        await backend.chat(chat_request(), keep_alive=None)
    with pytest.raises(StreamBroken, match="overloaded"):
        await backend.chat(chat_request(), keep_alive=None)


async def test_client_error_in_the_stream_is_not_retried(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    # llama-server rejects an over-long prompt inside a 200 stream.
    too_long = (
        'error: {"code": 400, "message": "the request exceeds the available context size",'
        ' "type": "exceed_context_size_error"}'
    )
    ollama_peer.enqueue(sse([too_long, DONE]), path=CHAT)
    with pytest.raises(BadRequest, match="exceeds the available context size"):
        await make_backend().chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


async def test_garbage_data_line_is_stream_broken(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(sse(["data: {not json", DONE]), path=CHAT)
    with pytest.raises(StreamBroken, match="not a JSON object"):
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)


async def test_json_reply_to_a_stream_request_and_stream_false(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    # A server (or proxy) that ignores stream: true and answers one object.
    ollama_peer.enqueue(json_reply(completion(timings=TIMINGS)), path=CHAT)
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.content == CONTENT and result.done_reason == "stop"
    assert result.metrics["eval_duration"] == 661_064_000
    ollama_peer.enqueue(json_reply(completion(None, finish_reason="length")), path=CHAT)
    result = await make_backend(stream=False).chat(chat_request(), keep_alive=None)
    assert result.content == "" and result.done_reason == "length"
    assert ollama_peer.history[-1].json["stream"] is False
    assert "stream_options" not in ollama_peer.history[-1].json


async def test_non_completion_json_is_a_protocol_error(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(json_reply({"model": MODEL, "done": True}), path=CHAT)
    with pytest.raises(ProtocolError, match=r"did not answer a chat\.completion"):
        await make_backend().chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


async def test_empty_replies_are_broken_streams(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    """A 200 with nothing in it is this request's failure (an attempt), not an outage."""
    ollama_peer.enqueue(raw_status(200, "", content_type="application/json"), sse([]), path=CHAT)
    backend = make_backend(retries=2)
    for _ in range(2):
        with pytest.raises(StreamBroken):
            await backend.chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 2


# ------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("behaviour", "error", "match"),
    [
        (
            openai_error(404, "The model `x` does not exist.", "NotFoundError", 404),
            ModelNotFound,
            "HTTP 404.*does not exist",
        ),
        (
            openai_error(400, "max_tokens must be at least 1", "invalid_request_error"),
            BadRequest,
            "HTTP 400.*max_tokens",
        ),
        (
            openai_error(422, "field required", "BadRequestError", 422),
            BadRequest,
            "HTTP 422",
        ),
        (
            json_reply({"error": "could not find real modelID for x"}, status=400),
            ModelNotFound,
            "could not find real modelID",
        ),
        (
            openai_error(400, "no such model", "invalid_request_error", "model_not_found"),
            ModelNotFound,
            "no such model",
        ),
        (
            json_reply(
                {"object": "error", "message": "old vLLM", "type": "BadRequestError", "code": 400},
                status=400,
            ),
            BadRequest,
            "old vLLM",
        ),
        (
            openai_error(401, "Unauthorized", "authentication_error"),
            BadRequest,
            "api_key_env",
        ),
        (raw_status(404, "404 page not found"), ModelNotFound, "OpenAI-compatible server"),
    ],
)
async def test_client_errors_are_not_retried(
    ollama_peer: OllamaPeer,
    make_backend: MakeBackend,
    behaviour: Behaviour,
    error: type[Exception],
    match: str,
) -> None:
    ollama_peer.enqueue(behaviour, path=CHAT)
    with pytest.raises(error, match=match):
        await make_backend().chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        openai_error(429, "rate limited", "rate_limit_error"),
        json_reply(
            {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
            status=503,
        ),
        raw_status(502, "<html>bad gateway</html>", content_type="text/html"),
        drop_before(),
    ],
)
async def test_outages_are_retried_then_succeed(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, behaviour: Behaviour
) -> None:
    ollama_peer.enqueue(behaviour, behaviour, reply(), path=CHAT)
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.attempts == 3 and result.content == CONTENT


async def test_a_500_counts_an_attempt_and_is_not_retried_here(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(openai_error(500, "boom", "server_error"), path=CHAT)
    with pytest.raises(ServerError, match="boom") as info:
        await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert info.value.effect == "attempt" and len(ollama_peer.history) == 1


async def test_outage_gives_up_as_backend_unavailable(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(*[openai_error(503, "Loading model", "unavailable_error")] * 3, path=CHAT)
    with (
        capture_logs() as logs,
        pytest.raises(BackendUnavailable, match=r"HTTP 503.*Loading model") as info,
    ):
        await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert "gave up after 3 tries" in "".join(info.value.__notes__)
    assert [e["attempt"] for e in logs if e["event"] == "backend_call_retried"] == [1, 2]


async def test_cut_is_transient_and_stall_mid_stream_is_a_read_timeout(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    partial = stream_events(done=False)[:2]
    ollama_peer.enqueue(sse(partial, abort=True), sse(partial, stall_s=5.0), path=CHAT)
    backend = make_backend(retries=0, read_timeout_s=0.2)
    with pytest.raises(BackendUnavailable, match="stream cut after output started"):
        await backend.chat(chat_request(), keep_alive=None)
    with pytest.raises(ReadTimeout, match="after output started"):
        await backend.chat(chat_request(), keep_alive=None)


async def test_connection_refused_is_backend_unavailable(make_backend: MakeBackend) -> None:
    backend = make_backend(url="http://127.0.0.1:9", retries=1)
    with pytest.raises(BackendUnavailable, match="connection failed"):
        await backend.chat(chat_request(), keep_alive=None)


# ------------------------------------------------- load, unload, probes


async def test_load_checks_the_model_list(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(models_reply("a", MODEL), models_reply("a", "b"), path=MODELS)
    backend = make_backend()
    result = await backend.load(MODEL, keep_alive="30m")
    assert result.model == MODEL and result.load_duration_ns == 0 and result.wall_s > 0
    with pytest.raises(ModelNotFound, match=r"not served here \(/v1/models lists a, b\)"):
        await backend.load(MODEL, keep_alive=None)
    assert [(r.method, r.path) for r in ollama_peer.history] == [("GET", MODELS)] * 2


async def test_load_retries_an_outage(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    ollama_peer.enqueue(openai_error(503, "Loading model", "unavailable_error"), path=MODELS)
    ollama_peer.enqueue(models_reply(MODEL), path=MODELS)
    assert (await make_backend().load(MODEL, keep_alive=None)).model == MODEL


async def test_unload_and_ps_send_nothing(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    backend = make_backend()
    await backend.unload(MODEL)
    assert await backend.ps() is None  # these servers do not say what is resident
    await backend.close()
    assert ollama_peer.history == []


async def test_version_probe_and_url_with_v1(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(
        models_reply(MODEL, owned_by="vllm"),
        json_reply({"object": "list", "data": []}),
        json_reply({"models": []}),
        path=MODELS,
    )
    backend = make_backend(url=ollama_peer.url + "/v1/")
    assert backend.url == ollama_peer.url
    assert await backend.version() == "openai (vllm)"
    assert await backend.version() == "openai"
    with pytest.raises(ProtocolError, match="did not answer a model list"):
        await backend.version()
    ollama_peer.enqueue(models_reply(MODEL), path=MODELS)
    assert [m["id"] for m in await backend._models_once(backend._timeout)] == [MODEL]
