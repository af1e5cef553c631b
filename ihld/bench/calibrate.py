"""``ihld calibrate URL --models a,b``: measure a real llama.cpp router, write a simulator profile.

For each model: its load time (unload everything, ``POST /models/load``, wait
until ``GET /models`` says ``loaded``; the median of ``rounds``), then its
prompt-evaluation and decode rates with 1…``slots`` streams at once, from the
server's own ``timings`` (``prompt_n``/``prompt_ms``, ``predicted_n``/
``predicted_ms``). The decode rate of one stream is ``gen_tps``; the speed-up
of k streams (``throughput[k-1]``) is k times the per-stream rate at k over the
rate at 1, the shape the built-in profiles take from llama.cpp's
batched-bench. The profile's ``slots`` and ``max_loaded`` are the router's
(``total_slots``, ``max_instances``). ``ihld sim --profile FILE`` then serves
a simulator that predicts a workload's makespan (``ihld bench --backend``
against it, ``--kind ollama``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp

from ihld.bench.serverstate import LoadCounter, unload_all
from ihld.sim.profiles import ModelSpec, Profile

# A prompt of about 200 tokens, the same for every request, and a cache-defeating suffix
# so each request evaluates it (llama.cpp reuses a slot's common prefix).
PROMPT = " ".join(f"word{n}" for n in range(120))


async def _spelling(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    listed = await LoadCounter(session, url).states()
    return {name.lower(): name for name in listed}


async def _load_s(session: aiohttp.ClientSession, url: str, name: str) -> float:
    await unload_all(session, url)
    started = time.monotonic()
    async with session.post(url + "/models/load", json={"model": name}) as resp:
        await resp.read()
    counter = LoadCounter(session, url)
    while (await counter.states()).get(name) != "loaded":  # noqa: ASYNC110 - polling a server
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _rates(
    session: aiohttp.ClientSession, url: str, name: str, streams: int, tokens: int, tag: int
) -> tuple[float, float]:
    """Per-stream prompt and decode tokens/s with ``streams`` requests at once."""

    async def one(n: int) -> dict[str, Any]:
        body = {
            "model": name,
            "messages": [{"role": "user", "content": f"{PROMPT} r{tag}-{n}"}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            reply: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"calibrate: HTTP {resp.status}: {reply}")
        return reply

    replies = await asyncio.gather(*(one(n) for n in range(streams)))
    timings = [r["timings"] for r in replies]
    prompt = statistics.median(t["prompt_n"] / t["prompt_ms"] * 1e3 for t in timings)
    decode = statistics.median(t["predicted_n"] / t["predicted_ms"] * 1e3 for t in timings)
    return prompt, decode


async def calibrate(
    url: str, models: list[str], *, rounds: int = 3, tokens: int = 32, name: str = "calibrated"
) -> Profile:
    url = url.rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        spelling = await _spelling(session, url)
        async with session.get(url + "/props") as resp:
            router = await resp.json()
        specs = []
        slots = 1
        for model in models:
            listed = spelling.get(model.lower())
            if listed is None:
                raise ValueError(f"{url} does not list {model!r} (it lists {sorted(spelling)})")
            loads = [await _load_s(session, url, listed) for _ in range(rounds)]
            async with session.get(url + "/props", params={"model": listed}) as resp:
                slots = int((await resp.json()).get("total_slots") or 1)
            await _rates(session, url, listed, slots, tokens, -1)  # warm up: not measured
            prompt_tps, per_stream = [], []
            for k in range(1, slots + 1):
                samples = [await _rates(session, url, listed, k, tokens, r) for r in range(rounds)]
                prompt_tps.append(statistics.median(p for p, _ in samples))
                per_stream.append(statistics.median(d for _, d in samples))
            specs.append(
                ModelSpec(
                    name=model,
                    size_bytes=0,
                    load_s=round(statistics.median(loads), 3),
                    prompt_tps=round(prompt_tps[0], 1),
                    gen_tps=round(per_stream[0], 2),
                    throughput=tuple(
                        round(k * rate / per_stream[0], 3) for k, rate in enumerate(per_stream, 1)
                    ),
                    mean_output_tokens=max(tokens, 300),
                    family="calibrated",
                )
            )
        await unload_all(session, url)
    return Profile(
        name=name,
        description=f"measured on {url} by ihld calibrate ({rounds} rounds, {tokens} tokens)",
        models=tuple(specs),
        slots=slots,
        max_loaded=int(router.get("max_instances") or 1),
    )
