"""Prometheus metrics: derived from the event stream, served on the control socket and TCP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from ihld.observe.logs import close_logging, configure_logging, read_events
from ihld.observe.metrics import Metrics
from tests.conftest import DaemonRig, SimProcess, debate_lines, drop


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def total(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _labels), v in scrape.items() if n == name)


STAGE = {
    "event": "stage_finished",
    "model": "qwen2.5:7b",
    "backend": "gpu",
    "wall_s": 2.0,
    "queue_s": 0.5,
    "eval_count": 300,
    "eval_duration": 3_000_000_000,
}


def test_events_become_counters_and_histograms() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.observe("info", STAGE)
    metrics.observe("info", {**STAGE, "model": "gemma2:9b", "truncated": True})
    metrics.observe(
        "info", {"event": "model_loaded", "model": "gemma2:9b", "backend": "gpu", "load_s": 2.3}
    )
    metrics.observe("info", {"event": "model_unloaded", "model": "gemma2:9b", "backend": "gpu"})
    metrics.observe("info", {"event": "job_claimed", "job_id": "a"})
    metrics.observe("info", {"event": "job_finished", "job_id": "a"})
    metrics.observe("warning", {"event": "job_failed", "kind": "stage_timeout"})
    metrics.observe("warning", {"event": "job_rejected", "kind": "invalid_json"})
    metrics.observe("warning", {"event": "job_rejected", "kind": "invalid_json"})
    metrics.observe(
        "warning",
        {"event": "stage_retried", "kind": "bad_reply", "model": "qwen2.5:7b", "backend": "gpu"},
    )
    metrics.observe("warning", {"event": "backend_down", "backend": "gpu"})
    metrics.observe("info", {"event": "backend_up", "backend": "gpu"})
    metrics.observe("debug", {"event": "something_else", "model": "x"})  # ignored

    s = samples(metrics.render().decode())
    qwen = {"model": "qwen2.5:7b", "backend": "gpu"}
    gemma = {"model": "gemma2:9b", "backend": "gpu"}
    assert value(s, "ihld_stages_finished_total", **qwen) == 3
    assert value(s, "ihld_stages_finished_total", **gemma) == 1
    assert value(s, "ihld_stage_duration_seconds_count", **qwen) == 3
    assert value(s, "ihld_stage_duration_seconds_sum", **qwen) == pytest.approx(6.0)
    assert value(s, "ihld_stage_duration_seconds_bucket", **qwen, le="2.0") == 3
    assert value(s, "ihld_stage_duration_seconds_bucket", **qwen, le="1.0") == 0
    assert value(s, "ihld_stage_queue_wait_seconds_sum", **qwen) == pytest.approx(1.5)
    assert value(s, "ihld_tokens_generated_total", **qwen) == 900
    # 300 tokens in 3 s = 100 tokens/s, three times
    assert value(s, "ihld_stage_tokens_per_second_sum", **qwen) == pytest.approx(300)
    assert value(s, "ihld_stage_tokens_per_second_bucket", **qwen, le="100.0") == 3
    assert value(s, "ihld_stages_truncated_total", **gemma) == 1
    assert value(s, "ihld_model_loads_total", **gemma) == 1
    assert value(s, "ihld_model_load_duration_seconds_sum", **gemma) == pytest.approx(2.3)
    assert value(s, "ihld_model_unloads_total", **gemma) == 1
    assert value(s, "ihld_jobs_claimed_total") == 1
    assert value(s, "ihld_jobs_finished_total") == 1
    assert value(s, "ihld_jobs_failed_total", kind="stage_timeout") == 1
    assert value(s, "ihld_jobs_rejected_total", kind="invalid_json") == 2
    assert value(s, "ihld_stage_retries_total", **qwen, kind="bad_reply") == 1
    assert value(s, "ihld_backend_down_events_total", backend="gpu") == 1
    assert value(s, "ihld_backend_up_events_total", backend="gpu") == 1


def test_gauges_are_read_from_the_status_at_scrape_time() -> None:
    state: dict[str, Any] = {
        "policy": "affinity",
        "models": {
            "qwen2.5:7b": {"ready": 7, "in_flight": 4},
            "gemma2:9b": {"ready": 2, "in_flight": 0},
        },
        "backends": {
            "gpu": {"up": True, "resident": {"qwen2.5:7b": "loaded"}},
            "cpu": {"up": False, "resident": {}},
        },
        "jobs": {"in_progress": 9},
        "eta_s": 120.5,
        "holds": 2,
    }
    metrics = Metrics(lambda: state)
    s = samples(metrics.render().decode())
    assert value(s, "ihld_ready_stages", model="qwen2.5:7b") == 7
    assert value(s, "ihld_inflight_stages", model="qwen2.5:7b") == 4
    assert value(s, "ihld_ready_stages", model="gemma2:9b") == 2
    assert value(s, "ihld_backend_up", backend="gpu") == 1
    assert ("ihld_backend_up", frozenset({("backend", "cpu")})) in s
    assert value(s, "ihld_backend_up", backend="cpu") == 0
    assert value(s, "ihld_model_resident", backend="gpu", model="qwen2.5:7b", state="loaded") == 1
    assert value(s, "ihld_jobs_in_progress") == 9
    assert value(s, "ihld_eta_seconds") == 120.5
    assert value(s, "ihld_model_holds_total") == 2
    state["models"]["qwen2.5:7b"]["ready"] = 3  # read again at the next scrape
    assert value(samples(metrics.render().decode()), "ihld_ready_stages", model="qwen2.5:7b") == 3


def test_each_daemon_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.observe("info", {"event": "job_finished"})
    assert value(samples(one.render().decode()), "ihld_jobs_finished_total") == 1
    assert value(samples(two.render().decode()), "ihld_jobs_finished_total") == 0


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    structlog.contextvars.clear_contextvars()
    yield
    close_logging()
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_structlog")
def test_the_log_listener_sees_events_below_the_level_with_their_context(tmp_path: Path) -> None:
    metrics = Metrics()
    log_file = tmp_path / "ihld.jsonl"
    configure_logging("warning", log_file=log_file, stderr=False, listeners=[metrics.observe])
    log = structlog.get_logger("ihld")
    structlog.contextvars.bind_contextvars(model="qwen2.5:7b", backend="gpu", job_id="j1")
    log.info("stage_finished", wall_s=1.0, queue_s=0.1, eval_count=10, eval_duration=10**8)
    structlog.contextvars.clear_contextvars()
    s = samples(metrics.render().decode())
    assert value(s, "ihld_stages_finished_total", model="qwen2.5:7b", backend="gpu") == 1
    assert list(read_events(log_file)) == []  # below the level: counted, not written


@pytest.mark.usefixtures("restore_structlog")
def test_a_failing_listener_never_breaks_logging(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []

    def broken(method: str, event: Any) -> None:
        calls.append(event["event"])
        raise RuntimeError("boom")

    log_file = tmp_path / "ihld.jsonl"
    configure_logging("info", log_file=log_file, stderr=True, listeners=[broken])
    log = structlog.get_logger("ihld")
    log.info("job_claimed", job_id="a")
    log.info("job_finished", job_id="a")
    assert calls == ["job_claimed", "job_finished"]
    assert [e["event"] for e in read_events(log_file)] == ["job_claimed", "job_finished"]
    err = capfd.readouterr().err
    notices = [json.loads(line) for line in err.splitlines() if "log_listener_failed" in line]
    assert len(notices) == 1 and "boom" in notices[0]["error"]


# -- against a real daemon -------------------------------------------------------------


async def _get(sock: Path, path: str) -> tuple[int, str, str]:
    connector = aiohttp.UnixConnector(path=str(sock))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://ihld{path}") as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def _tcp_address(rig: DaemonRig, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in rig.events():
            if event["event"] == "control_listening":
                address: str = event["address"][0]
                return address
        time.sleep(0.1)
    raise TimeoutError("no control_listening event")


def test_metrics_endpoint_of_a_real_run(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory("laptop-6gb-4slot", 100.0)
    rig = rig_factory(sim.url, slots=4, max_loaded=1)
    text = rig.config.read_text().replace("[control]\n", '[control]\nlisten = "127.0.0.1:0"\n')
    rig.config.write_text(text)
    rig.start()
    rig.wait_ready(timeout=60)
    drop(rig.inbox, "batch.jsonl", debate_lines(6))
    drop(rig.inbox, "bad.json", "{not json")
    rig.wait_finished(7, timeout=120)
    sock = rig.spool / "run" / "ihld.sock"
    deadline = time.monotonic() + 20
    while True:  # the last job's events are logged just after its result is published
        status, content_type, body = asyncio.run(_get(sock, "/metrics"))
        s = samples(body)
        if value(s, "ihld_jobs_finished_total") == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200 and content_type.startswith("text/plain")
    assert value(s, "ihld_jobs_finished_total") == 6
    assert value(s, "ihld_jobs_claimed_total") == 6
    assert value(s, "ihld_jobs_rejected_total", kind="invalid_json") == 1
    assert total(s, "ihld_stages_finished_total") == 18
    assert total(s, "ihld_stage_duration_seconds_count") == 18
    assert total(s, "ihld_stage_queue_wait_seconds_count") == 18
    assert total(s, "ihld_stage_tokens_per_second_count") == 18
    sim_tokens = sum(r["stages"][n]["eval_count"] for r in rig.results().values() for n in range(3))
    assert total(s, "ihld_tokens_generated_total") == sim_tokens
    assert value(s, "ihld_stages_finished_total", model="gemma2:9b", backend="sim") == 6
    assert value(s, "ihld_stages_finished_total", model="qwen2.5:7b", backend="sim") == 12
    loads = [e for e in rig.events() if e["event"] == "model_loaded"]
    assert total(s, "ihld_model_loads_total") == len(loads) >= 2
    assert total(s, "ihld_model_load_duration_seconds_count") == len(loads)
    assert value(s, "ihld_backend_up", backend="sim") == 1
    assert value(s, "ihld_ready_stages", model="qwen2.5:7b") == 0
    assert value(s, "ihld_jobs_in_progress") == 0
    assert value(s, "ihld_info", version="0.1.0", policy="affinity") == 1

    # the same on the TCP listener, which is read-only
    address = _tcp_address(rig)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        over_tcp = samples(resp.read().decode())
    assert value(over_tcp, "ihld_jobs_finished_total") == 6
    with urllib.request.urlopen(f"http://{address}/status", timeout=10) as resp:
        assert json.loads(resp.read())["jobs"]["done"] == 6
    poke = urllib.request.Request(f"http://{address}/poke", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(poke, timeout=10)
    assert info.value.code in (404, 405)
    assert address.startswith("127.0.0.1:")


def test_listen_is_validated(tmp_path: Path) -> None:
    from ihld.common.errors import ConfigError
    from ihld.core.config import load_config

    path = tmp_path / "ihld.toml"
    path.write_text('[control]\nlisten = "127.0.0.1:9464"\n')
    assert load_config(path).control.listen == "127.0.0.1:9464"
    assert load_config(tmp_path / "ihld.toml").control.socket is True
    path.write_text('[control]\nlisten = "anywhere"\n')
    with pytest.raises(ConfigError, match=r"key control\.listen"):
        load_config(path)
