"""The simulator's OpenAI-compatible endpoints, over real HTTP on 127.0.0.1.

Raw shapes first (SSE chunks, ``chat.completion``, ``/v1/models``, OpenAI
error bodies), then the same server through ``OpenAIBackend``: the engine,
request log and faults are the ones the Ollama endpoints use.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from http_fixtures import (
    SimFactory,
    http_fixture,  # noqa: F401  (provides the http fixture)
    msgs,
    session_fixture,  # noqa: F401  (provides the session fixture)
    sims,
)

from ihld.backends.base import (
    BackendUnavailable,
    BadRequest,
    ChatRequest,
    ModelNotFound,
    ServerError,
    StreamBroken,
)
from ihld.backends.http import ReadTimeout
from ihld.backends.openai import OpenAIBackend
from ihld.backends.settings import BackendConfig
from ihld.sim import Faults, SimHandle

QWEN = "qwen2.5:7b"
GEMMA = "gemma2:9b"
CHAT = "/v1/chat/completions"


@pytest.fixture
async def sim() -> AsyncIterator[SimFactory]:
    async with sims(speed=200.0) as make:
        yield make


def backend(sim: SimHandle, session: aiohttp.ClientSession, **cfg: Any) -> OpenAIBackend:
    settings: dict[str, Any] = {"retries": 2, "read_timeout_s": 5.0, "connect_timeout_s": 2.0}
    settings.update(cfg)
    config = BackendConfig(name="sim", url=sim.url + "/v1", kind="openai", **settings)
    return OpenAIBackend(config, session, backoff_base_s=0.001, backoff_cap_s=0.004)


async def sse(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, str, list[Any]]:
    """POST and return status, content type and the SSE data payloads (JSON, or "[DONE]")."""
    async with http.post(url, json=body) as resp:
        text = await resp.text()
        ctype = resp.headers.get("Content-Type", "")
    if not ctype.startswith("text/event-stream"):
        return resp.status, ctype, [json.loads(text)]
    events = [e for e in text.split("\n\n") if e.strip()]
    out: list[Any] = []
    for event in events:
        assert event.startswith("data: "), event
        data = event[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return resp.status, ctype, out


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


# --- wire shapes -----------------------------------------------------------------


async def test_models_lists_the_profile(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim()
    listing = await get_json(http, s.url + "/v1/models")
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [QWEN, GEMMA]
    for m in listing["data"]:
        assert set(m) == {"id", "object", "created", "owned_by"}
        assert m["object"] == "model" and isinstance(m["created"], int)


async def test_stream_is_sse_chunks_usage_then_done(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim()
    body = {
        "model": QWEN,
        "messages": msgs("x" * 400),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, ctype, events = await sse(http, s.url + CHAT, body)
    assert status == 200 and ctype.startswith("text/event-stream")
    *chunks, finish, usage, done = events
    assert done == "[DONE]"
    assert chunks and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for c in [*chunks, finish, usage]:
        assert c["object"] == "chat.completion.chunk" and c["model"] == QWEN
        assert c["id"] == chunks[0]["id"]
    for c in [*chunks, finish]:
        assert c["usage"] is None  # null on every chunk but the last, as OpenAI
        (choice,) = c["choices"]
        assert choice["index"] == 0
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert usage["usage"] == {
        "prompt_tokens": 100,  # 400 characters / 4, the Ollama cost model
        "completion_tokens": len(text.split()),
        "total_tokens": 100 + len(text.split()),
    }
    # The same engine and output model as /api/chat: the same request, the same text.
    async with http.post(
        s.url + "/api/chat", json={"model": QWEN, "messages": msgs("x" * 400), "stream": False}
    ) as resp:
        assert (await resp.json())["message"]["content"] == text


async def test_stream_without_include_usage_has_no_usage(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim()
    _, _, events = await sse(
        http, s.url + CHAT, {"model": QWEN, "messages": msgs("hi"), "stream": True}
    )
    *chunks, finish, done = events
    assert done == "[DONE]" and finish["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in [*chunks, finish])


async def test_non_stream_is_one_chat_completion_with_usage_and_length(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim()
    body = {"model": GEMMA, "messages": msgs("why?"), "max_tokens": 7, "seed": 3}
    status, ctype, (obj,) = await sse(http, s.url + CHAT, body)
    assert status == 200 and ctype.startswith("application/json")
    assert obj["object"] == "chat.completion" and obj["model"] == GEMMA
    (choice,) = obj["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 7
    assert obj["usage"] == {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8}
    # max_completion_tokens is the newer name for the same limit.
    body = {"model": GEMMA, "messages": msgs("why?"), "max_completion_tokens": 7, "seed": 3}
    _, _, (again,) = await sse(http, s.url + CHAT, body)
    assert again["choices"][0]["message"] == choice["message"]


@pytest.mark.parametrize(
    ("response_format", "check"),
    [
        ({"type": "json_object"}, lambda v: isinstance(v, dict)),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "stage",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
                        "required": ["score"],
                    },
                },
            },
            lambda v: set(v) == {"score"} and 1 <= v["score"] <= 5,
        ),
    ],
)
async def test_response_format_gives_json(
    sim: SimFactory,
    http: aiohttp.ClientSession,
    response_format: dict[str, Any],
    check: Callable[[Any], bool],
) -> None:
    s = await sim(profile="instant")
    body = {"model": QWEN, "messages": msgs("rate it"), "response_format": response_format}
    _, _, (obj,) = await sse(http, s.url + CHAT, body)
    assert check(json.loads(obj["choices"][0]["message"]["content"]))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([1, 2], "must be a JSON object"),
        ({"messages": msgs("x")}, "model"),
        ({"model": QWEN}, "'messages' must be a non-empty array"),
        ({"model": QWEN, "messages": []}, "'messages' must be a non-empty array"),
        ({"model": QWEN, "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": QWEN, "messages": msgs("x"), "stream": "yes"}, "'stream' must be a boolean"),
        (
            {"model": QWEN, "messages": msgs("x"), "stream_options": {"include_usage": True}},
            "only allowed when 'stream' is true",
        ),
        ({"model": QWEN, "messages": msgs("x"), "max_tokens": 0}, "'max_tokens' must be >= 1"),
        ({"model": QWEN, "messages": msgs("x"), "response_format": {"type": "xml"}}, "type"),
        ({"model": QWEN, "messages": msgs("x"), "n": 2}, "n = 1"),
    ],
)
async def test_bad_requests_are_openai_400s(
    sim: SimFactory, http: aiohttp.ClientSession, body: Any, fragment: str
) -> None:
    s = await sim(profile="instant")
    async with http.post(s.url + CHAT, json=body) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert fragment in err["message"]
    assert err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}


async def test_unknown_model_is_404_model_not_found(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim()
    async with http.post(s.url + CHAT, json={"model": "nope", "messages": msgs("x")}) as resp:
        assert resp.status == 404
        err = (await resp.json())["error"]
    assert err["code"] == "model_not_found" and "`nope`" in err["message"]
    log = await get_json(http, s.url + "/sim/requests")
    assert [(r["model"], r["status"]) for r in log] == [("nope", 404)]


# --- shared engine ------------------------------------------------------------------


async def test_openai_requests_load_implicitly_and_share_the_engine(
    sim: SimFactory, http: aiohttp.ClientSession, session: aiohttp.ClientSession
) -> None:
    s = await sim(profile="laptop-6gb-4slot")
    b = backend(s, session)
    # A resident model loaded through the Ollama API serves OpenAI requests too.
    async with http.post(s.url + "/api/chat", json={"model": QWEN}) as resp:
        assert (await resp.json())["done_reason"] == "load"
    results = [
        await b.chat(ChatRequest(model=QWEN, messages=msgs(f"q{i}")), keep_alive=None)
        for i in range(2)
    ]
    assert all(r.done_reason == "stop" and r.content for r in results)
    stats = await get_json(http, s.url + "/sim/stats")
    assert stats["loads"] == {QWEN: 1}
    # A model that is not resident is loaded on demand, evicting the other (max_loaded 1).
    await b.chat(ChatRequest(model=GEMMA, messages=msgs("g")), keep_alive=None)
    stats = await get_json(http, s.url + "/sim/stats")
    assert stats["loads"] == {QWEN: 1, GEMMA: 1} and stats["unloads"] == {QWEN: 1}


async def test_parallel_openai_streams_share_the_slots(
    sim: SimFactory, http: aiohttp.ClientSession, session: aiohttp.ClientSession
) -> None:
    s = await sim(profile="laptop-6gb-4slot", speed=100.0)
    b = backend(s, session)
    await asyncio.gather(
        *(
            b.chat(ChatRequest(model=QWEN, messages=msgs(f"p{i}")), keep_alive=None)
            for i in range(6)
        )
    )
    stats = await get_json(http, s.url + "/sim/stats")
    assert stats["max_concurrent"] == {QWEN: 4}


async def test_client_against_sim_records_usage_and_task(
    sim: SimFactory, http: aiohttp.ClientSession, session: aiohttp.ClientSession
) -> None:
    s = await sim()
    b = backend(s, session)
    assert await b.version() == "openai (ihld-sim)"
    load = await b.load(QWEN, keep_alive="30m")
    assert load.model == QWEN and load.load_duration_ns == 0
    with pytest.raises(ModelNotFound, match="not served here"):
        await b.load("llama3.2:3b", keep_alive=None)
    request = ChatRequest(model=QWEN, messages=msgs("x" * 40), options={"num_predict": 5})
    result = await b.chat(request, keep_alive="30m", task_tag="job-1/draft/1")
    assert result.done_reason == "length" and len(result.content.split()) == 5
    durations = {k: result.metrics.pop(k) for k in ("prompt_eval_duration", "eval_duration")}
    assert all(ns > 0 for ns in durations.values())  # from the sim's llama-server timings
    assert result.metrics == {
        "prompt_eval_count": 10,
        "eval_count": 5,
        "usage_prompt_tokens": 10,
        "usage_completion_tokens": 5,
        "usage_total_tokens": 15,
        "prompt_evaluated": 10,  # nothing cached yet
        "timings_cache_n": 0,
        "timings_prompt_n": 10,
        "timings_predicted_n": 5,
    }
    log = await get_json(http, s.url + "/sim/requests")
    assert [(r["task"], r["kind"], r["status"], r["completed"]) for r in log] == [
        ("job-1/draft/1", "chat", 200, True)
    ]
    with pytest.raises(ModelNotFound, match="model_not_found"):
        await b.chat(ChatRequest(model="nope", messages=msgs("x")), keep_alive=None)


async def test_stream_false_client_against_sim(
    sim: SimFactory, session: aiohttp.ClientSession
) -> None:
    s = await sim()
    config = BackendConfig(name="sim", url=s.url, kind="openai")
    b = OpenAIBackend(config, session, stream=False)
    fmt = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    result = await b.chat(
        ChatRequest(model=QWEN, messages=msgs("ok?"), format=fmt), keep_alive=None
    )
    assert isinstance(json.loads(result.content)["ok"], bool)
    assert result.done_reason == "stop" and result.metrics["eval_count"] > 0


async def test_stream_false_client_sees_drops_as_outages(
    sim: SimFactory, http: aiohttp.ClientSession, session: aiohttp.ClientSession
) -> None:
    s = await sim(faults=Faults(error_rate=1.0, weights={"drop": 1.0}), seed=1)
    b = OpenAIBackend(
        BackendConfig(name="sim", url=s.url, kind="openai", retries=3),
        session,
        stream=False,
        backoff_base_s=0.001,
        backoff_cap_s=0.004,
    )
    with pytest.raises(BackendUnavailable):
        await b.chat(ChatRequest(model=QWEN, messages=msgs("x")), keep_alive=None)
    log = await get_json(http, s.url + "/sim/requests")
    assert len(log) == 4 and not any(r["completed"] for r in log)
    statuses = {r["status"] for r in log}
    assert statuses <= {None, 200} and 200 in statuses, "seed 1 cuts some bodies mid-way"


# --- faults ---------------------------------------------------------------------------


def only(kind: str, **extra: Any) -> Faults:
    return Faults(error_rate=1.0, weights={kind: 1.0}, **extra)


@pytest.mark.parametrize(("kind", "status"), [("500", 500), ("503", 503)])
async def test_fault_statuses_have_openai_bodies(
    sim: SimFactory, http: aiohttp.ClientSession, kind: str, status: int
) -> None:
    s = await sim(faults=only(kind))
    async with http.post(s.url + CHAT, json={"model": QWEN, "messages": msgs("x")}) as resp:
        assert resp.status == status
        err = (await resp.json())["error"]
    assert err["type"] == "server_error" and err["message"]


async def test_midstream_fault_is_an_error_event_then_done(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(faults=only("midstream"))
    body = {"model": QWEN, "messages": msgs("x"), "stream": True}
    status, _, events = await sse(http, s.url + CHAT, body)
    assert status == 200
    *chunks, error, done = events
    assert chunks and all("choices" in c for c in chunks)
    assert (
        error["error"]["type"] == "server_error" and "unexpected EOF" in error["error"]["message"]
    )
    assert done == "[DONE]"
    async with http.post(s.url + CHAT, json={"model": QWEN, "messages": msgs("x")}) as resp:
        assert resp.status == 500  # not streamed: a real status, as the Ollama endpoint


@pytest.mark.parametrize(
    ("kind", "error", "match", "tries"),
    [
        # transient: the client's quick retries, then it gives up
        ("503", BackendUnavailable, "HTTP 503.*server busy", 3),
        ("drop", BackendUnavailable, None, 3),
        # this try failed: one try, the daemon counts an attempt (docs/backends.md)
        ("500", ServerError, "HTTP 500", 1),
        ("midstream", StreamBroken, "unexpected EOF", 1),
    ],
)
async def test_client_retries_transient_faults_only(
    sim: SimFactory,
    http: aiohttp.ClientSession,
    session: aiohttp.ClientSession,
    kind: str,
    error: Any,
    match: str | None,
    tries: int,
) -> None:
    s = await sim(faults=only(kind))
    b = backend(s, session, retries=2)
    with pytest.raises(error, match=match) as info:
        await b.chat(ChatRequest(model=QWEN, messages=msgs("x")), keep_alive=None)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert ("gave up after 3 tries" in notes) == (tries == 3)
    stats = await get_json(http, s.url + "/sim/stats")
    assert stats["faults_injected"] == {kind: tries}


async def test_client_survives_a_fault_then_succeeds(
    sim: SimFactory, http: aiohttp.ClientSession, session: aiohttp.ClientSession
) -> None:
    s = await sim(faults=Faults(error_rate=0.5, weights={"503": 1.0, "drop": 1.0}), seed=4)
    b = backend(s, session, retries=6)
    results = [
        await b.chat(ChatRequest(model=QWEN, messages=msgs(f"m{i}")), keep_alive=None)
        for i in range(4)
    ]
    assert all(r.done_reason == "stop" for r in results)
    assert sum(r.attempts for r in results) > 4, "seed 4 injects at least one fault"
    log = await get_json(http, s.url + "/sim/requests")
    assert sum(1 for r in log if r["completed"]) == 4


async def test_hang_fault_hits_the_read_timeout(
    sim: SimFactory, session: aiohttp.ClientSession
) -> None:
    s = await sim(faults=only("hang"))
    b = backend(s, session, retries=0, read_timeout_s=0.2)
    with pytest.raises(ReadTimeout, match="no answer within the read timeout"):
        await b.chat(ChatRequest(model=QWEN, messages=msgs("x")), keep_alive=None)


async def test_hang_with_hang_s_is_then_served(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(faults=only("hang", hang_s=0.05))
    body = {"model": QWEN, "messages": msgs("x"), "stream": True}
    status, _, events = await sse(http, s.url + CHAT, body)
    assert status == 200 and events[-1] == "[DONE]"


async def test_bad_request_is_not_retried(
    sim: SimFactory, http: aiohttp.ClientSession, session: aiohttp.ClientSession
) -> None:
    s = await sim()
    b = backend(s, session)
    bad = ChatRequest(model=QWEN, messages=[{"role": "user", "content": 5}])
    with pytest.raises(BadRequest, match="HTTP 400"):
        await b.chat(bad, keep_alive=None)
    log = await get_json(http, s.url + "/sim/requests")
    assert [r["status"] for r in log] == [400]
