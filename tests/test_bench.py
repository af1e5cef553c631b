"""``ihld bench``: end to end on the simulator, and the metrics it computes.

Benchmark figures are asserted as ratios and counts within one run, never
as absolute times: the machine is shared and noisy.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ihld.bench.metrics import (
    StageSpan,
    cost_check,
    job_times,
    measure,
    percentile,
    sim_slowdown,
    slot_occupancy,
)
from ihld.bench.report import render, table
from ihld.bench.runner import config_text
from ihld.bench.workloads import workload

REPO = Path(__file__).resolve().parent.parent
REQUIRED = (
    "workload",
    "policy",
    "makespan_s",
    "lower_bound_s",
    "loads",
    "slot_occupancy",
    "p50_latency_s",
    "p99_latency_s",
    "jobs_per_min",
)


def bench(*args: str, timeout: float = 120.0) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "ihld", "bench", "--json", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def test_seed_bench_end_to_end() -> None:
    jobs = 20
    rows = bench("--workload", "seed", "--jobs", str(jobs), "--speed", "200")
    assert [(r["workload"], r["policy"]) for r in rows] == [("seed", "fifo"), ("seed", "affinity")]
    for row in rows:
        assert all(key in row for key in REQUIRED), row
        assert row["done"] == jobs and row["failed"] == 0
        # The bound's stage costs are what the simulator really served (a slot's
        # prompt cache may have spared part of a prompt: "cached" counts those).
        assert row["cost_check"]["stages"] == 3 * jobs
        assert row["cost_check"]["mismatched"] == 0
        assert 0 < row["lower_bound_s"] <= row["makespan_s"]
        assert row["p50_latency_s"] <= row["p99_latency_s"] <= row["makespan_s"] * 1.001
        assert 0 < row["slot_occupancy"] <= 1.0
        assert row["jobs_per_min"] == pytest.approx(jobs / (row["makespan_s"] / 60))
        assert row["machine"]["nproc"] >= 1
        assert isinstance(row["sim_slowdown"], float)  # one slot: the sim's lateness is known
    fifo, affinity = rows
    assert fifo["lower_bound_s"] == affinity["lower_bound_s"]
    assert fifo["loads"] >= 2 * jobs  # qwen -> gemma -> qwen, job by job
    assert affinity["loads"] <= 4
    assert affinity["makespan_s"] < fifo["makespan_s"]


def test_timed_and_overhead_modes_end_to_end() -> None:
    """A mid-batch urgent drop on a running daemon, and the overhead mode on `instant`."""
    rows = bench(
        "--workload", "urgent,overhead", "--jobs", "12", "--policy", "affinity", "--speed", "200"
    )
    urgent, overhead = rows
    assert urgent["done"] == 13 and urgent["failed"] == 0
    assert urgent["cost_check"]["mismatched"] == 0
    assert urgent["lower_bound_s"] <= urgent["makespan_s"]
    watch = urgent["urgent"]
    assert watch["job"] == "urgent-0012" and watch["latency_s"] > 0
    assert watch["target_s"] == pytest.approx(watch["max_wait_s"] + watch["own_service_s"])
    assert overhead["workload"] == "overhead" and overhead["done"] == 12
    figures = overhead["overhead"]
    assert figures["stages"] == 36 and figures["stages_per_s"] > 0
    assert figures["claimed"] == figures["drops"] == 10
    assert figures["drop_to_claim_p50_ms"] is not None
    text = render(rows, rows[0]["machine"])
    assert "urgent job latency" in text and "drop-to-claim" in text


def test_bad_arguments_are_refused() -> None:
    for args in (["--workload", "nope"], ["--policy", "random"], ["--jobs", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ihld", "bench", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert proc.returncode == 2 and "ihld bench:" in proc.stderr


# --- pieces ------------------------------------------------------------------------------


def test_config_times_are_real_seconds() -> None:
    w = workload("urgent", jobs=5)
    text = config_text(w, "affinity", Path("/s"), "http://127.0.0.1:9", speed=200.0)
    assert "max_wait_s = 0.6\n" in text  # 120 simulated seconds at x200
    assert 'policy = "affinity"' in text and "slots = 1" in text


def test_workloads_are_deterministic_and_scaled() -> None:
    assert workload("stream", 30, seed=1).drops == workload("stream", 30, seed=1).drops
    assert workload("stream", 30, seed=1).drops != workload("stream", 30, seed=2).drops
    stream = workload("stream", 30)
    times = [d.at_s for d in stream.drops]
    assert times == sorted(times) and times[0] == 0.0 and stream.job_count == 30
    assert {job.get("priority", 0) for _, job in stream.jobs()} == {0, 5}
    assert workload("seed").job_count == 1764
    assert workload("seed-4slot", 7).job_count == 7
    assert workload("three-models", 3).max_loaded == 2
    with pytest.raises(KeyError, match="known"):
        workload("nope")


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([float(x) for x in range(101)], 99) == pytest.approx(99.0)


def test_slot_occupancy_counts_only_time_with_waiting_work() -> None:
    # Two slots. Stage 1 runs 0-4 (ready at 0); stage 2 waits 0-2 then runs 2-4;
    # stage 3 waits 4-5 (a gap: nothing runs), runs 5-6.
    spans = [StageSpan(0, 0, 4), StageSpan(0, 2, 4), StageSpan(4, 5, 6)]
    # Waiting during [0, 2) with 1 of 2 slots busy, and [4, 5) with none: 1 / 3.
    assert slot_occupancy(spans, 2) == pytest.approx((2 * 0.5 + 1 * 0.0) / 3)
    assert slot_occupancy([StageSpan(0, 0, 1)], 1) is None  # nothing ever waited


def test_measure_uses_claims_for_batches_and_drops_for_arrivals() -> None:
    def ev(name: str, job: str, t: float, **extra: Any) -> dict[str, Any]:
        from datetime import UTC, datetime

        stamp = datetime.fromtimestamp(1_000_000 + t, UTC).isoformat().replace("+00:00", "Z")
        return {"event": name, "job_id": job, "timestamp": stamp, **extra}

    events = [
        ev("job_claimed", "a", 1.0, priority=0),
        ev("job_claimed", "b", 1.0, priority=5),
        ev("stage_finished", "b", 2.0, queue_s=0.25),
        ev("job_finished", "b", 2.0),
        ev("stage_finished", "a", 4.0, queue_s=0.5),
        ev("job_finished", "a", 4.0),
    ]
    assert job_times(events)["b"].priority == 5
    m = measure(events, [], job_ids=["a", "b"], speed=10.0, capacity=1)
    assert m.makespan_s == pytest.approx(30.0)
    assert m.latencies_s == pytest.approx({"a": 30.0, "b": 10.0})
    assert m.max_wait_s == pytest.approx({0: 5.0, 5: 2.5})
    assert m.jobs_per_min == pytest.approx(2 / 0.5)
    timed = measure(events, [], job_ids=["a"], speed=10.0, capacity=1, arrivals={"a": 1_000_000.5})
    assert timed.latencies_s == pytest.approx({"a": 35.0}) and timed.done == 1


def test_cost_check_and_sim_slowdown_read_the_servers_own_figures() -> None:
    results = [
        {
            "id": "j",
            "stages": [
                {"name": "a", "prompt_eval_count": 10, "eval_count": 30,
                 "prompt_eval_duration": 5_000_000, "eval_duration": 15_000_000},
                {"name": "b", "prompt_eval_count": 7, "eval_count": 3,
                 "prompt_eval_duration": 1_000_000, "eval_duration": 1_000_000},
            ],
        }
    ]  # fmt: skip
    predicted = {("j", "a"): (10, 30), ("j", "b"): (7, 4)}
    assert cost_check(results, predicted) == {"stages": 2, "mismatched": 1, "cached": 0}
    # a prompt partly held by the slot's cache is evaluated in part, never more than in full
    predicted = {("j", "a"): (12, 30), ("j", "b"): (6, 3)}
    assert cost_check(results, predicted) == {"stages": 2, "mismatched": 1, "cached": 1}
    # 22 ms of slot time at x100 = 2.2 s, against 2.0 s modelled: 10 % slower.
    modelled = {("j", "a"): 1.8, ("j", "b"): 0.2}
    assert sim_slowdown(results, modelled, 100.0) == pytest.approx(0.1)
    assert sim_slowdown([], modelled, 100.0) is None


def test_table_is_markdown() -> None:
    row = {
        "workload": "seed",
        "policy": "fifo",
        "done": 3,
        "failed": 0,
        "makespan_s": 10.0,
        "lower_bound_s": 5.0,
        "ratio": 2.0,
        "s_per_job": 3.33,
        "loads": 7,
        "slot_occupancy": 0.5,
        "p50_latency_s": 4.0,
        "p99_latency_s": 9.0,
        "jobs_per_min": 18.0,
    }
    lines = table([row]).splitlines()
    assert lines[0].startswith("| workload") and lines[1].startswith("|---")
    assert "2.000" in lines[2] and "50.0 %" in lines[2]


def test_multi_backend_workloads_run_beside_one_backend() -> None:
    """``--workload multi-2`` runs the seed jobs on 1 and 2 simulated GPUs, side by side."""
    rows = bench("--workload", "multi-2", "--jobs", "8", "--speed", "200")
    assert [r["backends"] for r in rows] == [1, 2]
    assert all(r["done"] == 8 and r["failed"] == 0 for r in rows)
    one, two = rows
    assert one["speedup_vs_1"] == 1.0
    assert two["speedup_vs_1"] == round(one["makespan_s"] / two["makespan_s"], 3) > 1.0


def test_speed_free_makespan_counts_idle_time_as_it_passed() -> None:
    """Work counts at the speed factor; the server's idle time (ihld's own) as real time."""
    from datetime import UTC, datetime

    from ihld.bench.metrics import speed_free_makespan

    def at(seconds: float) -> str:
        return datetime.fromtimestamp(1_000 + seconds, UTC).isoformat()

    events = [
        {"event": "job_claimed", "job_id": "a", "timestamp": at(0)},
        {"event": "job_claimed", "job_id": "b", "timestamp": at(0)},
        {"event": "job_finished", "job_id": "a", "timestamp": at(60)},
        {"event": "job_finished", "job_id": "b", "timestamp": at(100)},
    ]
    # the simulator started 10 s before the claims; it worked 0-30 s and 50-90 s into the run
    stats = {"started_at": 990.0, "work": [[5.0, 40.0], [60.0, 100.0], [150.0, 160.0]]}
    assert speed_free_makespan(events, ["a", "b"], stats, 10.0) == pytest.approx(
        10 * (30 + 40) + (100 - 70)
    )
    assert speed_free_makespan(events, ["a", "b"], {}, 10.0) is None
    # a simulator 25 % slower than its model: its working time counts at the modelled rate
    assert speed_free_makespan(events, ["a", "b"], stats, 10.0, lag=0.25) == pytest.approx(
        10 * 70 / 1.25 + 30
    )


async def test_the_simulator_reports_when_it_worked(sim_factory: Any) -> None:
    import aiohttp

    sim = sim_factory(speed=500.0)
    async with aiohttp.ClientSession() as http:
        body = {"model": "qwen2.5:7b", "stream": False, "options": {"num_predict": 3},
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        for _ in range(2):
            async with http.post(sim.url + "/api/chat", json=body) as resp:
                assert resp.status == 200
        async with http.get(sim.url + "/sim/stats") as resp:
            stats = await resp.json()
    spans = stats["work"]
    assert spans and all(a < b for a, b in spans)  # the load and the two requests
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= stats["uptime_s"]
