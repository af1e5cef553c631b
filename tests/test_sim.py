"""The Ollama simulator against a real aiohttp client on 127.0.0.1.

Every test starts its own simulator on port 0 at a high speed factor, so a
"2 s" model load takes a few tens of milliseconds; durations asserted here
are converted back to simulated seconds with that factor.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from http_fixtures import (
    SimFactory,
    http_fixture,  # noqa: F401  (provides the http fixture)
    msgs,
    sims,
)

from ihld.sim import PROFILES, Faults, Profile, SimHandle, build_app, get_profile
from ihld.sim.api import go_time
from ihld.sim.durations import DurationError, parse_go_duration, parse_keep_alive
from ihld.sim.output import plan_output, request_key

QWEN = "qwen2.5:7b"
GEMMA = "gemma2:9b"
LLAMA = "llama3.2:3b"
BUSY = "server busy, please try again.  maximum pending requests exceeded"


@pytest.fixture
async def sim() -> AsyncIterator[SimFactory]:
    """Start simulators (default laptop-6gb at speed 100); all closed at teardown."""
    async with sims(speed=100.0) as make:
        yield make


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **kwargs: Any
) -> tuple[int, str, list[dict[str, Any]]]:
    """POST and return status, content type and the parsed NDJSON/JSON objects."""
    async with http.post(url, json=body, **kwargs) as resp:
        text = await resp.text()
        objs = [json.loads(line) for line in text.splitlines() if line.strip()]
        return resp.status, resp.headers.get("Content-Type", ""), objs


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


async def chat(
    http: aiohttp.ClientSession,
    sim: SimHandle,
    model: str,
    text: str = "hello",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A non-streamed chat that must succeed; returns the response object."""
    body = {"model": model, "messages": msgs(text), "stream": False, **extra}
    status, _, objs = await post(http, sim.url + "/api/chat", body, headers=headers)
    assert status == 200, objs
    return objs[0]


async def ps_names(http: aiohttp.ClientSession, sim: SimHandle) -> list[str]:
    return [m["name"] for m in (await get_json(http, sim.url + "/api/ps"))["models"]]


async def stats(http: aiohttp.ClientSession, sim: SimHandle) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(http, sim.url + "/sim/stats")
    return result


METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


# --- wire shapes -----------------------------------------------------------------


