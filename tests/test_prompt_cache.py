"""Prompt-cache-aware order: each slot works through one prefix group at a time.

The scheduler, with real Task objects; the simulator's per-slot prompt cache,
over HTTP; ``prompt_prefix`` on the built-in prompt actor; and the ``rubrics``
workload run by the real daemon against the simulator, both ways.
"""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import pytest

from ihld.backends.base import ChatRequest
from ihld.core.actors import PREFIX_MIN_CHARS, StageContext, prompt_prefix
from ihld.core.jobs import StageSpec
from ihld.core.policies import Affinity
from ihld.core.scheduler import Scheduler
from ihld.core.tasks import BackendSlots, Dispatch, Task
from ihld.plugins.builtin import PROMPT_ACTOR
from tests.conftest import REPO

GROUPS = [f"g{n}" for n in range(8)]


def scheduler(*, prompt_cache: bool, slots: int = 4, prefetch: int = 0) -> Scheduler:
    sched = Scheduler(
        [BackendSlots("b", slots=slots)], policy=Affinity, prefetch=prefetch,
        prompt_cache=prompt_cache,
    )  # fmt: skip
    return sched


def interleaved(sched: Scheduler, per_group: int = 3) -> None:
    n = 0
    for _round in range(per_group):
        for group in GROUPS:
            sched.add(Task(f"j{n:02d}", "grade", "m", "m", ready_at=float(n), prefix=group))
            n += 1


def start(sched: Scheduler) -> list[Task]:
    sched.next_actions(0.0)  # asks for the load
    sched.loaded("b", "m", 0.0)
    return [a.task for a in sched.next_actions(0.0) if isinstance(a, Dispatch)]


def finish(sched: Scheduler, task: Task) -> list[Task]:
    sched.release(task)
    sched.task_done(task)
    return [a.task for a in sched.next_actions(1.0) if isinstance(a, Dispatch)]


def test_each_slot_keeps_its_prefix_group() -> None:
    sched = scheduler(prompt_cache=True)
    interleaved(sched)
    first = start(sched)
    assert [t.prefix for t in first] == ["g0", "g1", "g2", "g3"]  # one group a slot
    running = {t.prefix: t for t in first}
    order = []
    for _ in range(20):  # bounded: 24 tasks
        group = min(running, key=lambda g: running[g].job_id)
        done = running.pop(group)
        (nxt,) = finish(sched, done)
        order.append((done.prefix, nxt.prefix))
        running[nxt.prefix or ""] = nxt
        if len(order) >= 8:
            break
    # a finished group's next request goes to the slot that holds its prefix
    assert order[:4] == [("g0", "g0"), ("g1", "g1"), ("g2", "g2"), ("g3", "g3")]


def test_without_prompt_cache_the_order_is_age() -> None:
    sched = scheduler(prompt_cache=False)
    interleaved(sched)
    first = start(sched)
    (nxt,) = finish(sched, first[0])
    assert [t.job_id for t in first] == ["j00", "j01", "j02", "j03"] and nxt.job_id == "j04"


def test_priority_still_comes_first() -> None:
    sched = scheduler(prompt_cache=True, slots=1)
    sched.add(Task("warm", "s", "m", "m", ready_at=0.0, prefix="g0"))
    sched.add(Task("more-g0", "s", "m", "m", ready_at=1.0, prefix="g0"))
    sched.add(Task("urgent", "s", "m", "m", ready_at=2.0, priority=5, prefix="g1"))
    (first,) = start(sched)
    assert first.job_id == "urgent"


def test_a_prefixed_request_is_not_prefetched_beyond_the_slots() -> None:
    with_prefix = scheduler(prompt_cache=True, slots=2, prefetch=2)
    interleaved(with_prefix, per_group=1)
    assert len(start(with_prefix)) == 2  # no request waits at the server for a slot
    plain = scheduler(prompt_cache=False, slots=2, prefetch=2)
    interleaved(plain, per_group=1)
    assert len(start(plain)) == 4


def test_prompt_prefix_keys_long_first_messages() -> None:
    long_system = "Rubric. " * (PREFIX_MIN_CHARS // 8 + 1)

    def ctx(system: str | None) -> StageContext:
        stage = StageSpec(name="grade", actor="prompt", model="m", system=system,
                          prompt="Grade: {input[a]}")  # fmt: skip
        return StageContext(job_id="j", input={"a": "x"}, stage=stage, outputs={})

    key = prompt_prefix(PROMPT_ACTOR, ctx(long_system))
    assert key is not None and key == prompt_prefix(PROMPT_ACTOR, ctx(long_system))
    assert key != prompt_prefix(PROMPT_ACTOR, ctx(long_system + "!"))
    assert prompt_prefix(PROMPT_ACTOR, ctx("short")) is None
    assert prompt_prefix(None, ctx(long_system)) is None

    class Broken:
        name = "broken"
        default_model = None

        def build_request(self, ctx: StageContext) -> ChatRequest:
            raise KeyError("needs a stage that has not run")

        def parse_response(self, ctx: StageContext, result: object) -> object:
            return None

    assert prompt_prefix(Broken(), ctx(long_system)) is None


async def test_sim_slots_reuse_a_cached_prefix(sim_factory: object) -> None:
    """Same long system prompt twice in a row: the second evaluates only the new part."""
    sim = sim_factory(speed=200.0)  # type: ignore[operator]
    system = "You grade answers by this rubric. " * 200
    async with aiohttp.ClientSession() as http:

        async def ask(user: str, path: str = "/api/chat") -> dict[str, object]:
            body = {"model": "qwen2.5:7b", "stream": False, "options": {"num_predict": 4},
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": user}]}  # fmt: skip
            if path != "/api/chat":
                body = {k: v for k, v in body.items() if k != "options"} | {"max_tokens": 4}
            async with http.post(sim.url + path, json=body) as resp:  # type: ignore[attr-defined]
                assert resp.status == 200
                reply: dict[str, object] = await resp.json()
                return reply

        first = await ask("first answer")
        second = await ask("second answer")
        total = int(first["prompt_eval_count"])  # type: ignore[call-overload]
        assert int(second["prompt_eval_count"]) < total // 10  # type: ignore[call-overload]
        third = await ask("third answer", "/v1/chat/completions")
        timings = third["timings"]
        assert isinstance(timings, dict) and timings["cache_n"] > 0
        assert timings["cache_n"] + timings["prompt_n"] == third["usage"]["prompt_tokens"]  # type: ignore[index]


@pytest.mark.slow
def test_rubrics_on_the_simulator_evaluate_fewer_prompt_tokens() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ihld", "bench", "--workload", "rubrics", "--jobs", "24",
         "--policy", "affinity-plain,affinity", "--speed", "50", "--json"],
        capture_output=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    plain, aware = json.loads(proc.stdout)
    assert plain["done"] == aware["done"] == 24
    # 8 rubrics, 3 jobs each: each rubric evaluated about once, not three times
    assert aware["prompt_evaluated"] * 2 < plain["prompt_evaluated"]

