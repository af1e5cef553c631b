"""The Ollama client against a scripted peer: wire format, error mapping, retries, timeouts."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from http_fixtures import session_fixture  # noqa: F401  (provides the session fixture)
from ollama_peer import (
    BUSY,
    DEFAULT_CONTENT,
    DEFAULT_METRICS,
    OllamaPeer,
    drop_before,
    drop_mid_body,
    error_mid_stream,
    error_status,
    json_reply,
    load_reply,
    no_done,
    ollama_peer_fixture,  # noqa: F401  (provides the ollama_peer fixture)
    raw_status,
    reply,
    split_reply,
    stall,
    stall_mid_stream,
    unload_reply,
)
from structlog.testing import capture_logs

from ihld.backends.base import (
    OLLAMA_METRICS,
    BackendUnavailable,
    BadRequest,
    ChatRequest,
    LoadFailed,
    ModelNotFound,
    ServerError,
    StreamBroken,
)
from ihld.backends.http import ReadTimeout
from ihld.backends.ollama import (
    TASK_HEADER,
    ModelNotAllowed,
    NdjsonLines,
    OllamaBackend,
    ProtocolError,
    backoff_delay,
    make_session,
)
from ihld.backends.settings import BackendConfig

MODEL = "qwen2.5:7b"
NOT_FOUND = 'model "nope" not found, try pulling it first'
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
]

MakeBackend = Callable[..., OllamaBackend]


@pytest.fixture
def make_backend(ollama_peer: OllamaPeer, session: aiohttp.ClientSession) -> MakeBackend:
    """Backends on the peer, with tiny backoff so retry tests take milliseconds."""

    def make(
        *,
        url: str | None = None,
        backoff_base_s: float = 0.001,
        backoff_cap_s: float = 0.004,
        probe_timeout_s: float = 2.0,
        max_line_bytes: int = 16 * 1024 * 1024,
        **cfg: Any,
    ) -> OllamaBackend:
        settings: dict[str, Any] = {"retries": 3, "read_timeout_s": 5.0, "connect_timeout_s": 2.0}
        settings.update(cfg)
        config = BackendConfig(name="peer", url=url or ollama_peer.url, **settings)
        return OllamaBackend(
            config,
            session,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            probe_timeout_s=probe_timeout_s,
            max_line_bytes=max_line_bytes,
            rng=random.Random(7),
        )

    return make


def chat_request(**kw: Any) -> ChatRequest:
    return ChatRequest(model=kw.pop("model", MODEL), messages=kw.pop("messages", MESSAGES), **kw)


# ------------------------------------------------------------ happy path


async def test_chat_collects_stream_and_metrics(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.content == DEFAULT_CONTENT
    assert result.done_reason == "stop"
    evaluated = DEFAULT_METRICS["prompt_eval_count"]  # Ollama counts what it evaluated
    assert result.metrics == {**DEFAULT_METRICS, "prompt_evaluated": evaluated}
    assert set(result.metrics) == {*OLLAMA_METRICS, "prompt_evaluated"}
    assert all(type(v) is int for v in result.metrics.values())
    assert result.attempts == 1
    assert 0 < result.first_byte_s <= result.wall_s
    assert len(ollama_peer.history) == 1


async def test_minimal_request_body_is_exactly_what_ollama_expects(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    await make_backend().chat(chat_request(), keep_alive=None)
    (rec,) = ollama_peer.history
    assert (rec.method, rec.path) == ("POST", "/api/chat")
    # options empty -> omitted; format/think/keep_alive None -> omitted
    assert rec.json == {"model": MODEL, "messages": MESSAGES, "stream": True}
    assert rec.headers["Content-Type"] == "application/json"
    assert TASK_HEADER not in rec.headers


async def test_full_request_body_and_task_header(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    request = chat_request(
        options={"temperature": 0.2, "num_ctx": 8192, "stop": ["\n\n"]},
        format="json",
        think=False,
    )
    await make_backend().chat(request, keep_alive="10m", task_tag="job-1/critic/2")
    (rec,) = ollama_peer.history
    assert rec.json == {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "options": {"temperature": 0.2, "num_ctx": 8192, "stop": ["\n\n"]},
        "format": "json",
        "think": False,
        "keep_alive": "10m",
    }
    assert rec.headers[TASK_HEADER] == "job-1/critic/2"


async def test_format_schema_and_think_true_pass_through(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    await make_backend().chat(chat_request(format=schema, think=True), keep_alive=None)
    body = ollama_peer.history[0].json
    assert body["format"] == schema
    assert body["think"] is True


@pytest.mark.parametrize(
    ("keep_alive", "wire"),
    [(300, 300), (1800.0, 1800), (0.5, 0.5), (-1, -1), ("-1m", "-1m"), ("0", "0"), (0, 0)],
)
async def test_keep_alive_wire_forms(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, keep_alive: Any, wire: Any
) -> None:
    await make_backend().chat(chat_request(), keep_alive=keep_alive)
    sent = ollama_peer.history[0].json["keep_alive"]
    assert sent == wire
    assert type(sent) is type(wire)


@pytest.mark.parametrize("keep_alive", ["3600", "-1", "1d", True])
async def test_invalid_keep_alive_is_a_bad_request_and_nothing_is_sent(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, keep_alive: Any
) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        await make_backend().chat(chat_request(), keep_alive=keep_alive)
    assert ollama_peer.history == []


async def test_unserialisable_request_is_a_bad_request(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    with pytest.raises(BadRequest, match="JSON"):
        await make_backend().chat(chat_request(options={"temperature": math.nan}), keep_alive=None)
    assert ollama_peer.history == []


async def test_missing_metrics_read_as_zero(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    # Go's Metrics fields are omitempty: absent means zero.
    ollama_peer.enqueue(reply(metrics={"eval_count": 3}))
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.metrics == {
        **{k: (3 if k == "eval_count" else 0) for k in OLLAMA_METRICS},
        "prompt_evaluated": 0,
    }


async def test_first_byte_and_wall_time(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    ollama_peer.enqueue(reply(chunks=3, first_delay_s=0.15, delay_s=0.05))
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert 0.14 <= result.first_byte_s < 1.0
    assert result.wall_s >= result.first_byte_s + 0.09


async def test_lines_split_across_writes(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    text = 'Lines arrive in ragged pieces: ünïcödé ✓ and "quotes"\n too.'
    ollama_peer.enqueue(split_reply(text, piece_bytes=5))
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.content == text
    assert result.done_reason == "stop"


async def test_very_long_line(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    text = "x" * (2 * 1024 * 1024)  # far beyond aiohttp readline's 128 KiB
    ollama_peer.enqueue(reply(text, chunks=1))
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.content == text


async def test_line_over_the_limit_is_a_protocol_error_not_retried(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(reply("y" * 10_000, chunks=1))
    with pytest.raises(ProtocolError, match="exceeds 4096 bytes"):
        await make_backend(max_line_bytes=4096).chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


async def test_done_reason_length_is_returned_as_is(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(reply("cut off mid", done_reason="length"))
    result = await make_backend().chat(chat_request(), keep_alive=None)
    assert result.done_reason == "length"
    assert result.content == "cut off mid"


# ----------------------------------------------------- errors, no retry


async def test_404_is_model_not_found_and_not_retried(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(error_status(404, NOT_FOUND))
    with pytest.raises(ModelNotFound) as info:
        await make_backend(retries=3).chat(chat_request(model="nope"), keep_alive=None)
    assert NOT_FOUND in str(info.value)
    assert info.value.retryable is False
    assert len(ollama_peer.history) == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, 'invalid duration "3600"'),
        (400, '"gemma2" does not support thinking'),
        (413, "request too large"),
        (499, "request canceled"),
    ],
)
async def test_4xx_is_bad_request_and_not_retried(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, status: int, message: str
) -> None:
    ollama_peer.enqueue(error_status(status, message))
    with pytest.raises(BadRequest) as info:
        await make_backend(retries=3).chat(chat_request(), keep_alive=None)
    assert message in str(info.value)
    assert f"HTTP {status}" in str(info.value)
    assert len(ollama_peer.history) == 1


async def test_redirect_is_not_followed(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    ollama_peer.enqueue(raw_status(307, "moved"))
    with pytest.raises(BadRequest, match="check the backend url"):
        await make_backend().chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


# ------------------------------------------------------- retried errors


@pytest.mark.parametrize(
    "failure",
    [
        error_status(503, BUSY),
        error_status(429, "too many requests"),
        error_status(408, "request timeout"),
        raw_status(502, "<html>Bad Gateway</html>", content_type="text/html"),
        drop_before(),
        drop_mid_body(),
    ],
    ids=lambda b: b.name,
)
async def test_transient_failure_then_success(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, failure: Any
) -> None:
    ollama_peer.enqueue(failure)
    result = await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert result.content == DEFAULT_CONTENT
    assert result.attempts == 2
    assert len(ollama_peer.history) == 2
    assert ollama_peer.history[0].json == ollama_peer.history[1].json


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (error_status(500, "llama runner process has terminated: signal: killed"), ServerError),
        (error_mid_stream("an error was encountered while running the model: EOF"), StreamBroken),
        (no_done(), StreamBroken),  # Ollama's token-repeat abort ends a stream like this
    ],
    ids=["500", "error_mid_stream", "no_done"],
)
async def test_a_failed_try_is_not_retried_by_the_client(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, failure: Any, error: type
) -> None:
    """It counts one of the stage's attempts in the daemon (docs/backends.md)."""
    ollama_peer.enqueue(failure)
    with pytest.raises(error) as info:
        await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert info.value.effect == "attempt"
    assert len(ollama_peer.history) == 1