async def test_chat_streams_ndjson_chunks_then_final_metrics_in_ns(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(speed=50)
    began = time.monotonic()
    status, ctype, objs = await post(
        http, s.url + "/api/chat", {"model": QWEN, "messages": msgs("x" * 400)}
    )
    wall_ns = (time.monotonic() - began) * 1e9
    assert status == 200
    assert ctype.startswith("application/x-ndjson")
    *chunks, final = objs
    assert chunks, "content comes in chunks before the final object"
    for c in chunks:
        assert set(c) == {"model", "created_at", "message", "done"}
        assert c["done"] is False and c["model"] == QWEN
        assert c["message"]["role"] == "assistant"
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    for key in METRICS:
        assert isinstance(final[key], int) and final[key] > 0, key
    text = "".join(c["message"]["content"] for c in chunks)
    assert len(text.split()) == final["eval_count"]  # one word per token
    assert final["prompt_eval_count"] == 100  # 400 characters / 4
    # Nanoseconds, measured by the server: the whole is the wall time we saw.
    assert final["total_duration"] <= wall_ns
    assert final["total_duration"] > 0.5 * wall_ns
    parts = final["load_duration"] + final["prompt_eval_duration"] + final["eval_duration"]
    assert parts <= final["total_duration"]
    # The first request loads qwen2.5:7b: 2.0 s simulated, 40 ms at speed 50.
    assert final["load_duration"] * 50 / 1e9 == pytest.approx(2.0, rel=0.25)
    rate = final["eval_count"] / final["eval_duration"] * 1e9 / 50
    assert rate == pytest.approx(89.4, rel=0.15)
    datetime.fromisoformat(final["created_at"].replace("Z", "+00:00"))


async def test_generate_stream_false_is_one_object(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim()
    status, ctype, objs = await post(
        http, s.url + "/api/generate", {"model": GEMMA, "prompt": "why?", "stream": False}
    )
    assert status == 200 and ctype.startswith("application/json")
    (obj,) = objs
    assert obj["done"] is True and obj["done_reason"] == "stop"
    assert obj["response"] and obj["response"].endswith(".")
    assert isinstance(obj["context"], list) and obj["context"]
    assert all(isinstance(obj[key], int) for key in METRICS)
    streamed = await post(http, s.url + "/api/generate", {"model": GEMMA, "prompt": "why?"})
    text = "".join(o["response"] for o in streamed[2])
    assert text == obj["response"], "streaming does not change the answer"


async def test_num_predict_cuts_with_length(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim()
    obj = await chat(http, s, QWEN, options={"num_predict": 7})
    assert obj["done_reason"] == "length"
    assert obj["eval_count"] == 7
    assert len(obj["message"]["content"].split()) == 7


async def test_other_endpoints(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="three-models")
    async with http.get(s.url + "/") as resp:
        assert await resp.text() == "Ollama is running"
    version = await get_json(http, s.url + "/api/version")
    assert re.fullmatch(r"0\.\d+\.\d+", version["version"])
    tags = (await get_json(http, s.url + "/api/tags"))["models"]
    assert [m["name"] for m in tags] == [QWEN, GEMMA, LLAMA]
    qwen = tags[0]
    assert qwen["size"] == 4_683_087_332 and len(qwen["digest"]) == 64
    assert qwen["details"]["family"] == "qwen2"
    assert await get_json(http, s.url + "/api/ps") == {"models": []}
    status, _, objs = await post(http, s.url + "/api/show", {"model": LLAMA})
    assert status == 200 and objs[0]["details"]["parameter_size"] == "3.2B"
    status, _, objs = await post(http, s.url + "/api/show", {"model": "nope:1b"})
    assert status == 404


async def test_errors_404_and_400(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim()
    status, ctype, objs = await post(http, s.url + "/api/chat", {"model": "x", "messages": []})
    assert status == 404 and ctype.startswith("application/json")
    assert objs == [{"error": 'model "x" not found, try pulling it first'}]
    status, _, objs = await post(http, s.url + "/api/chat", {"messages": msgs("hi")})
    assert (status, objs) == (400, [{"error": "model is required"}])
    status, _, objs = await post(http, s.url + "/api/chat", {"model": QWEN, "messages": "hi"})
    assert status == 400
    # A format the runner cannot use is judged after the load (llm/llama_server.go): a 500.
    bad = {"model": QWEN, "format": "xml", "prompt": "hi", "stream": False}
    status, _, objs = await post(http, s.url + "/api/generate", bad)
    assert status == 500 and objs[0]["error"].startswith("invalid format: 'xml'")
    async with http.post(s.url + "/api/chat", data=b"{not json") as resp:
        assert resp.status == 400 and "error" in await resp.json()


# --- load / unload / keep_alive ----------------------------------------------------


async def test_load_and_unload_on_purpose(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim()
    status, ctype, objs = await post(http, s.url + "/api/chat", {"model": QWEN})
    assert status == 200 and ctype.startswith("application/json")
    assert objs == [
        {
            "model": QWEN,
            "created_at": objs[0]["created_at"],
            "message": {"role": "assistant", "content": ""},
            "done_reason": "load",
            "done": True,
        }
    ]
    assert await ps_names(http, s) == [QWEN]
    status, _, objs = await post(http, s.url + "/api/chat", {"model": QWEN, "keep_alive": 0})
    assert objs[0]["done_reason"] == "unload"
    assert await ps_names(http, s) == []
    # /api/generate: no prompt loads, keep_alive 0 unloads.
    status, _, objs = await post(http, s.url + "/api/generate", {"model": GEMMA})
    assert objs[0]["done_reason"] == "load" and objs[0]["response"] == ""
    status, _, objs = await post(
        http, s.url + "/api/generate", {"model": GEMMA, "prompt": "", "keep_alive": "0s"}
    )
    assert objs[0]["done_reason"] == "unload"
    assert await ps_names(http, s) == []
    st = await stats(http, s)
    assert st["loads"] == {QWEN: 1, GEMMA: 1} and st["unloads"] == {QWEN: 1, GEMMA: 1}


async def test_unload_returns_at_once_and_waits_for_in_flight(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(speed=10)
    await chat(http, s, QWEN, options={"num_predict": 1})  # resident
    running = asyncio.create_task(chat(http, s, QWEN, "long one"))  # ~3.4 s simulated
    await asyncio.sleep(0.03)
    began = time.monotonic()
    _, _, objs = await post(http, s.url + "/api/chat", {"model": QWEN, "keep_alive": 0})
    assert objs[0]["done_reason"] == "unload"
    assert time.monotonic() - began < 0.1, "unload answers at once"
    assert await ps_names(http, s) == [QWEN], "still serving its in-flight request"
    await running
    assert await ps_names(http, s) == []


def test_keep_alive_parsing_follows_ollama() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(30) == 30.0
    assert parse_keep_alive(1.5) == 1.5
    assert parse_keep_alive(0) == 0.0
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("10m") == 600.0
    assert parse_keep_alive("24h") == 86_400.0
    assert parse_keep_alive("1h30m") == 5_400.0
    assert parse_keep_alive("500ms") == 0.5
    assert parse_keep_alive("-1m") == math.inf
    assert parse_keep_alive("0") == 0.0
    assert parse_go_duration("1.5h") == 5_400 * 10**9
    assert parse_go_duration("2h45m30.5s") == (2 * 3600 + 45 * 60 + 30) * 10**9 + 500_000_000
    with pytest.raises(DurationError, match=r'^time: missing unit in duration "3600"$'):
        parse_keep_alive("3600")
    with pytest.raises(DurationError, match="unknown unit"):
        parse_keep_alive("5d")
    with pytest.raises(DurationError, match="invalid duration"):
        parse_keep_alive("")
    with pytest.raises(DurationError):
        parse_keep_alive(True)


async def test_keep_alive_over_http(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(speed=100)
    status, _, objs = await post(
        http, s.url + "/api/chat", {"model": QWEN, "messages": msgs("hi"), "keep_alive": "3600"}
    )
    assert (status, objs) == (400, [{"error": 'time: missing unit in duration "3600"'}])
    # Negative: forever, and it sticks for requests that do not say.
    await post(http, s.url + "/api/chat", {"model": QWEN, "keep_alive": -1})
    await chat(http, s, QWEN, options={"num_predict": 2})
    (entry,) = (await get_json(http, s.url + "/api/ps"))["models"]
    assert datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00")).year > 2200
    assert entry["size_vram"] == entry["size"] and entry["context_length"] == 4096
    # 0: unloaded as soon as the request ends.
    await chat(http, s, QWEN, options={"num_predict": 2}, keep_alive=0)
    assert await ps_names(http, s) == []
    # A short keep_alive expires (20 s simulated = 200 ms here); ps shows when.
    await chat(http, s, GEMMA, options={"num_predict": 2}, keep_alive="20s")
    (entry,) = (await get_json(http, s.url + "/api/ps"))["models"]
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00")).timestamp()
    assert 0 < expires - time.time() < 0.2
    await asyncio.sleep(0.3)
    assert await ps_names(http, s) == []
    assert (await stats(http, s))["unloads"][GEMMA] == 1


async def test_first_load_uses_default_keep_alive(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(speed=100, default_keep_alive=20.0)  # 20 s simulated = 200 ms
    await chat(http, s, QWEN, options={"num_predict": 1})
    assert await ps_names(http, s) == [QWEN]
    await asyncio.sleep(0.3)
    assert await ps_names(http, s) == []


# --- scheduling --------------------------------------------------------------------


async def test_eviction_waits_for_in_flight_requests(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(speed=20)  # laptop-6gb: max_loaded 1, qwen and gemma never fit together
    await chat(http, s, QWEN, options={"num_predict": 1})
    finished: dict[str, float] = {}

    async def run(model: str) -> dict[str, Any]:
        obj = await chat(http, s, model, f"question for {model}")
        finished[model] = time.monotonic()
        return obj

    first = asyncio.create_task(run(QWEN))  # ~3.4 s simulated
    await asyncio.sleep(0.02)
    second = asyncio.create_task(run(GEMMA))
    await asyncio.sleep(0.02)
    assert await ps_names(http, s) == [QWEN], "qwen is not unloaded under its request"
    a, b = await first, await second
    assert finished[QWEN] < finished[GEMMA]
    # gemma's load_duration counts the wait for qwen to finish, then its own 2.3 s.
    assert b["load_duration"] / 1e9 * 20 > 2.3 + 1.5
    assert a["load_duration"] / 1e9 * 20 < 0.5
    st = await stats(http, s)
    assert st["max_resident"] == 1
    assert st["loads"] == {QWEN: 1, GEMMA: 1} and st["unloads"] == {QWEN: 1}


async def test_three_models_keeps_two_resident_by_vram(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(profile="three-models")
    for model in (QWEN, LLAMA):
        await chat(http, s, model, options={"num_predict": 1})
    assert sorted(await ps_names(http, s)) == [LLAMA, QWEN]
    await chat(http, s, GEMMA, options={"num_predict": 1})  # 4.7 + 5.4 GB > 8 GiB
    names = await ps_names(http, s)
    assert GEMMA in names and QWEN not in names and LLAMA in names
    assert (await stats(http, s))["max_resident"] == 2


async def test_503_when_the_pending_load_queue_is_full(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(speed=10, max_queue=1)
    await chat(http, s, QWEN, options={"num_predict": 1})
    busy = asyncio.create_task(chat(http, s, QWEN, "keep qwen busy"))
    await asyncio.sleep(0.02)
    # The first gemma request is being scheduled (waiting for qwen to finish)...
    load_1 = asyncio.create_task(chat(http, s, GEMMA, "one"))
    await asyncio.sleep(0.02)
    # ...the second waits in the queue (1 of 1)...
    load_2 = asyncio.create_task(chat(http, s, GEMMA, "two", options={"num_ctx": 8192}))
    await asyncio.sleep(0.02)
    # ...and a third pending load does not fit: 503, at once.
    status, _, objs = await post(
        http,
        s.url + "/api/chat",
        {"model": GEMMA, "messages": msgs("three"), "stream": False, "options": {"num_ctx": 2048}},
    )
    assert status == 503
    assert objs == [{"error": BUSY}]
    # Requests for the resident model attach directly: never refused by the queue.
    extra = await chat(http, s, QWEN, "attach", options={"num_predict": 3})
    assert extra["done_reason"] == "length"
    await asyncio.gather(busy, load_1, load_2)


async def test_slots_cap_concurrency_per_model(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(profile="laptop-6gb-4slot", speed=100)
    await chat(http, s, QWEN, options={"num_predict": 1})
    await asyncio.gather(*(chat(http, s, QWEN, f"q{i}") for i in range(7)))
    assert (await stats(http, s))["max_concurrent"][QWEN] == 4
    s1 = await sim(profile="laptop-6gb", speed=100)
    await asyncio.gather(
        *(chat(http, s1, QWEN, f"q{i}", options={"num_predict": 20}) for i in range(3))
    )
    assert (await stats(http, s1))["max_concurrent"][QWEN] == 1


async def test_throughput_curve_shares_the_gpu(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(profile="laptop-6gb-4slot", speed=20)
    await chat(http, s, QWEN, options={"num_predict": 1})
    opts = {"num_predict": 150}
    began = time.monotonic()
    singles = [await chat(http, s, QWEN, f"alone {i}", options=opts) for i in range(4)]
    sequential = time.monotonic() - began
    began = time.monotonic()
    together = await asyncio.gather(
        *(chat(http, s, QWEN, f"together {i}", options=opts) for i in range(4))
    )
    concurrent = time.monotonic() - began
    assert concurrent < 0.75 * sequential, "4 at once beat 4 in a row in aggregate"
    alone = sum(o["eval_duration"] for o in singles) / 4
    shared = sum(o["eval_duration"] for o in together) / 4
    # Each of 4 streams decodes at 1.79/4 of the single-stream speed.
    assert shared / alone == pytest.approx(4 / 1.79, rel=0.2)


async def test_runner_option_change_forces_reload(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(profile="three-models")
    await chat(http, s, LLAMA, options={"num_predict": 1, "num_ctx": 2048})
    await chat(http, s, LLAMA, options={"num_predict": 1, "num_ctx": 2048, "temperature": 0.1})
    assert (await stats(http, s))["loads"] == {LLAMA: 1}, "sampling options do not reload"
    await chat(http, s, LLAMA, options={"num_predict": 1, "num_ctx": 8192})
    st = await stats(http, s)
    assert st["loads"] == {LLAMA: 2} and st["unloads"] == {LLAMA: 1}
    (entry,) = (await get_json(http, s.url + "/api/ps"))["models"]
    assert entry["context_length"] == 8192
    await chat(http, s, LLAMA, options={"num_predict": 1})  # back to the default num_ctx
    assert (await stats(http, s))["loads"] == {LLAMA: 3}


async def test_client_disconnect_aborts_its_load(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(speed=10)  # qwen loads in 0.2 s
    with pytest.raises(asyncio.TimeoutError):
        await post(
            http,
            s.url + "/api/chat",
            {"model": QWEN, "messages": msgs("hi")},
            timeout=aiohttp.ClientTimeout(total=0.05),
        )
    await asyncio.sleep(0.05)
    st = await stats(http, s)
    assert st["aborted_loads"] == {QWEN: 1} and st.get("loads") == {}
    assert await ps_names(http, s) == []


# --- output ------------------------------------------------------------------------


async def test_output_is_deterministic(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="instant")
    a = await chat(http, s, QWEN, "the same question")
    b = await chat(http, s, QWEN, "the same question")
    c = await chat(http, s, QWEN, "the same question", options={"seed": 7})
    d = await chat(http, s, QWEN, "another question")
    assert a["message"]["content"] == b["message"]["content"]
    assert a["eval_count"] == b["eval_count"]
    assert c["message"]["content"] != a["message"]["content"]
    assert d["message"]["content"] != a["message"]["content"]
    s2 = await sim(profile="instant")
    e = await chat(http, s2, QWEN, "the same question")
    assert e["message"]["content"] == a["message"]["content"], "across servers too"


def test_output_token_counts_stay_around_the_mean() -> None:
    counts = [
        len(
            plan_output(
                request_key(QWEN, [i], None, None), mean_tokens=300, fmt=None, num_predict=None
            ).tokens
        )
        for i in range(400)
    ]
    assert min(counts) >= 240 and max(counts) <= 360
    assert sum(counts) / len(counts) == pytest.approx(300, rel=0.03)


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["proposer", "critic"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "rounds": {"type": "integer", "minimum": 1, "maximum": 3},
        "reasons": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "unanimous": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 40},
        "detail": {"$ref": "#/$defs/detail"},
    },
    "required": ["winner", "score", "reasons", "unanimous", "detail"],
    "$defs": {
        "detail": {
            "type": "object",
            "properties": {"margin": {"type": ["number", "null"]}, "note": {"type": "string"}},
            "required": ["margin"],
        }
    },
}


def _is_type(value: Any, kind: str | None) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": number and float(value).is_integer() and isinstance(value, int),
        "number": number,
        "boolean": isinstance(value, bool),
        "null": value is None,
        None: True,
    }[kind]


def _valid(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> bool:
    """Just enough JSON Schema to check the simulator's structured output."""
    if "$ref" in schema:
        return _valid(value, root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root)
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not any(_is_type(value, k) for k in kinds):
        return False
    if isinstance(value, dict):
        if any(r not in value for r in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        return all(_valid(v, props[k], root) for k, v in value.items() if k in props)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return False
        return all(_valid(v, schema.get("items", {}), root) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return bool(schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf))
    if isinstance(value, str):
        return bool(len(value) <= schema.get("maxLength", math.inf))
    return True


async def test_format_json_and_schema(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="instant")
    obj = await chat(http, s, GEMMA, "judge this", format="json")
    assert isinstance(json.loads(obj["message"]["content"]), dict)
    obj = await chat(http, s, GEMMA, "judge this", format=VERDICT_SCHEMA)
    verdict = json.loads(obj["message"]["content"])
    assert _valid(verdict, VERDICT_SCHEMA, VERDICT_SCHEMA), verdict
    assert verdict["winner"] == "proposer"  # enum: the first value
    assert set(verdict) == set(VERDICT_SCHEMA["properties"])
    # Streamed, the pieces join to the same JSON text.
    _, _, objs = await post(
        http,
        s.url + "/api/chat",
        {"model": GEMMA, "messages": msgs("judge this"), "format": VERDICT_SCHEMA},
    )
    assert "".join(o["message"]["content"] for o in objs) == obj["message"]["content"]


# --- faults ------------------------------------------------------------------------


def only(kind: str, **extra: Any) -> Faults:
    return Faults(error_rate=1.0, weights={kind: 1.0}, **extra)


async def test_fault_500(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="instant", faults=only("500"))
    status, _, objs = await post(http, s.url + "/api/chat", {"model": QWEN, "messages": msgs("x")})
    assert status == 500 and "error" in objs[0]
    # Loads are not chat requests: faults never hit them.
    status, _, objs = await post(http, s.url + "/api/chat", {"model": QWEN})
    assert status == 200 and objs[0]["done_reason"] == "load"


async def test_fault_503(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="instant", faults=only("503"))
    async with http.post(s.url + "/api/chat", json={"model": QWEN, "messages": msgs("x")}) as r:
        assert r.status == 503
        assert await r.text() == json.dumps({"error": BUSY}, separators=(",", ":"))


@pytest.mark.parametrize("stream", [True, False])
async def test_fault_drop(sim: SimFactory, http: aiohttp.ClientSession, stream: bool) -> None:
    s = await sim(profile="instant", faults=only("drop"), seed=3)
    for i in range(6):  # both variants: before the response and mid-body
        with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            await post(
                http,
                s.url + "/api/chat",
                {"model": QWEN, "messages": msgs(f"x{i}"), "stream": stream},
            )
    log = await get_json(http, s.url + "/sim/requests")
    assert {r["status"] for r in log} == {None, 200}, "both drop points were drawn"
    assert not any(r["completed"] for r in log)


async def test_fault_midstream(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="instant", faults=only("midstream"))
    status, _, objs = await post(http, s.url + "/api/chat", {"model": QWEN, "messages": msgs("x")})
    assert status == 200
    assert len(objs) >= 2 and objs[0]["done"] is False
    assert set(objs[-1]) == {"error"}
    status, _, objs = await post(
        http, s.url + "/api/chat", {"model": QWEN, "messages": msgs("x"), "stream": False}
    )
    assert status == 500 and set(objs[0]) == {"error"}


async def test_fault_hang(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(profile="instant", faults=only("hang"))
    with pytest.raises(asyncio.TimeoutError):
        await post(
            http,
            s.url + "/api/chat",
            {"model": QWEN, "messages": msgs("x")},
            timeout=aiohttp.ClientTimeout(sock_read=0.2),
        )
    # A bounded hang delays the answer, then serves it.
    async with http.post(s.url + "/sim/faults", json={"hang_s": 0.1}) as r:
        assert (await r.json())["hang_s"] == 0.1
    began = time.monotonic()
    obj = await chat(http, s, QWEN)
    assert time.monotonic() - began >= 0.1 and obj["done"] is True


async def test_faults_are_seeded_and_settable_at_runtime(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    weights = {"500": 1.0, "503": 1.0, "midstream": 1.0}
    kinds: list[list[str | None]] = []
    for _ in range(2):
        s = await sim(profile="instant", faults=Faults(error_rate=0.5, weights=weights), seed=42)
        for i in range(30):
            await post(http, s.url + "/api/chat", {"model": QWEN, "messages": msgs(str(i))})
        kinds.append([r["fault"] for r in await get_json(http, s.url + "/sim/requests")])
    assert kinds[0] == kinds[1]
    assert None in kinds[0] and {"500", "503", "midstream"} <= set(kinds[0])
    st = await stats(http, s)
    assert sum(st["faults_injected"].values()) == sum(k is not None for k in kinds[1])
    async with http.post(s.url + "/sim/faults", json={"error_rate": 0}) as r:
        assert r.status == 200
    obj = await chat(http, s, QWEN)
    assert obj["done"] is True
    async with http.post(s.url + "/sim/faults", json={"weights": {"segfault": 1}}) as r:
        assert r.status == 400


# --- introspection -----------------------------------------------------------------


async def test_stats_and_request_log(sim: SimFactory, http: aiohttp.ClientSession) -> None:
    s = await sim(speed=100)
    await post(http, s.url + "/api/chat", {"model": QWEN}, headers={"X-Ihld-Task": "load/0/1"})
    for stage in range(2):
        await chat(
            http,
            s,
            QWEN,
            f"stage {stage}",
            options={"num_predict": 5},
            headers={"X-Ihld-Task": f"job-1/{stage}/1"},
        )
    await post(http, s.url + "/api/chat", {"model": "ghost", "messages": msgs("x")})
    log = await get_json(http, s.url + "/sim/requests")
    assert [
        (r["model"], r["task"], r["kind"], r["status"], r["done_reason"], r["completed"])
        for r in log
    ] == [
        (QWEN, "load/0/1", "load", 200, "load", True),
        (QWEN, "job-1/0/1", "chat", 200, "length", True),
        (QWEN, "job-1/1/1", "chat", 200, "length", True),
        ("ghost", None, "chat", 404, None, False),
    ]
    assert all(r["fault"] is None for r in log)
    assert [r["t"] for r in log] == sorted(r["t"] for r in log)
    st = await stats(http, s)
    assert st["requests"] == {QWEN: 3, "ghost": 1}
    assert st["chat_requests"] == 3
    assert st["loads"] == {QWEN: 1} and st["unloads"] == {}
    assert st["load_seconds"] * 100 == pytest.approx(2.0, rel=0.3)
    assert st["busy_seconds"][QWEN] > 0
    assert st["max_concurrent"] == {QWEN: 1} and st["max_resident"] == 1
    assert st["speed"] == 100 and st["started_at"] <= time.time()
    async with http.post(s.url + "/sim/reset") as r:
        assert r.status == 200
    assert await get_json(http, s.url + "/sim/requests") == []
    st = await stats(http, s)
    assert st["requests"] == {} and st["loads"] == {} and st["chat_requests"] == 0


# --- the calibration story ---------------------------------------------------------


async def test_job_by_job_debate_costs_15_7_seconds_per_job(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    """laptop-6gb, run job by job: 3 stages of ~1,500 characters, 2 swaps per job."""
    speed, jobs = 50.0, 6
    s = await sim(profile="laptop-6gb", speed=speed)
    await post(http, s.url + "/api/chat", {"model": QWEN})  # resident before the clock
    profile = get_profile("laptop-6gb")
    expected = 0.0
    began = time.monotonic()
    for job in range(jobs):
        topic = f"Job {job}: should the city build the tram line? " * 30
        for stage, model in enumerate((QWEN, GEMMA, QWEN)):
            obj = await chat(http, s, model, f"Stage {stage}. {topic}"[:1500])
            spec = profile.spec(model)
            assert spec is not None
            expected += obj["prompt_eval_count"] / spec.prompt_tps
            expected += obj["eval_count"] / spec.gen_tps
            expected += spec.load_s if stage else 0.0
    per_job = (time.monotonic() - began) * speed / jobs
    assert per_job == pytest.approx(expected / jobs, rel=0.05), "the clock follows the model"
    assert per_job == pytest.approx(15.7, rel=0.05)
    assert (await stats(http, s))["loads"] == {QWEN: jobs + 1, GEMMA: jobs}


# --- API surface -------------------------------------------------------------------


def test_profiles_and_overrides() -> None:
    assert {"laptop-6gb", "laptop-6gb-4slot", "three-models", "instant"} <= set(PROFILES)
    with pytest.raises(KeyError, match="laptop-6gb"):
        get_profile("nope")
    base = get_profile("laptop-6gb")
    assert (base.slots, base.max_loaded, base.max_queue, base.default_keep_alive) == (
        1,
        1,
        512,
        300.0,
    )
    changed = base.with_overrides(slots=2, max_loaded=2, max_queue=7)
    assert (changed.slots, changed.max_loaded, changed.max_queue) == (2, 2, 7)
    assert isinstance(changed, Profile) and base.slots == 1
    app = build_app(base, speed=10, slots=3)
    assert app is not None
    with pytest.raises(ValueError):
        build_app(base, speed=0)


def test_go_time_format() -> None:
    assert go_time(0) == "1970-01-01T00:00:00Z"
    assert go_time(1.5) == "1970-01-01T00:00:01.5Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", go_time())


def test_run_sim_prints_its_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    code = (
        "from ihld.sim import Faults, run_sim\n"
        "run_sim('127.0.0.1', 0, 'instant', 1.0, Faults(), 0, None, None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.fullmatch(
                r"ihld-sim listening on (http://127\.0\.0\.1:(\d+)) profile=instant speed=1\n",
                line,
            )
            assert match, line
            with urllib.request.urlopen(match.group(1) + "/api/version", timeout=5) as resp:
                assert json.load(resp)["version"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
