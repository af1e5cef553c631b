"""Switch on cost: a model that runs dry while work for it is on its way keeps its slots.

The scheduler with real Task objects: model "a" is loaded on a one-model
backend and has just finished everything it had; model "b" has ready work.
Whether "a" is given up at once depends on what is about to need it. Then one of
the signals ``Daemon._arriving`` combines, the watcher's, on a real inbox (the
feeder's is in tests/test_queue.py).
"""

from __future__ import annotations

from pathlib import Path

from ihld.core.policies import Affinity
from ihld.core.scheduler import Scheduler
from ihld.core.tasks import BackendSlots, Dispatch, Load, Task, Unload

LOAD_S = 5.0


class Costs:
    def load_s(self, model_key: str) -> float:
        return LOAD_S

    def service_s(self, model_key: str) -> float:
        return 2.0

    def stage_s(self, model_key: str, stage: str) -> float:
        return 2.0


def a_ran_dry(
    *, arriving: bool = False, hold_dry: bool = True, max_loaded: int = 1
) -> tuple[Scheduler, list[object]]:
    """Load "a", run its one task to the end; "b" waits. The actions right after."""
    sched = Scheduler(
        [BackendSlots("s", slots=2, max_loaded=max_loaded)], policy=Affinity, prefetch=0,
        costs=Costs(), hold_dry=hold_dry, arrivals=lambda: arriving,
    )  # fmt: skip
    sched.add(Task("j1", "proposer", "a", "a", ready_at=0.0))
    sched.next_actions(0.0)
    sched.loaded("s", "a", 1.0)
    (dispatch,) = sched.next_actions(1.0)
    assert isinstance(dispatch, Dispatch)
    sched.add(Task("j2", "critic", "b", "b", ready_at=2.0))
    assert sched.next_actions(2.0) == []  # "a" is busy: no switch while it runs
    sched.task_done(dispatch.task)
    return sched, list(sched.next_actions(3.0))


def unloads(actions: list[object]) -> list[str]:
    return [a.model_key for a in actions if isinstance(a, Unload)]


def test_a_dry_model_with_nothing_on_its_way_is_given_up_at_once() -> None:
    sched, actions = a_ran_dry(arriving=False)
    assert unloads(actions) == ["a"] and sched.stats.holds == 0


def test_a_dry_model_is_held_while_jobs_are_arriving_for_up_to_its_load_time() -> None:
    sched, actions = a_ran_dry(arriving=True)
    assert unloads(actions) == []
    assert sched.next_wakeup(3.0) == 3.0 + LOAD_S  # asked again when the hold ends
    assert unloads(sched.next_actions(3.0 + LOAD_S - 0.1)) == []
    assert unloads(sched.next_actions(3.0 + LOAD_S)) == ["a"]  # waiting longer costs more
    assert sched.stats.holds == 1  # one dry spell, however often it was asked


def test_work_that_arrives_during_the_hold_runs_without_a_switch() -> None:
    sched, _ = a_ran_dry(arriving=True)
    sched.add(Task("j3", "proposer", "a", "a", ready_at=4.0))
    actions = sched.next_actions(4.0)
    assert [a.task.job_id for a in actions if isinstance(a, Dispatch)] == ["j3"]
    assert unloads(actions) == []


def test_hold_dry_can_be_turned_off() -> None:
    _, actions = a_ran_dry(arriving=True, hold_dry=False)
    assert unloads(actions) == ["a"]


def test_work_overdue_elsewhere_ends_the_hold() -> None:
    sched, _ = a_ran_dry(arriving=True)
    sched.max_wait_s = 1.5  # "b"'s critic has now waited longer than the bound
    assert unloads(sched.next_actions(3.5)) == ["a"]


def test_a_retry_in_backoff_holds_its_model() -> None:
    sched = Scheduler(
        [BackendSlots("s", slots=2)], policy=Affinity, prefetch=0, costs=Costs(),
    )  # fmt: skip
    sched.add(Task("j1", "proposer", "a", "a", ready_at=0.0))
    sched.next_actions(0.0)
    sched.loaded("s", "a", 1.0)
    (dispatch,) = sched.next_actions(1.0)
    sched.add(Task("j2", "critic", "b", "b", ready_at=1.5))
    sched.task_done(dispatch.task)
    retry = dispatch.task.again(2.0, attempt=2, not_before=3.0, setbacks=0)
    sched.add(retry)  # a 500: the same stage again after its backoff
    assert unloads(sched.next_actions(2.0)) == []
    actions = sched.next_actions(3.0)
    assert [a.task.job_id for a in actions if isinstance(a, Dispatch)] == ["j1"]


def test_a_successor_in_flight_elsewhere_holds_the_model_it_needs() -> None:
    """Two models resident, a third waiting: "a" ran dry, but the stage running on "c"
    will need "a" next. Giving "a" up for "b" would load it again right after."""
    sched = Scheduler(
        [BackendSlots("s", slots=2, max_loaded=2)], policy=Affinity, prefetch=0, costs=Costs(),
    )  # fmt: skip
    sched.add(Task("j1", "proposer", "a", "a", ready_at=0.0))
    sched.add(Task("j2", "critic", "c", "c", ready_at=0.0, successors=frozenset({"a"})))
    dispatched = {}
    for now in (0.0, 0.5, 1.0):  # one load at a time (its time is measured on its own)
        for action in sched.next_actions(now):
            if isinstance(action, Load):
                sched.loaded("s", action.model_key, now)
            elif isinstance(action, Dispatch):
                dispatched[action.task.model_key] = action.task
    assert sorted(dispatched) == ["a", "c"]
    sched.add(Task("j3", "judge", "b", "b", ready_at=2.0))
    sched.task_done(dispatched["a"])
    assert unloads(sched.next_actions(3.0)) == []  # "c" is busy, "a" is held for j2's successor
    sched.task_done(dispatched["c"])  # j2 ends; its successor on "a" is not queued in this test
    assert unloads(sched.next_actions(3.5)) == ["a"]  # nothing on its way to "a" any more


def test_the_watcher_says_when_files_are_settling(tmp_path: Path) -> None:
    from ihld.core.spool import Spool
    from ihld.core.watcher import InboxWatcher

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    watcher = InboxWatcher(spool, settle_s=60.0, rescan_s=1.0)
    watcher.classify(spool.scan_inbox(), now=0.0)
    assert not watcher.settling()
    (spool.inbox / "half.jsonl").write_text('{"id": "x", "pipeline": "p"')  # still being written
    ready = watcher.classify(spool.scan_inbox(), now=1.0)
    assert ready.files == [] and watcher.settling()
    (spool.inbox / "half.jsonl").unlink()
    watcher.classify(spool.scan_inbox(), now=2.0)
    assert not watcher.settling()
