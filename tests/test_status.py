"""``GET /status``, ``ihld status`` (one-shot, --json, --watch), its fallback, and STATUS=."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ihld.backends.base import BackendUnavailable
from ihld.observe.ps_cache import PsCache
from ihld.observe.status import summary_line
from ihld.observe.status_view import render_status
from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, debate_lines, drop


def snap(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": 1_800_000_000.0,
        "pid_uptime_s": 1234.0,
        "policy": "affinity",
        "jobs": {"in_progress": 1452, "done": 312, "failed": 0, "rejected": 0},
        "stages": {"done": 1000, "retries": 2, "ready": 1450, "in_flight": 4},
        "jobs_per_min": {"1m": 41.2, "15m": 38.0},
        "eta_s": 2100.0,
        "loads": 3,
        "load_s_total": 6.9,
        "models": {
            "qwen2.5:7b": {"ready": 1450, "in_flight": 4, "done": 700, "loads": 2,
                           "load_s_total": 4.0, "stage_s": 3.21, "tokens_per_s": 88.1,
                           "prompt_evaluated": 31250},
            "gemma2:9b": {"ready": 0, "in_flight": 0, "done": 312, "loads": 1,
                          "load_s_total": 2.3, "stage_s": 3.5},
        },
        "backends": {
            "local": {
                "up": True, "down_reason": None, "slots": 4, "in_flight": 4,
                "resident": {"qwen2.5:7b": "loaded"},
                "ollama_ps": {
                    "models": [{"name": "qwen2.5:7b", "size_vram": 4_683_087_332,
                                "expires_at": "2027-01-15T08:30:00Z"}],
                    "age_s": 1.5, "error": None,
                },
            }
        },
        "spool": {"inbox": 0, "claimed": 0, "in_progress": 1452, "outbox": 312, "failed": 0},
    }  # fmt: skip
    base.update(changes)
    return base


def test_summary_line_reads_like_the_readme() -> None:
    assert summary_line(snap()) == "312/1764 done, 41 jobs/min, ETA 35m, qwen2.5:7b resident"


def test_summary_line_failures_loading_outage_and_slow_rates() -> None:
    s = snap(
        jobs={"in_progress": 10, "done": 5, "failed": 2, "rejected": 1},
        jobs_per_min={"1m": 2.46, "15m": 1.0},
        eta_s=5400.0 * 2,
    )
    s["backends"]["local"]["resident"] = {"qwen2.5:7b": "unloading", "gemma2:9b": "loading"}
    s["backends"]["gpu2"] = {"up": False, "down_reason": "refused", "slots": 1, "in_flight": 0,
                             "resident": {}}  # fmt: skip
    assert summary_line(s) == (
        "5/17 done, 2 failed, 2.5 jobs/min, ETA 3.0h, loading gemma2:9b, backend down: gpu2"
    )
    finished = snap(jobs={"in_progress": 0, "done": 40, "failed": 0, "rejected": 0}, eta_s=0.0)
    assert summary_line(finished) == "40/40 done, 41 jobs/min, qwen2.5:7b resident"


def test_render_status_is_a_compact_human_view() -> None:
    text = render_status(snap())
    lines = text.splitlines()
    assert lines[0] == "ihld 312/1764 done, 41 jobs/min, ETA 35m, qwen2.5:7b resident"
    assert "jobs/min 41 (1m) 38 (15m)" in text
    assert "loads 3 (6.9 s loading)" in text
    assert "312 done" in text and "1452 in progress" in text
    row = next(line for line in lines if line.startswith("qwen2.5:7b"))
    assert row.split() == ["qwen2.5:7b", "1450", "4", "700", "3.21", "88", "31,250", "2", "4.0",
                           "s"]  # fmt: skip
    backend = next(line for line in lines if line.startswith("local"))
    assert "up" in backend and "4/4" in backend and "qwen2.5:7b (loaded)" in backend
    assert "qwen2.5:7b 4.4 GiB VRAM" in backend  # Ollama's own view
    assert "spool: inbox 0" in text
    down = snap()
    down["backends"]["local"].update(up=False, down_reason="connection refused")
    assert "DOWN: connection refused" in render_status(down)


class FakeBackend:
    def __init__(self, name: str, delay: float = 0.0, fail: bool = False) -> None:
        self.name = name
        self.delay = delay
        self.fail = fail
        self.calls = 0

    async def ps(self) -> list[dict[str, Any]]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise BackendUnavailable("connection refused")
        return [{"name": "qwen2.5:7b", "size_vram": 1, "digest": "x", "details": {}}]


async def test_ps_cache_never_blocks_and_keeps_the_last_answer() -> None:
    fast, slow, dead = FakeBackend("fast"), FakeBackend("slow", delay=30), FakeBackend("dead")
    down = {"dead"}
    cache = PsCache(
        {"fast": fast, "slow": slow, "dead": dead},  # type: ignore[dict-item]
        lambda: down,
        interval_s=0.05,
        timeout_s=0.2,
    )
    task = asyncio.create_task(cache.run())
    try:
        s: dict[str, Any] = {"backends": {"fast": {}, "slow": {}, "dead": {}}}
        started = time.monotonic()
        cache.annotate(s)
        assert time.monotonic() - started < 0.05  # never waits for a backend
        for _ in range(100):
            await asyncio.sleep(0.05)
            cache.annotate(s)
            if s["backends"]["slow"]["ollama_ps"] is not None:
                break
        assert s["backends"]["fast"]["ollama_ps"]["models"] == [
            {"name": "qwen2.5:7b", "size_vram": 1}
        ]
        assert s["backends"]["slow"]["ollama_ps"]["error"] == "TimeoutError"
        assert s["backends"]["dead"]["ollama_ps"] == {
            "models": None, "age_s": None, "error": "backend down",
        }  # fmt: skip
        assert dead.calls == 0  # a backend marked down is not polled
        fast.fail = True  # an error keeps the last good answer, with its age
        for _ in range(100):
            await asyncio.sleep(0.05)
            cache.annotate(s)
            if s["backends"]["fast"]["ollama_ps"]["error"]:
                break
        assert "connection refused" in s["backends"]["fast"]["ollama_ps"]["error"]
        assert s["backends"]["fast"]["ollama_ps"]["models"][0]["name"] == "qwen2.5:7b"
    finally:
        task.cancel()


async def test_ps_cache_rests_while_the_daemon_is_idle() -> None:
    backend = FakeBackend("local")
    cache = PsCache(
        {"local": backend},  # type: ignore[dict-item]
        active=lambda: False,
        interval_s=0.02,
        linger_s=0.1,
    )
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.sleep(0.5)
        quiet = backend.calls
        assert 1 <= quiet < 15  # polled at start and while wanted, then not at all
        await asyncio.sleep(0.3)
        assert backend.calls == quiet
        cache.annotate({"backends": {}})  # someone asks: polling resumes at once
        await asyncio.sleep(0.1)
        assert backend.calls > quiet
    finally:
        task.cancel()


# -- against a real daemon --------------------------------------------------------------


def ihld(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IHLD, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False
    )


def test_status_of_a_running_daemon(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory("laptop-6gb-4slot", 50.0)
    rig = rig_factory(sim.url, slots=4, max_loaded=1)
    rig.start()
    rig.wait_ready(timeout=60)
    drop(rig.inbox, "batch.jsonl", debate_lines(8))
    rig.wait_finished(8, timeout=120)
    deadline = time.monotonic() + 30
    while True:  # until the counters caught up and Ollama's view was polled
        status = rig.status()
        assert status is not None
        ps = status["backends"]["sim"]["ollama_ps"]
        if (status["jobs"]["done"] == 8 and ps and ps["models"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status["jobs"] == {
        "in_progress": 0, "done": 8, "failed": 0, "rejected": 0, "waiting": 0
    }
    assert status["stages"]["done"] == 24
    models = status["models"]
    assert models["qwen2.5:7b"]["done"] == 16 and models["gemma2:9b"]["done"] == 8
    assert all(m["ready"] == 0 and m["in_flight"] == 0 for m in models.values())
    assert all(m["loads"] >= 1 and m["stage_s"] > 0 and m["tokens_per_s"] > 0
               for m in models.values())  # fmt: skip
    assert status["loads"] == sum(m["loads"] for m in models.values()) >= 2
    assert status["load_s_total"] > 0
    assert status["jobs_per_min"]["1m"] > 0 and status["jobs_per_min"]["15m"] > 0
    assert status["eta_s"] == 0.0
    backend = status["backends"]["sim"]
    assert backend["up"] is True and backend["slots"] == 4
    resident = [m for m, state in backend["resident"].items() if state == "loaded"]
    assert resident and [m["name"] for m in ps["models"]] == resident
    assert ps["models"][0]["size_vram"] > 0 and ps["error"] is None
    assert status["spool"]["outbox"] == 8

    one_shot = ihld("status", "--config", str(rig.config))
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.startswith("ihld 8/8 done, ")
    assert f"{resident[0]} resident" in one_shot.stdout.splitlines()[0]
    as_json = ihld("status", "--config", str(rig.config), "--json")
    assert json.loads(as_json.stdout)["jobs"]["done"] == 8

    watch = ihld("status", "--config", str(rig.config), "--watch", "--interval", "0.2",
                 "--count", "3")  # fmt: skip
    assert watch.returncode == 0, watch.stderr
    frames = watch.stdout.split("\x1b[H\x1b[2J")  # not a TTY: plain ANSI home + clear
    assert len(frames) == 4 and frames[0] == ""
    assert all(f.startswith("ihld 8/8 done") for f in frames[1:])
    lines = ihld("status", "--config", str(rig.config), "--watch", "--json", "--interval", "0.1",
                 "--count", "2").stdout.splitlines()  # fmt: skip
    assert [json.loads(line)["jobs"]["done"] for line in lines] == [8, 8]


def test_status_falls_back_to_the_spool_when_no_daemon_answers(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for name in ("inbox", "outbox", "failed", "run"):
        (spool / name).mkdir(parents=True)
    (spool / "inbox" / "a.json").write_text("{}")
    (spool / "outbox" / "b.json").write_text("{}")
    (spool / "outbox" / "c.json").write_text("{}")
    (spool / "run" / "ihld.sock").write_text("")  # a stale socket file: nobody listens

    result = ihld("status", "--spool", str(spool))
    assert result.returncode == 3
    assert "ihld daemon is not running" in result.stdout
    assert str(spool / "run" / "ihld.sock") in result.stdout.replace("\n", "")
    keys = {"inbox", "claimed", "in_progress", "outbox", "failed"}
    counts = dict(p for p in (line.split() for line in result.stdout.splitlines()) if p[0] in keys)
    assert set(counts) == keys
    assert counts["inbox"] == "1" and counts["outbox"] == "2" and counts["failed"] == "0"

    as_json = ihld("status", "--spool", str(spool), "--json")
    assert as_json.returncode == 3
    body = json.loads(as_json.stdout)
    assert body["daemon"] == "not running" and body["spool"]["outbox"] == 2

    watch = ihld("status", "--spool", str(spool), "--watch", "--count", "2", "--interval", "0.1")
    assert watch.returncode == 3
    assert watch.stdout.count("ihld daemon is not running") == 2


@pytest.mark.parametrize("missing", ["socket", "spool"])
def test_status_without_a_socket_at_all(tmp_path: Path, missing: str) -> None:
    spool = tmp_path / "spool"
    if missing == "socket":
        (spool / "run").mkdir(parents=True)
    result = ihld("status", "--spool", str(spool))
    assert result.returncode == 3 and "not running" in result.stdout