@pytest.mark.parametrize(
    ("message", "error", "effect"),
    [
        ("model requires more system memory (9.1 GiB) than is available (4.0 GiB)",
         LoadFailed, "model"),
        ("unable to load model: /models/blob", LoadFailed, "model"),
        ('invalid format: "yaml"; expected "json" or a valid JSON Schema object',
         BadRequest, "stage"),
    ],
)
async def test_permanent_500s_are_named_by_their_text(
    ollama_peer: OllamaPeer, make_backend: MakeBackend, message: str, error: type, effect: str
) -> None:
    ollama_peer.enqueue(error_status(500, message))
    with pytest.raises(error) as info:
        await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert info.value.effect == effect
    assert len(ollama_peer.history) == 1


async def test_retries_back_off(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    ollama_peer.enqueue(error_status(503, BUSY), error_status(503, BUSY))
    backend = make_backend(retries=3, backoff_base_s=0.06, backoff_cap_s=0.06)
    t0 = time.monotonic()
    with capture_logs() as logs:
        result = await backend.chat(chat_request(), keep_alive=None)
    assert result.attempts == 3
    assert time.monotonic() - t0 >= 0.06  # two waits, each at least half of 0.06
    retried = [e for e in logs if e["event"] == "backend_call_retried"]
    assert [e["attempt"] for e in retried] == [1, 2]
    assert retried[0]["backend"] == "peer"
    assert retried[0]["error_kind"] == "backend_unavailable"


async def test_retries_exhausted_reraise_last_error(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(*[error_status(503, BUSY)] * 3)
    with pytest.raises(BackendUnavailable) as info:
        await make_backend(retries=2).chat(chat_request(), keep_alive=None)
    assert BUSY in str(info.value)
    assert "HTTP 503" in str(info.value)
    assert info.value.retryable is True
    assert "gave up after 3 tries" in info.value.__notes__
    assert len(ollama_peer.history) == 3
    assert ollama_peer.pending == 0


async def test_no_retries_configured_means_one_try(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(error_status(503, BUSY))
    with pytest.raises(BackendUnavailable, match="server busy"):
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)
    assert len(ollama_peer.history) == 1


async def test_drop_before_output_is_backend_unavailable(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(drop_before())
    with pytest.raises(BackendUnavailable, match="connection failed"):
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)


async def test_drop_mid_body_is_transient(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    """A cut connection is the server's (a crash, a restart): retried, no attempt counted."""
    ollama_peer.enqueue(drop_mid_body())
    with pytest.raises(BackendUnavailable, match="stream cut after output started") as info:
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)
    assert info.value.retryable is True


async def test_error_line_mid_stream_is_stream_broken(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    message = "an error was encountered while running the model: CUDA error: out of memory"
    ollama_peer.enqueue(error_mid_stream(message))
    with pytest.raises(StreamBroken) as info:
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)
    assert message in str(info.value)
    assert info.value.kind == "stream_error"


async def test_stream_without_done_is_stream_broken(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(no_done())
    with pytest.raises(StreamBroken, match="without a done object"):
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)


async def test_garbage_line_is_stream_broken(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(raw_status(200, "this is not json\n", content_type="application/x-ndjson"))
    with pytest.raises(StreamBroken, match="not JSON"):
        await make_backend(retries=0).chat(chat_request(), keep_alive=None)


# ------------------------------------------------------------- timeouts


async def test_hang_before_output_times_out_within_read_timeout(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(stall(30))
    with pytest.raises(ReadTimeout, match="before any output") as info:
        await make_backend(retries=2, read_timeout_s=0.2).chat(chat_request(), keep_alive=None)
    assert info.value.effect == "attempt"  # a server that never answers costs an attempt
    assert len(ollama_peer.history) == 1


async def test_hang_mid_stream_is_a_read_timeout(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(stall_mid_stream(30))
    with pytest.raises(ReadTimeout, match="after output started"):
        await make_backend(retries=0, read_timeout_s=0.2).chat(chat_request(), keep_alive=None)


async def test_first_byte_allowance_outlasts_the_idle_read_timeout(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    """A request held at the server (a prefetched one waiting for a slot, or a load) may
    take longer than read_timeout_s to its first byte; after it, read_timeout_s applies."""
    ollama_peer.enqueue(stall(0.4))
    backend = make_backend(retries=0, read_timeout_s=0.2)
    result = await backend.chat(chat_request(), keep_alive=None, first_byte_s=5.0)
    assert result.content == DEFAULT_CONTENT
    ollama_peer.enqueue(stall(30))
    with pytest.raises(ReadTimeout):
        await backend.chat(chat_request(), keep_alive=None, first_byte_s=0.3)


async def test_slow_but_steady_stream_is_not_a_timeout(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    # sock_read bounds the silence between chunks, not the whole generation.
    ollama_peer.enqueue(reply("a b c d e f", chunks=6, delay_s=0.1))
    backend = make_backend(retries=0, read_timeout_s=0.3)
    result = await backend.chat(chat_request(), keep_alive=None)
    assert result.wall_s > 0.4
    assert result.content == "a b c d e f"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_connection_refused_is_backend_unavailable_after_retries(
    make_backend: MakeBackend,
) -> None:
    backend = make_backend(url=f"http://127.0.0.1:{_closed_port()}", retries=2)
    with capture_logs() as logs, pytest.raises(BackendUnavailable, match="connection failed"):
        await backend.chat(chat_request(), keep_alive=None)
    assert len([e for e in logs if e["event"] == "backend_call_retried"]) == 2


async def test_cancel_propagates(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    # A stage deadline cancels the call: it must not be turned into a retry.
    ollama_peer.enqueue(stall(30))
    task = asyncio.create_task(make_backend().chat(chat_request(), keep_alive=None))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(ollama_peer.history) == 1


# -------------------------------------------------------- load / unload


async def test_load_body_and_result(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    result = await make_backend().load(MODEL, keep_alive="30m")
    (rec,) = ollama_peer.history
    assert rec.path == "/api/chat"
    assert rec.json == {"model": MODEL, "messages": [], "stream": False, "keep_alive": "30m"}
    assert result.model == MODEL
    assert result.load_duration_ns == 0  # Ollama's load reply carries no metrics
    assert result.wall_s > 0


async def test_load_takes_load_duration_when_present(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(load_reply(load_duration_ns=4_200_000_000))
    result = await make_backend().load(MODEL, keep_alive=None)
    assert result.load_duration_ns == 4_200_000_000
    assert "keep_alive" not in ollama_peer.history[0].json


async def test_load_with_keep_alive_zero_would_unload(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    with pytest.raises(BadRequest, match="would unload"):
        await make_backend().load(MODEL, keep_alive="0s")
    assert ollama_peer.history == []


async def test_load_expects_done_reason_load(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(reply("not a load"))
    with pytest.raises(ProtocolError, match="expected done_reason 'load'"):
        await make_backend().load(MODEL, keep_alive=-1)
    assert len(ollama_peer.history) == 1


async def test_load_error_rules(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    ollama_peer.enqueue(error_status(503, BUSY), drop_before())
    result = await make_backend(retries=2).load(MODEL, keep_alive=-1)
    assert result.model == MODEL
    assert len(ollama_peer.history) == 3
    ollama_peer.enqueue(error_status(404, NOT_FOUND))
    with pytest.raises(ModelNotFound):
        await make_backend(retries=2).load("nope", keep_alive=-1)
    assert len(ollama_peer.history) == 4


async def test_unload_body_and_reply(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    await make_backend().unload(MODEL)
    (rec,) = ollama_peer.history
    assert rec.json == {"model": MODEL, "messages": [], "keep_alive": 0, "stream": False}


async def test_unload_expects_done_reason_unload(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(load_reply())
    with pytest.raises(ProtocolError, match="expected done_reason 'unload'"):
        await make_backend().unload(MODEL)


async def test_unload_retries_then_succeeds(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(error_status(503, BUSY), unload_reply())
    await make_backend(retries=1).unload(MODEL)
    assert len(ollama_peer.history) == 2


# -------------------------------------------------------- read-only API


async def test_ps_tags_version(ollama_peer: OllamaPeer, make_backend: MakeBackend) -> None:
    loaded = {
        "name": MODEL,
        "model": MODEL,
        "size": 6_000_000_000,
        "digest": "abc",
        "details": {"family": "qwen2"},
        "expires_at": "2030-01-01T00:00:00Z",
        "size_vram": 5_000_000_000,
        "context_length": 4096,
    }
    ollama_peer.ps_models = [loaded]
    ollama_peer.tags_models = [{"name": MODEL, "model": MODEL, "size": 1}, {"name": "gemma2"}]
    backend = make_backend()
    assert await backend.ps() == [loaded]
    assert [m["name"] for m in await backend.tags()] == [MODEL, "gemma2"]
    assert await backend.version() == "0.12.0"
    assert [(r.method, r.path) for r in ollama_peer.history] == [
        ("GET", "/api/ps"),
        ("GET", "/api/tags"),
        ("GET", "/api/version"),
    ]


async def test_ps_retries_and_checks_shape(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(error_status(503, BUSY), path="/api/ps")
    assert await make_backend(retries=1).ps() == []
    ollama_peer.enqueue(json_reply({"loaded": []}), path="/api/ps")
    with pytest.raises(ProtocolError, match="models list"):
        await make_backend().ps()


async def test_version_probe_is_one_short_try(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(error_status(503, "down"), path="/api/version")
    with pytest.raises(BackendUnavailable, match="down"):
        await make_backend(retries=3).version()
    assert len(ollama_peer.requests("/api/version")) == 1

    ollama_peer.enqueue(stall(30), path="/api/version")
    with pytest.raises(ReadTimeout):  # the probe's own short timeout, not read_timeout_s
        await make_backend(probe_timeout_s=0.2, read_timeout_s=30).version()
    assert len(ollama_peer.requests("/api/version")) == 2


async def test_version_of_something_else(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    ollama_peer.enqueue(raw_status(200, "<html>router login</html>"), path="/api/version")
    with pytest.raises(ProtocolError, match="JSON object"):
        await make_backend().version()


async def test_close_leaves_the_shared_session_open(
    make_backend: MakeBackend, session: aiohttp.ClientSession
) -> None:
    backend = make_backend()
    await backend.close()
    assert not session.closed
    assert await backend.version() == "0.12.0"


# ----------------------------------------------------------- allow-list


async def test_allow_list_refuses_before_sending(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    backend = make_backend(models=[MODEL, "llama3"])
    with pytest.raises(ModelNotAllowed, match="allow-list") as info:
        await backend.chat(chat_request(model="gemma2"), keep_alive=None)
    assert isinstance(info.value, ModelNotFound)
    assert info.value.retryable is False
    with pytest.raises(ModelNotAllowed):
        await backend.load("gemma2:9b", keep_alive="5m")
    assert ollama_peer.history == []


async def test_allow_list_matches_ollama_names(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    backend = make_backend(models=[MODEL, "llama3"])
    for name in (MODEL, "QWEN2.5:7B", "llama3", "llama3:latest"):
        await backend.chat(chat_request(model=name), keep_alive=None)
    with pytest.raises(ModelNotAllowed):
        await backend.chat(chat_request(model="llama3:8b"), keep_alive=None)
    # Unload is exempt: freeing memory held by any model is the scheduler's right.
    await backend.unload("gemma2")
    assert len(ollama_peer.history) == 5


# ------------------------------------------------------ session, helpers


async def test_make_session_settings() -> None:
    s = make_session()
    try:
        assert s.timeout.total is None
        connector = s.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit >= 256
        assert connector.limit_per_host == 0 or connector.limit_per_host >= 64
    finally:
        await s.close()


async def test_per_request_timeouts(make_backend: MakeBackend) -> None:
    backend = make_backend(connect_timeout_s=3.0, read_timeout_s=42.0)
    timeout = backend._timeout
    assert timeout.total is None
    assert timeout.connect == timeout.sock_connect == 3.0
    assert timeout.sock_read == 42.0


async def test_many_concurrent_chats_share_the_session(
    ollama_peer: OllamaPeer, make_backend: MakeBackend
) -> None:
    # More than aiohttp's default per-host cap would allow at once without queueing.
    for _ in range(80):
        ollama_peer.enqueue(reply(first_delay_s=0.3))
    backend = make_backend(retries=0, slots=80)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(backend.chat(chat_request(), keep_alive=None) for _ in range(80))
    )
    assert all(r.content == DEFAULT_CONTENT for r in results)
    assert time.monotonic() - t0 < 2.0  # they ran side by side, not 80 x 0.3 s


def test_backoff_delay_grows_with_jitter_and_cap() -> None:
    rng = random.Random(1)
    for retry, ceiling in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 5.0), (20, 5.0)]:
        samples = [backoff_delay(retry, base_s=0.25, cap_s=5.0, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in samples)
        assert len(set(samples)) > 1  # jittered


def test_ndjson_lines_reassembles_any_chunking() -> None:
    data = b'{"a":1}\n\n{"b":"x\xc3\xa9"}\r\n{"c":3}'
    for size in (1, 2, 3, 7, len(data)):
        lines = NdjsonLines()
        out: list[bytes] = []
        for i in range(0, len(data), size):
            out += lines.feed(data[i : i + size])
        out += lines.finish()
        assert out == [b'{"a":1}', b'{"b":"x\xc3\xa9"}', b'{"c":3}']


def test_ndjson_lines_limit() -> None:
    lines = NdjsonLines(max_line_bytes=10)
    assert lines.feed(b"0123456789\n") == [b"0123456789"]
    with pytest.raises(ValueError, match="exceeds 10 bytes"):
        lines.feed(b"0123456789X")
