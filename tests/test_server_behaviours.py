"""What real servers do that a scheduler must handle (issue "Never hang, never loop", item 3).

One test (or a few) per behaviour, each citing where Ollama does it:

1. an explicit load carries the stage's runner options (server/sched.go ``needsReload``);
2. two option sets of one model exclude each other on one backend (one runner per model);
3. residency follows the server's own list (/api/ps), and a load stalled behind an
   eviction stops the victim being fed (sched.go; ollama #14578, #17408);
4. a request held at the server gets a first-byte allowance, not the idle read timeout;
5. real parallelism below ``slots`` is learned (sched.go forces 1 for some architectures);
6. ``think`` passes through and ``message.thinking`` is kept apart from the content.

Plus a reload that renames a backend: applied at the next restart, nothing wedges.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ihld.backends.base import ChatRequest, ChatResult
from ihld.core.executor import finalize_request, stage_record
from ihld.core.jobs import StageSpec
from ihld.core.parallelism import ParallelWatch
from ihld.core.policies import Affinity
from ihld.core.scheduler import Scheduler
from ihld.core.tasks import BackendSlots, Dispatch, FixedCosts, Load, Task, Unload
from tests.conftest import REPO, DaemonRig, SimProcess, debate_lines, drop
from tests.fault_peer import start_fault_peer
from tests.test_fault_matrix import _config, _ends, _run_once


def one_backend(slots: int = 1, max_loaded: int = 1) -> list[BackendSlots]:
    return [BackendSlots("b", slots=slots, max_loaded=max_loaded)]


# -- 1. a load carries the runner options --------------------------------------------


async def test_load_carries_the_stage_runner_options(tmp_path: Path) -> None:
    """Without them, the first chat with num_ctx would reload the model (needsReload)."""
    async with start_fault_peer() as peer:
        bodies: list[dict[str, object]] = []
        load = peer._load

        async def recording_load(model: str, body: dict[str, object]):  # type: ignore[no-untyped-def]
            bodies.append(body)
            return await load(model, body)

        peer._load = recording_load  # type: ignore[method-assign]
        config = _config(tmp_path, [peer.url])
        job = {"id": "ctx", "stages": [{"name": "s", "model": "ok:1b", "prompt": "hi",
                                        "options": {"num_ctx": 8192, "temperature": 0.2}}]}
        (tmp_path / "spool" / "inbox" / "ctx.json").write_text(json.dumps(job))
        await _run_once(config)
    loads = [b for b in bodies if b.get("keep_alive") != 0]
    assert loads and loads[0]["options"] == {"num_ctx": 8192}  # runner options only
    assert _ends(tmp_path / "spool") == {"ctx": ("outbox", None)}


# -- 2. one runner per model -----------------------------------------------------------


def test_option_sets_of_one_model_exclude_each_other_whatever_max_loaded() -> None:
    sched = Scheduler(one_backend(max_loaded=3), policy=Affinity, prefetch=0)
    small = Task("a", "s", "qwen", "qwen", ready_at=0)
    big = Task("b", "s", "qwen{num_ctx=8192}", "qwen", ready_at=0, options={"num_ctx": 8192})
    sched.add(small)
    assert sched.next_actions(0) == [Load("b", "qwen", "qwen")]
    sched.loaded("b", "qwen", 0)
    (run,) = sched.next_actions(0)
    assert isinstance(run, Dispatch)
    sched.add(big)
    assert sched.next_actions(0) == []  # room for 3 models, but qwen's runner is busy
    sched.task_done(run.task)
    assert sched.next_actions(1) == [Unload("b", "qwen", "qwen")]
    sched.unloaded("b", "qwen", 1)
    assert sched.next_actions(1) == [Load("b", "qwen{num_ctx=8192}", "qwen", {"num_ctx": 8192})]


# -- 3. residency follows the server ----------------------------------------------------


def test_a_model_the_server_dropped_is_no_longer_resident() -> None:
    sched = Scheduler(one_backend(max_loaded=2), policy=Affinity, prefetch=0)
    sched.add(Task("a", "s", "qwen", "qwen", ready_at=0))
    sched.next_actions(0)
    sched.loaded("b", "qwen", 0)
    (run,) = sched.next_actions(0)
    sched.task_done(run.task)
    assert sched.reconcile("b", ["QWEN:latest"], asked_at=1) == []  # same model, its spelling
    assert sched.reconcile("b", [], asked_at=2) == ["qwen"]  # keep_alive expiry, say
    assert "qwen" not in sched.backends["b"].resident
    sched.add(Task("c", "s", "qwen", "qwen", ready_at=3))
    assert sched.next_actions(3) == [Load("b", "qwen", "qwen")]  # loaded again, not assumed


def test_a_model_loaded_by_someone_else_is_known_and_used() -> None:
    sched = Scheduler(one_backend(max_loaded=1), policy=Affinity, prefetch=0)
    sched.add(Task("a", "s", "gemma", "gemma", ready_at=0))
    sched.add(Task("b", "s", "qwen", "qwen", ready_at=0))
    sched.reconcile("b", ["qwen", "llama3"], asked_at=0)
    resident = sched.backends["b"].resident
    assert resident["qwen"].foreign and resident["llama3"].foreign
    actions = sched.next_actions(0)
    # qwen's task runs on the model already there; llama3 (nobody's work) makes room
    assert any(isinstance(a, Dispatch) and a.task.model == "qwen" for a in actions)
    assert Unload("b", "llama3", "llama3") in actions


def test_a_model_ihld_unloaded_is_not_taken_for_a_foreign_one() -> None:
    sched = Scheduler(one_backend(), policy=Affinity, prefetch=0)
    sched.add(Task("a", "s", "qwen", "qwen", ready_at=0))
    sched.next_actions(0)
    sched.loaded("b", "qwen", 0)
    (run,) = sched.next_actions(0)
    sched.task_done(run.task)
    sched.unloaded("b", "qwen", 1)
    sched.reconcile("b", ["qwen"], asked_at=2)  # Ollama unloads once in-flight work ends
    assert "qwen" not in sched.backends["b"].resident


def test_a_stalled_load_stops_feeding_the_model_the_server_must_evict() -> None:
    """Ollama blocks a load until the victim's in-flight requests end, and every new
    request for the victim resets its timer: keep feeding it and the load never starts."""
    sched = Scheduler(
        one_backend(slots=1, max_loaded=2), policy=Affinity, prefetch=0,
        costs=FixedCosts(load=1.0, service=1.0),
    )
    for n in range(5):
        sched.add(Task(f"q{n}", "s", "qwen", "qwen", ready_at=0))
    sched.next_actions(0)
    sched.loaded("b", "qwen", 0)
    (first,) = sched.next_actions(0)
    sched.add(Task("g", "s", "gemma", "gemma", ready_at=0, priority=1))
    assert Load("b", "gemma", "gemma") in sched.next_actions(0)  # room for two: preload
    sched.task_done(first.task)
    (fed,) = sched.next_actions(1)  # the load is young: qwen keeps working
    assert isinstance(fed, Dispatch)
    sched.task_done(fed.task)
    assert sched.next_actions(10) == []  # the load outlasts 2 x load + 5 s: stop feeding qwen
    wake = sched.next_wakeup(0.5)
    assert wake is not None and wake <= 7.0  # the daemon is woken to notice the stall


async def test_the_daemon_reloads_a_model_the_server_dropped(tmp_path: Path) -> None:
    async with start_fault_peer() as peer:
        config = _config(tmp_path, [peer.url])
        inbox = tmp_path / "spool" / "inbox"
        (inbox / "first.json").write_text(json.dumps(
            {"id": "first", "stages": [{"name": "s", "model": "ok:1b", "prompt": "hi"}]}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ihld", "run", "--config", str(config), cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            outbox = tmp_path / "spool" / "outbox"
            for _ in range(600):
                if (outbox / "first.json").exists():
                    break
                await asyncio.sleep(0.05)
            peer.resident.clear()  # the server dropped it on its own
            log = tmp_path / "spool" / "log" / "ihld.jsonl"
            for _ in range(600):
                if "model_dropped_by_server" in log.read_text():
                    break
                await asyncio.sleep(0.05)
            (inbox / "second.json").write_text(json.dumps(
                {"id": "second", "stages": [{"name": "s", "model": "ok:1b", "prompt": "x"}]}))
            for _ in range(600):
                if (outbox / "second.json").exists():
                    break
                await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    assert (tmp_path / "spool" / "outbox" / "second.json").exists()
    assert peer.loads["ok:1b"] == 2, "ihld must load it again rather than assume it is there"


# -- 4. first byte allowance --------------------------------------------------------------


async def test_a_request_held_at_the_server_past_the_read_timeout_still_succeeds(
    tmp_path: Path,
) -> None:
    """A prefetched request waits for a slot (or a load) before its first byte; the idle
    read timeout (1 s here) is for gaps between chunks."""
    async with start_fault_peer() as peer:
        chat = peer.chat

        async def held(request):  # type: ignore[no-untyped-def]
            body = await request.json()
            if body.get("messages"):
                await asyncio.sleep(1.5)  # longer than read_timeout_s = 1
            return await chat(request)

        peer.chat = held  # type: ignore[method-assign]
        config = _config(tmp_path, [peer.url])
        (tmp_path / "spool" / "inbox" / "held.json").write_text(json.dumps(
            {"id": "held", "stages": [{"name": "s", "model": "ok:1b", "prompt": "hi"}]}))
        await _run_once(config)
    assert _ends(tmp_path / "spool") == {"held": ("outbox", None)}


# -- 5. real parallelism ------------------------------------------------------------------


def _metrics(compute_s: float) -> dict[str, int]:
    return {"prompt_eval_duration": 0, "eval_duration": int(compute_s * 1e9)}


def test_parallelism_below_slots_is_learned_from_the_servers_figures() -> None:
    watch = ParallelWatch()
    seen = None
    for n in range(12):  # four sent at once, but the server ran them one after another
        seen = watch.observe("b", "m", slots=4, demand=4, finished_at=n + 1.0,
                             metrics=_metrics(1.0)) or seen
    assert seen == 1


def test_full_parallelism_is_not_mistaken_for_less() -> None:
    watch = ParallelWatch()
    results = []
    for wave in range(3):
        for _ in range(4):  # four at once, all overlapping
            results.append(watch.observe("b", "m", slots=4, demand=4,
                                         finished_at=wave + 1.0, metrics=_metrics(1.0)))
    assert results == [None] * 12
    # and no verdict from requests sent one at a time
    assert watch.observe("b", "x", slots=4, demand=1, finished_at=1.0,
                         metrics=_metrics(1.0)) is None


def test_learned_parallelism_limits_dispatch() -> None:
    sched = Scheduler(one_backend(slots=4), policy=Affinity, prefetch=0)
    for n in range(6):
        sched.add(Task(f"j{n}", "s", "m", "m", ready_at=0))
    sched.next_actions(0)
    sched.loaded("b", "m", 0, parallel=1)  # llama.cpp's total_slots, or learned
    assert len(sched.next_actions(0)) == 1
    assert sched.backends["b"].resident["m"].parallel == 1


# -- 6. thinking ----------------------------------------------------------------------------


def test_think_passes_through_and_thinking_is_kept_apart() -> None:
    stage = StageSpec(name="s", model="qwen3", think="high")
    request = finalize_request(ChatRequest(model="x", messages=[], think=None), stage)
    assert request.think == "high"
    off = finalize_request(ChatRequest(model="x", messages=[], think=False),
                           StageSpec(name="s", model="qwen3"))
    assert off.think is False  # the actor's choice stands when the stage says nothing
    result = ChatResult(content="42", done_reason="stop", thinking="six times seven")
    record = stage_record(stage, "b", 1, result, queued_s=0.0, started_at=0.0)
    assert record["thinking"] == "six times seven"
    assert "thinking" not in stage_record(
        stage, "b", 1, ChatResult(content="42", done_reason="stop"), queued_s=0, started_at=0
    )


# -- reload -----------------------------------------------------------------------------------


def test_reload_with_a_renamed_backend_keeps_the_old_one_until_restart(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory("laptop-6gb", 200.0)
    rig = rig_factory(sim.url, slots=2)
    rig.start()
    rig.wait_ready()
    drop(rig.inbox, "a.jsonl", debate_lines(6, prefix="a"))
    rig.config.write_text(rig.config.read_text().replace('name = "sim"', 'name = "renamed"'))
    rig.procs[-1].send_signal(signal.SIGHUP)
    drop(rig.inbox, "b.jsonl", debate_lines(6, prefix="b"))
    rig.wait_finished(12, timeout=120)
    events = rig.events()
    reloaded = [e for e in events if e["event"] == "config_reloaded"]
    assert reloaded and reloaded[-1]["restart_needed"] == ["backends"]
    assert len(rig.results()) == 12 and not rig.failures()
    assert {e.get("backend") for e in events if e["event"] == "stage_finished"} == {"sim"}
    rig.stop_all()
    assert rig.procs[-1].returncode == 0
