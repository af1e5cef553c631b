"""The lower bound on tiny hand-computed workloads, and the stage costs it rests on."""

from __future__ import annotations

import pytest

from ihld.bench.bound import (
    Server,
    busy_s,
    critical_path_s,
    lower_bound,
    path_loads_s,
    ratio,
    stage_min_s,
)
from ihld.bench.costs import JobCost, StageCost, job_costs
from ihld.bench.runner import parsed_config, server_profile
from ihld.bench.workloads import debate_job, workload
from ihld.sim.profiles import LLAMACPP_BATCHED_CURVE, ModelSpec, get_profile

# Two made-up models with round figures: A loads in 2 s, B in 3 s.
A = ModelSpec("a", size_bytes=6, load_s=2.0, prompt_tps=100.0, gen_tps=10.0)
B = ModelSpec("b", size_bytes=6, load_s=3.0, prompt_tps=100.0, gen_tps=20.0)
C = ModelSpec("c", size_bytes=3, load_s=1.0, prompt_tps=100.0, gen_tps=10.0)


def stage(name: str, spec: ModelSpec, prompt: int, out: int, *needs: str) -> StageCost:
    return StageCost(
        name, spec.name, tuple(needs), prompt, out, prompt / spec.prompt_tps, out / spec.gen_tps
    )


def aba_job(job_id: str, arrival: float = 0.0) -> JobCost:
    """A (3 s) -> B (4 s) -> A (1 s): 4 s of work on each model."""
    return JobCost(
        job_id,
        arrival,
        0,
        (
            stage("first", A, 100, 20),  # 1 s prompt + 2 s decode
            stage("second", B, 200, 40, "first"),  # 2 s + 2 s
            stage("third", A, 50, 5, "second"),  # 0.5 s + 0.5 s
        ),
    )


def server(max_loaded: int = 1, vram: int = 0, slots: int = 1, *specs: ModelSpec) -> Server:
    chosen = specs or (A, B, C)
    return Server({s.name: s for s in chosen}, slots=slots, max_loaded=max_loaded, vram_bytes=vram)


def test_one_slot_busy_time_is_the_sum_of_stage_times() -> None:
    assert busy_s(3.0, 5.0, A, 1) == pytest.approx(8.0)
    assert busy_s(0.0, 0.0, A, 1) == 0.0


def test_four_slots_divide_prompt_by_slots_and_decode_by_the_best_throughput() -> None:
    curved = ModelSpec("q", 1, 1.0, 100.0, 10.0, throughput=LLAMACPP_BATCHED_CURVE)
    # Prompt phases run side by side unslowed; decoding at most 1.79x one stream.
    assert busy_s(4.0, 17.9, curved, 4) == pytest.approx(4 / 4 + 17.9 / 1.79)
    assert busy_s(0.0, 17.9, curved, 2) == pytest.approx(17.9 / 1.22)
    # Perfect scaling: two slots halve everything.
    linear = ModelSpec("l", 1, 1.0, 100.0, 10.0, throughput=(1.0, 2.0))
    assert busy_s(3.0, 5.0, linear, 2) == pytest.approx(4.0)
    # A stage alone is never faster than one stream.
    assert stage_min_s(stage("s", curved, 100, 10), curved, 4) == pytest.approx(2.0)


def test_serialized_models_add_loads_and_work_and_a_returning_model_reloads() -> None:
    jobs = [aba_job("j1"), aba_job("j2")]
    bound = lower_bound(jobs, server(1, 0, 1, A, B))
    # Work 8 s on A + 8 s on B; loads: the chain A, B, A forces 2 + 3 + 2 = 7 s (> 2 + 3).
    assert path_loads_s(jobs[0], frozenset({"a", "b"}), server(1, 0, 1, A, B)) == 7.0
    assert bound.terms["serial[a+b]"] == pytest.approx(23.0)
    assert bound.terms["critical_path"] == pytest.approx(2 + 3 + 3 + 4 + 2 + 1)
    assert bound.makespan_s == pytest.approx(23.0)
    assert bound.binding == "serial[a+b]"
    assert bound.busy_s == pytest.approx({"a": 8.0, "b": 8.0})


