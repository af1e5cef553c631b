"""Shorter wave tails: the last requests before a switch go longest expected stage first.

The scheduler with real Task objects and per-stage costs; the per-stage figures the
engine learns from the server's own times; and the bench's measure of the slot-time
idle in each drain.
"""

from __future__ import annotations

from dataclasses import dataclass

from ihld.bench.metrics import tail_idle
from ihld.core.figures import LearnedCosts, ModelFigures
from ihld.core.policies import Affinity
from ihld.core.scheduler import Scheduler
from ihld.core.tasks import BackendSlots, Dispatch, Task


@dataclass(frozen=True)
class StageCosts:
    """A proposer writes an essay (10 s); a judge a verdict (1 s)."""

    def load_s(self, model_key: str) -> float:
        return 5.0

    def service_s(self, model_key: str) -> float:
        return 5.0

    def stage_s(self, model_key: str, stage: str) -> float:
        return {"proposer": 10.0, "judge": 1.0}.get(stage, 5.0)


def first_dispatched(*, other_model_waiting: bool, longest_first: bool = True) -> list[str]:
    sched = Scheduler(
        [BackendSlots("b", slots=2)], policy=Affinity, prefetch=0, prompt_cache=False,
        costs=StageCosts(), longest_first=longest_first,
    )  # fmt: skip
    # the oldest work of model "a" is two judges; one proposer came last
    sched.add(Task("j1", "judge", "a", "a", ready_at=0.0))
    sched.add(Task("j2", "judge", "a", "a", ready_at=1.0))
    sched.add(Task("j3", "proposer", "a", "a", ready_at=2.0))
    sched.next_actions(3.0)  # asks for the load of "a"
    sched.loaded("b", "a", 3.0)
    if other_model_waiting:
        sched.add(Task("j9", "critic", "z", "z", ready_at=3.0))
    return [a.task.job_id for a in sched.next_actions(3.0) if isinstance(a, Dispatch)]


def test_the_tail_before_a_switch_goes_longest_first() -> None:
    assert first_dispatched(other_model_waiting=True) == ["j3", "j1"]


def test_without_a_switch_to_follow_the_order_is_age() -> None:
    assert first_dispatched(other_model_waiting=False) == ["j1", "j2"]


def test_longest_first_can_be_turned_off() -> None:
    assert first_dispatched(other_model_waiting=True, longest_first=False) == ["j1", "j2"]


def test_stage_times_are_learned_per_stage() -> None:
    figures = {"a": ModelFigures()}
    figures["a"].learn_stage({"eval_duration": 8_000_000_000}, "proposer")
    figures["a"].learn_stage({"eval_duration": 1_000_000_000}, "judge")
    costs = LearnedCosts(figures)
    assert costs.stage_s("a", "proposer") == 8.0 and costs.stage_s("a", "judge") == 1.0
    assert costs.stage_s("a", "critic") == costs.service_s("a")  # not learned: the model's


def test_tail_idle_counts_the_slot_time_a_drain_leaves_idle() -> None:
    def finished(t: float) -> dict[str, object]:
        return {"event": "stage_finished", "backend": "b", "model": "a",
                "timestamp": f"2026-12-04T00:00:{t:06.3f}+00:00"}

    events = [finished(1.0), finished(4.0), finished(5.0),
              {"event": "model_unloaded", "backend": "b", "model": "a",
               "timestamp": "2026-12-04T00:00:05.500+00:00"}]
    assert tail_idle(events, slots=2) == (1, 1.0)  # the last two ends: 4 s and 5 s
