"""The real-server bench's own parts, against the built-in simulator (no real server needed).

The workload, the hand-batched reference client, the load counter and the
calibrated-profile file; tests/real/test_real_bench.py runs them on llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from ihld.bench.real import aba_jobs, run_hand_batched, table
from ihld.bench.serverstate import LoadCounter, unload_all
from ihld.sim import start_sim
from ihld.sim.profiles import get_profile, profile_to_json


def test_aba_jobs_chain_a_b_a() -> None:
    jobs = aba_jobs(3, 16, ("m:a", "m:b"))
    assert [j["id"] for j in jobs] == ["aba0000", "aba0001", "aba0002"]
    stages = jobs[0]["stages"]
    assert [s["model"] for s in stages] == ["m:a", "m:b", "m:a"]
    assert all(s["options"] == {"num_predict": 16, "temperature": 0} for s in stages)
    assert "{stages[a]}" in stages[1]["prompt"] and "{stages[b]}" in stages[2]["prompt"]


async def test_hand_batched_reference_runs_stage_by_stage_and_counts_loads() -> None:
    # Slow enough (a load takes 0.4 s) for the 100 ms poller to see every model arrive.
    async with await start_sim(speed=5.0) as sim, aiohttp.ClientSession() as session:
        jobs = aba_jobs(4, 8, ("qwen2.5:7b", "gemma2:9b"))
        await unload_all(session, sim.url, "ollama")
        async with LoadCounter(session, sim.url, "ollama") as counter:
            run = await run_hand_batched(session, sim.url, jobs, 2, "ollama")
        async with session.get(sim.url + "/sim/requests") as resp:
            log = await resp.json()
    assert run.done == run.jobs == 4 and run.tokens > 0
    assert run.per_model["qwen2.5:7b"]["stages"] == 8 and run.per_model["gemma2:9b"]["stages"] == 4
    models = [e["model"] for e in log if e.get("completed")]
    assert models == ["qwen2.5:7b"] * 4 + ["gemma2:9b"] * 4 + ["qwen2.5:7b"] * 4  # stage by stage
    assert sum(counter.loads.values()) >= 2  # at least qwen and gemma came in
    assert "hand-batched" in table([run])


def test_a_calibrated_profile_round_trips_through_a_file(tmp_path: Path) -> None:
    profile = get_profile("laptop-6gb-4slot")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_to_json(profile)))
    assert get_profile(str(path)) == profile
    path.write_text('{"name": "x"}')
    try:
        get_profile(str(path))
    except KeyError as exc:
        assert "not a simulator profile" in str(exc)
    else:
        raise AssertionError("a broken profile file must be refused")