def test_models_that_fit_together_run_side_by_side() -> None:
    jobs = [aba_job("j1"), aba_job("j2")]
    bound = lower_bound(jobs, server(2, 0, 1, A, B))
    assert bound.terms["serial[a]"] == pytest.approx(8 + 2)
    assert bound.terms["serial[b]"] == pytest.approx(8 + 3)
    assert bound.terms["residency"] == pytest.approx((10 + 11) / 2)
    # B can be loaded while A runs: first ends at 5, second at max(3, 5) + 4, third at 10.
    assert bound.terms["critical_path"] == pytest.approx(10.0)
    assert bound.makespan_s == pytest.approx(11.0)


def test_vram_makes_cliques() -> None:
    srv = server(3, 10, 1)  # a + b = 12 > 10: never together; c fits beside either
    assert srv.conflict("a", "b") and not srv.conflict("a", "c") and not srv.conflict("b", "c")
    job = JobCost(
        "j",
        0.0,
        0,
        (stage("x", A, 100, 10), stage("y", B, 100, 20, "x"), stage("z", C, 100, 10, "y")),
    )  # 2 s on each model
    bound = lower_bound([job], srv)
    assert bound.terms["serial[a+b]"] == pytest.approx(2 + 2 + 2 + 3)
    assert bound.terms["serial[c]"] == pytest.approx(2 + 1)
    assert bound.terms["vram"] == pytest.approx((6 * 4 + 6 * 5 + 3 * 3) / 10)
    # x: 2 + 2; y after a conflicting model: + load 3 + 2; z: c preloaded, + 2.
    assert critical_path_s(job, srv) == pytest.approx(11.0)
    assert bound.makespan_s == pytest.approx(11.0)


def test_release_times_bound_the_work_released_after_t() -> None:
    jobs = [aba_job("j1"), aba_job("j2", 20.0), aba_job("j3", 20.0)]
    bound = lower_bound(jobs, server(1, 0, 1, A, B))
    # After t = 20: 16 s of work, and loads of A and B less the one that may be resident.
    assert bound.terms["released[a+b]"] == pytest.approx(20 + 16 + 2)
    assert bound.terms["critical_path"] == pytest.approx(20 + 13)
    assert bound.makespan_s == pytest.approx(38.0)


def test_ratio_is_none_without_a_bound() -> None:
    assert ratio(10.0, 0.0) is None
    assert ratio(10.0, 5.0) == 2.0


def test_debate_costs_follow_the_simulator() -> None:
    """The proposer's answer feeds the critic's prompt, both feed the judge's."""
    w = workload("seed", jobs=2)
    profile = server_profile(w)
    costs = job_costs(w.jobs(), parsed_config(w), profile)
    proposer, critic, judge = costs[0].stages
    assert (proposer.model, critic.model, judge.model) == ("qwen2.5:7b", "gemma2:9b", "qwen2.5:7b")
    assert critic.needs == ("proposer",) and judge.needs == ("critic",)
    # Answers are 300 tokens +-20 %, the judge's JSON verdict too (its reason carries them).
    assert 240 <= proposer.output_tokens <= 360 and 240 <= critic.output_tokens <= 360
    assert 230 <= judge.output_tokens <= 370
    # The critic reads the proposer's ~300 words, the judge both answers.
    assert critic.prompt_tokens > proposer.prompt_tokens + 200
    assert judge.prompt_tokens > critic.prompt_tokens + 200
    qwen = get_profile("laptop-6gb").spec("qwen2.5:7b")
    assert qwen is not None
    assert proposer.service_s == pytest.approx(
        proposer.prompt_tokens / qwen.prompt_tps + proposer.output_tokens / qwen.gen_tps
    )
    # Same job, same costs: deterministic; another topic, another answer.
    again = job_costs([(0.0, debate_job(0))], parsed_config(w), profile)[0]
    assert again.stages == costs[0].stages
    assert costs[1].stages != costs[0].stages


def test_seed_bound_is_three_loads_plus_the_work() -> None:
    w = workload("seed", jobs=50)
    profile = server_profile(w)
    costs = job_costs(w.jobs(), parsed_config(w), profile)
    bound = lower_bound(costs, Server.from_profile(profile))
    work = sum(job.service_s for job in costs)
    assert bound.makespan_s == pytest.approx(work + 2.0 + 2.3 + 2.0)
