"""The simulator where schedulers break: each behaviour as Ollama has it (docs/simulator.md).

A stream that ends silently, thinking models thinking by default, ``invalid format``
as a 500 after the load, forced parallelism 1 for some architectures, and the
``needsReload`` exceptions. (The eviction stall and the keep_alive reset of a victim
kept busy are in tests/test_sim.py.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from http_fixtures import SimFactory, http_fixture, msgs, sims  # noqa: F401

from ihld.sim import Faults, Profile, get_profile
from ihld.sim.api import parse_call
from ihld.sim.engine import PARALLEL_ONE, parallel_for

QWEN = "qwen2.5:7b"


@pytest.fixture
async def sim() -> AsyncIterator[SimFactory]:
    async with sims(speed=200.0) as make:
        yield make


async def chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url + "/api/chat", json=body) as resp:
        text = await resp.text()
        return resp.status, [json.loads(line) for line in text.splitlines() if line.strip()]


def thinking_profile() -> Profile:
    base = get_profile("laptop-6gb")
    models = tuple(dataclasses.replace(m, thinking=True) if m.name == QWEN else m
                   for m in base.models)
    return dataclasses.replace(base, models=models)


async def test_a_silent_stream_end_has_neither_done_nor_error(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(profile="instant", faults=Faults(error_rate=1.0, weights={"silent": 1.0}))
    status, objs = await chat(http, s.url, {"model": QWEN, "messages": msgs("x")})
    assert status == 200 and objs, "some output first"
    assert not any(o.get("done") for o in objs) and not any("error" in o for o in objs)


async def test_thinking_models_think_unless_told_not_to(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim(profile=thinking_profile())
    _, objs = await chat(http, s.url, {"model": QWEN, "messages": msgs("x")})
    thought = "".join(o["message"].get("thinking", "") for o in objs if "message" in o)
    assert thought, "no think field: a thinking model thinks"
    first_content = next(i for i, o in enumerate(objs) if o["message"].get("content"))
    first_thought = next(i for i, o in enumerate(objs) if o["message"].get("thinking"))
    assert first_thought < first_content  # the reasoning comes first
    _, quiet = await chat(http, s.url, {"model": QWEN, "messages": msgs("x"), "think": False})
    assert not any(o["message"].get("thinking") for o in quiet if "message" in o)
    status, _ = await chat(http, s.url, {"model": QWEN, "messages": msgs("y"), "think": "high"})
    assert status == 200
    status, err = await chat(
        http, s.url, {"model": "gemma2:9b", "messages": msgs("x"), "think": True}
    )
    assert status == 400 and err[0]["error"] == '"gemma2:9b" does not support thinking'


async def test_invalid_format_is_a_500_after_the_load(
    sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    s = await sim()
    status, objs = await chat(http, s.url, {"model": QWEN, "messages": msgs("x"), "format": 5})
    assert status == 500 and objs[0]["error"].startswith("invalid format: 5;")
    async with http.get(s.url + "/sim/stats") as resp:
        stats = await resp.json()
    assert stats["loads"].get(QWEN) == 1, "the load happened before the format was judged"


def test_some_architectures_run_one_request_at_a_time() -> None:
    spec = get_profile("laptop-6gb").models[0]
    assert parallel_for(spec, 4) == 4
    for family in ("qwen3vl", "mllama", "nemotron_h", "lfm2", "qwen3next", "bert"):
        assert family in PARALLEL_ONE
        assert parallel_for(dataclasses.replace(spec, family=family), 4) == 1


def test_needs_reload_exceptions() -> None:
    """A negative num_gpu is ignored; num_ctx is clamped to the training context."""
    profile = get_profile("laptop-6gb")
    spec = profile.models[0]

    def options(extra: dict[str, Any]) -> Any:
        call = parse_call({"model": QWEN, "messages": msgs("x"), "options": extra}, "chat")
        return call.runner_options(profile, spec)

    assert options({"num_gpu": -1}) == options({})
    above = spec.context_length * 2
    assert options({"num_ctx": above}) == options({"num_ctx": above * 2})
    assert options({"num_ctx": above})[1] == spec.context_length
    assert options({"num_ctx": 2048}) != options({"num_ctx": 4096})
