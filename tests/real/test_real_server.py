"""ihld against a real llama.cpp server in router mode (``make test-real``).

Everything here is a real part: ``llama-server --models-preset … --models-max 1`` with two
names for two byte-identical Gemma 3 270M files (a switch is a real unload and reload), the
ihld daemon as a subprocess on a spool in tmp_path, and, where a test must see ihld's
``X-Ihld-Task`` header, a recording proxy between them. Loads are counted from the router's
own log. Few jobs and 8-32 tokens each keep the suite to a few minutes on 2 cores; no
assertion depends on wall-clock time (timeouts are only safety nets).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from ihld.core.storeview import read_progress
from tests.conftest import drop
from tests.real.conftest import (
    BACKEND,
    MODEL_A,
    MODEL_B,
    ROUTER_ID,
    Proxy,
    RealRig,
)
from tests.real.router import Router

pytestmark = pytest.mark.real

RigFactory = Callable[..., RealRig]


def stage(name: str, model: str, prompt: str, tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "prompt": prompt,
            "options": {"num_predict": tokens, "temperature": 0, "seed": 7}, **extra}


def aba_jobs(count: int, prefix: str = "j", tokens: int = 8) -> str:
    """Jobs of three stages on models A, B, A: each needs the one before."""
    return "".join(json.dumps({
        "id": f"{prefix}{n:02d}", "input": {"topic": f"the number {n}"},
        "stages": [
            stage("a", MODEL_A, "Write one sentence about {input[topic]}.", tokens),
            stage("b", MODEL_B, "Say this more simply: {stages[a]}", tokens),
            stage("c", MODEL_A, "Give this a title: {stages[b]}", tokens),
        ]}) + "\n" for n in range(count))


def loads_total(router: Router) -> int:
    return sum(router.loads().values())


def finished_stages(rig: RealRig) -> set[tuple[str, str]]:
    """Stages on disk as finished: progress in the job store and results in outbox/."""
    done: set[tuple[str, str]] = set()
    for job_id, progress in read_progress(rig.spool / "work" / "queue.db").items():
        done |= {(job_id, name) for name in progress["outputs"]}
    for job_id, result in rig.results().items():
        done |= {(job_id, s["name"]) for s in result["stages"]}
    return done


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll; the timeout is a safety net against a hang, not a measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not reached within {timeout}s: {what}")


def check_done(rig: RealRig, proc: Any, count: int) -> dict[str, dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = rig.results()
    assert not rig.failures(), {k: v["error"] for k, v in rig.failures().items()}
    assert len(results) == count, sorted(results)
    return results


# -- the router itself -------------------------------------------------------------------


def test_router_lists_both_names_and_chats_in_gemma_turns(router: Router) -> None:
    assert router.get("/props")["role"] == "router"
    assert set(router.models()) == set(ROUTER_ID.values())
    status, reply = router.post("/v1/chat/completions", {
        "model": "gemma3:270M", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Name a colour."}],
    })
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"].strip()
    timings = reply["timings"]
    assert timings["predicted_n"] > 0 and timings["prompt_n"] + timings["cache_n"] > 10
    assert router.loads() == Counter({"gemma3:270M": 1})
    # the preset's chat template: Gemma turns, the system message folded into the first turn
    status, rendered = router.post("/apply-template", {"model": "gemma3:270M", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]})
    assert status == 200, rendered
    assert rendered["prompt"] == (
        "<start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\n"
    )


# -- through ihld ------------------------------------------------------------------------


def test_streaming_chat_through_ihld_records_the_servers_figures(
    router: Router, proxy_factory: Callable[[str], Proxy], real_rig: RigFactory
) -> None:
    proxy = proxy_factory(router.url)
    rig = real_rig(proxy.url)
    jobs = [{"id": f"s{n}", "input": {"topic": topic},
             "stages": [stage("say", MODEL_A, "Write one sentence about {input[topic]}.", 24,
                              system="Answer in plain English.")]}
            for n, topic in enumerate(["rivers", "bread"])]
    drop(rig.inbox, "chat.jsonl", "".join(json.dumps(j) + "\n" for j in jobs))
    results = check_done(rig, rig.run_once(), 2)
    for result in results.values():
        [say] = result["stages"]
        assert isinstance(say["output"], str) and say["output"].strip()
        assert say["backend"] == BACKEND and say["model"] == MODEL_A
        assert 0 < say["eval_count"] <= 24 and say["prompt_eval_count"] > 10
        assert say["eval_duration"] > 0 and say["prompt_eval_duration"] >= 0
        if "timings_predicted_n" in say:
            assert say["timings_predicted_n"] == say["eval_count"]
    chats = proxy.chats()
    assert len(chats) == 2 and all(c["completed"] and c["status"] == 200 for c in chats)
    # streamed: the server answered with server-sent events, not one JSON body
    assert all(c["content_type"].startswith("text/event-stream") for c in chats), chats
    assert {c["task"].split("/")[0] for c in chats} == {"s0", "s1"}


def test_json_schema_format_is_decoded_under_the_grammar(
    router: Router, real_rig: RigFactory
) -> None:
    from ihld.core.schema import validate_schema

    schema = {
        "type": "object",
        "properties": {
            "colour": {"type": "string", "enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "happy": {"type": "boolean"},
        },
        "required": ["colour", "count", "happy"],
        "additionalProperties": False,
    }
    rig = real_rig(router.url)
    jobs = [{"id": f"f{n}", "input": {"thing": thing},
             "stages": [stage("describe", MODEL_A,
                              "Describe {input[thing]}. Reply with JSON on one line, like "
                              'this: {{"colour": "red", "count": 2, "happy": false}}', 48,
                              format=schema)]}
            for n, thing in enumerate(["a frog", "the sky", "three apples"])]
    drop(rig.inbox, "fmt.jsonl", "".join(json.dumps(j) + "\n" for j in jobs))
    results = check_done(rig, rig.run_once(), 3)
    for result in results.values():
        [describe] = result["stages"]
        output = describe["output"]
        assert isinstance(output, dict), output
        assert validate_schema(output, schema) == [], output
        assert set(output) == {"colour", "count", "happy"}
        # valid at the first try: the grammar, not luck, shaped a 270M base model's reply
        assert describe["attempts"] == 1, describe


def test_explicit_load_and_unload_seen_in_get_models(router: Router) -> None:
    import aiohttp

    from ihld.backends import llamacpp
    from ihld.backends.settings import BackendConfig

    config = BackendConfig(name=BACKEND, kind="llamacpp", url=router.url, slots=4,
                           max_loaded=1)
    cls = next(getattr(llamacpp, n) for n in dir(llamacpp)
               if n.endswith("Backend") and getattr(getattr(llamacpp, n), "__module__", "")
               == llamacpp.__name__)

    async def scenario() -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        async with aiohttp.ClientSession() as session:
            backend = cls(config, session)
            try:
                await backend.load("gemma3:270m", keep_alive=None)
                seen.append(router.models())
                resident = await backend.ps()
                assert resident is not None
                assert [m["name"].lower() for m in resident] == ["gemma3:270m"]
                await backend.load("gemma3-b:270m", keep_alive=None)  # evicts A (max 1)
                seen.append(router.models())
                await backend.unload("gemma3-b:270m")
                await asyncio.to_thread(router.wait_status, "gemma3-b:270M", "unloaded")
                seen.append(router.models())
            finally:
                await backend.close()
        return seen

    after_a, after_b, after_unload = asyncio.run(scenario())
    assert after_a["gemma3:270M"] == "loaded" and after_a["gemma3-b:270M"] == "unloaded"
    assert after_b["gemma3-b:270M"] == "loaded" and after_b["gemma3:270M"] != "loaded"
    assert set(after_unload.values()) == {"unloaded"}
    assert router.loads() == Counter({"gemma3:270M": 1, "gemma3-b:270M": 1})


@pytest.mark.parametrize("policy", ["affinity", "fifo"])
def test_three_stage_jobs_loads_counted_by_the_router(
    policy: str, router: Router, real_rig: RigFactory
) -> None:
    jobs = 8 if policy == "affinity" else 5
    rig = real_rig(router.url, policy=policy)
    drop(rig.inbox, "aba.jsonl", aba_jobs(jobs))
    results = check_done(rig, rig.run_once(), jobs)
    for result in results.values():
        assert [s["name"] for s in result["stages"]] == ["a", "b", "c"]
        assert [s["model"] for s in result["stages"]] == [MODEL_A, MODEL_B, MODEL_A]
        assert all(s["eval_count"] > 0 for s in result["stages"])
    loads = router.loads()
    assert set(loads) == {"gemma3:270M", "gemma3-b:270M"}
    if policy == "affinity":
        assert loads_total(router) <= 3, loads  # all a's, all b's, all c's
    else:
        # job by job: A, B, A for every job (A stays for the next job's first stage)
        assert loads_total(router) >= 2 * jobs, loads


def test_sigkill_of_ihld_mid_batch_resends_no_finished_stage(
    router: Router, proxy_factory: Callable[[str], Proxy], real_rig: RigFactory
) -> None:
    proxy = proxy_factory(router.url)
    rig = real_rig(proxy.url)
    count = 6
    drop(rig.inbox, "aba.jsonl", aba_jobs(count, prefix="k", tokens=16))
    proc = rig.start()
    rig.wait_ready(60)
    wait_until(lambda: len(finished_stages(rig)) >= 2, "two stages checkpointed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished_stages(rig)
    assert 0 < len(before) < 3 * count, "the kill should land mid-batch"
    sent_before = len(proxy.chats())

    check_done(rig, rig.run_once(), count)
    after = proxy.chats()[sent_before:]
    assert after, "the restarted daemon should have sent requests"
    for entry in after:
        assert entry["task"], entry
        job, stage_name, _attempt = entry["task"].split("/")
        assert (job, stage_name) not in before, f"finished stage {job}/{stage_name} sent again"
    # every stage of every job completed on the server, and each job's result exists once
    completed = {tuple(c["task"].split("/")[:2]) for c in proxy.chats() if c.get("completed")}
    assert completed == {(f"k{n:02d}", s) for n in range(count) for s in "abc"}
    assert sorted(p.name for p in (rig.spool / "outbox").glob("*.json")) == [
        f"k{n:02d}.json" for n in range(count)
    ]
    assert not list((rig.spool / "inbox").glob("*.jsonl"))
    finished = Counter(e["job_id"] for e in rig.events() if e["event"] == "job_finished")
    assert finished == Counter({f"k{n:02d}": 1 for n in range(count)})


def test_router_killed_mid_batch_delays_jobs_without_failing_them(
    router: Router, real_rig: RigFactory
) -> None:
    rig = real_rig(router.url)
    count = 5
    drop(rig.inbox, "aba.jsonl", aba_jobs(count, prefix="r", tokens=16))
    rig.start("--once")
    daemon = rig.procs[-1]
    wait_until(lambda: len(finished_stages(rig)) >= 2, "two stages checkpointed")
    router.kill()
    wait_until(lambda: any(e["event"] == "backend_down" for e in rig.events()),
               "ihld says the backend is down", timeout=60)
    assert daemon.poll() is None, "the daemon must wait for the backend, not exit"
    assert not rig.failures()
    router.start()
    assert daemon.wait(300) == 0, rig.stderr()[-3000:]
    results = rig.results()
    assert not rig.failures(), {k: v["error"] for k, v in rig.failures().items()}
    assert len(results) == count
    events = [e["event"] for e in rig.events()]
    assert "backend_up" in events[events.index("backend_down"):]
    assert router.starts == 2


def test_a_model_missing_from_the_preset_fails_its_jobs_only(
    router: Router, real_rig: RigFactory
) -> None:
    rig = real_rig(router.url)
    good = [{"id": f"g{n}", "input": {"n": n},
             "stages": [stage("a", MODEL_A, "Count to {input[n]}.", 8)]} for n in range(3)]
    bad = [{"id": f"m{n}", "input": {"n": n},
            "stages": [stage("a", MODEL_A, "Count to {input[n]}.", 8),
                       stage("b", "qwen2.5:0.5b", "Check: {stages[a]}", 8)]} for n in range(2)]
    drop(rig.inbox, "mixed.jsonl", "".join(json.dumps(j) + "\n" for j in good + bad))
    proc = rig.run_once()  # its timeout is only a safety net: --once must exit by itself
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert sorted(rig.results()) == ["g0", "g1", "g2"]
    failures = rig.failures()
    assert sorted(failures) == ["m0", "m1"]
    for failure in failures.values():
        error = failure["error"]
        assert error["kind"] == "model_not_found", error
        assert "qwen2.5:0.5b" in error["message"]
    assert "qwen2.5:0.5b" not in {k.lower() for k in router.loads()}

