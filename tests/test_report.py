"""``ihld report``: a recorded event log becomes a self-contained HTML timeline and summary.

``tests/data/run.jsonl`` is the log of a real run on the simulator (see
``tests/data/record_run.sh``): 12 debate jobs on 4 slots with one model
resident at a time, one line that is not JSON, one job without a topic, and
the simulator killed and restarted midway. The expected figures below are
computed from the raw events here, independently of ``ihld.observe.report_model``.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ihld.observe.report import load_run, parse_when, render_html, write_report
from ihld.observe.report_model import build_run
from tests.conftest import IHLD, REPO

DATA = Path(__file__).parent / "data" / "run.jsonl"


def raw_events() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("report") / "report.html"
    write_report(DATA, out)
    return out.read_text()


def test_the_run_is_reconstructed_from_events() -> None:
    events = raw_events()
    run = load_run(DATA)
    finished = [e for e in events if e["event"] == "stage_finished"]
    assert run.t0 == ts(events[0]) and run.t1 == ts(events[-1])
    assert (run.jobs_claimed, run.jobs_done, run.jobs_failed, run.jobs_rejected) == (13, 12, 1, 1)
    assert len(run.stages) == len(finished) == 36
    assert run.slots == {"sim": 4}  # from daemon_ready
    assert {s.lane for s in run.stages} == {0, 1, 2, 3}
    # no two stages overlap on one lane
    for lane in range(4):
        spans = sorted((s.start, s.end) for s in run.stages if s.lane == lane)
        assert all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(spans))
    # every stage is [t - wall_s, t], waiting queue_s before
    first = finished[0]
    stage = next(s for s in run.stages if s.job_id == first["job_id"] and s.stage == first["stage"])
    assert stage.end == ts(first) and stage.wall_s == pytest.approx(first["wall_s"])
    assert stage.ready == pytest.approx(ts(first) - first["wall_s"] - first["queue_s"])
    # model bands: one load band per model_loaded, residency between loads
    loaded = [e for e in events if e["event"] == "model_loaded"]
    loads = [b for b in run.bands if b.kind == "loading"]
    assert len(loads) == len(loaded) == 5
    assert [b.model for b in loads] == [e["model"] for e in loaded]
    assert loads[0].end - loads[0].start == pytest.approx(loaded[0]["load_s"])
    resident = [b for b in run.bands if b.kind == "resident"]
    assert len(resident) == 5 and resident[-1].open and not any(b.open for b in resident[:-1])
    for a, b in itertools.pairwise(resident):
        assert a.end <= b.start + 1e-6  # one model at a time on this backend
    # the outage: backend_down .. backend_up, and the scheduler forgot qwen on the way down
    down = next(e for e in events if e["event"] == "backend_down")
    up = next(e for e in events if e["event"] == "backend_up")
    assert len(run.outages) == 1
    assert (run.outages[0].start, run.outages[0].end) == (ts(down), ts(up))
    assert resident[0].end == ts(down)
    assert run.failures == [(ts(next(e for e in events if e["event"] == "job_failed")),
                             "rec-notopic", "invalid_input")]  # fmt: skip


def test_summary_figures() -> None:
    events = raw_events()
    run = load_run(DATA)
    finished = [e for e in events if e["event"] == "stage_finished"]
    models = run.model_totals()
    for model in ("qwen2.5:7b", "gemma2:9b"):
        mine = [e for e in finished if e["model"] == model]
        assert models[model].stages == len(mine)
        assert models[model].tokens == sum(e["eval_count"] for e in mine)
        rate = sum(e["eval_count"] for e in mine) / sum(e["eval_duration"] for e in mine) * 1e9
        assert models[model].tokens_per_s == pytest.approx(rate)
        assert models[model].loads == sum(
            1 for e in events if e["event"] == "model_loaded" and e["model"] == model
        )
    assert (models["qwen2.5:7b"].stages, models["gemma2:9b"].stages) == (24, 12)
    claims = [ts(e) for e in events if e["event"] == "job_claimed"]
    ends = [ts(e) for e in events if e["event"] in ("job_finished", "job_failed")]
    assert run.jobs_per_min == pytest.approx(12 / (max(ends) - min(claims)) * 60)
    backend = run.backend_totals()["sim"]
    parts = [backend.serving_s, backend.loading_s, backend.idle_waiting_s, backend.down_s,
             backend.idle_s]  # fmt: skip
    assert sum(parts) == pytest.approx(run.span_s)
    up = ts(next(e for e in events if e["event"] == "backend_up"))
    down = ts(next(e for e in events if e["event"] == "backend_down"))
    assert backend.down_s == pytest.approx(up - down, abs=0.01)
    load_s = sum(e["load_s"] for e in events if e["event"] == "model_loaded")
    assert backend.loading_s == pytest.approx(load_s, abs=0.01)
    assert 0 < backend.busy_slots <= 4
    assert backend.idle_waiting_s > 0  # stages were ready while nothing ran (around the outage)


def cell(page: str, key: str) -> list[str]:
    return re.findall(rf'<td data-k="{key}">(?:<i[^>]*></i>)?([^<]*)</td>', page)


def test_the_page_shows_lanes_bands_and_tables(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'<g class="lane slot" data-backend="sim" data-lane="\d"', page)) == 4
    assert page.count('<g class="lane models" data-backend="sim"') == 1
    assert page.count('<g class="lane util" data-backend="sim"') == 1
    assert page.count('<g class="band loading" data-model="qwen2.5:7b"') == 3
    assert page.count('<g class="band loading" data-model="gemma2:9b"') == 2
    assert page.count('<g class="band resident"') == 5
    assert page.count('<g class="outage">') == 1
    assert page.count('<g class="failure">') == 1
    stages = sum(
        int(n) for n in re.findall(r'<g class="stage" data-model="[^"]+" data-n="(\d+)"', page)
    )
    assert stages == 36
    assert 'class="u-serving"' in page and 'class="u-loading"' in page
    assert 'class="u-down"' in page and 'class="u-waiting"' in page  # the red "idle, work ready"
    assert re.search(r'<g class="queue" data-model="qwen2.5:7b" data-peak="\d+"', page)
    assert '<g class="done-line">' in page
    # cards and tables carry the numbers
    assert re.search(r'data-k="jobs_done">.*?<div class="value">12</div>', page)
    assert re.search(r'data-k="loads">.*?<div class="value">5</div>', page)
    assert re.search(r'data-k="stages">.*?<div class="value">36</div>', page)
    assert "1 failed · 1 rejected" in page
    assert cell(page, "model") == ["qwen2.5:7b", "gemma2:9b"]
    assert cell(page, "stages") == ["24", "12"]
    assert cell(page, "loads") == ["3", "2"]
    tokens = Counter[str]()
    for e in raw_events():
        if e["event"] == "stage_finished":
            tokens[e["model"]] += e["eval_count"]
    assert cell(page, "tokens") == [f"{tokens['qwen2.5:7b']:,}", f"{tokens['gemma2:9b']:,}"]
    assert cell(page, "backend") == ["sim"] and cell(page, "slots") == ["4"]
    assert cell(page, "down")[0].endswith("(30 %)")


def test_the_page_is_self_contained(page: str) -> None:
    lowered = page.lower()
    assert "<script" not in lowered and "src=" not in lowered and "@import" not in lowered
    assert "<link" not in lowered and "url(http" not in lowered
    # the only URL is the SVG namespace, which is a name, not a fetch
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) <= {"http://www.w3.org/2000/svg"} | {
        u
        for u in re.findall(r"http://127\.0\.0\.1:\d+", page)  # backend URLs in hover titles
    }


def test_a_time_window_clips_the_run() -> None:
    events = raw_events()
    up = ts(next(e for e in events if e["event"] == "backend_up"))
    run = load_run(DATA, since=up, until=up + 1.0)
    assert run.t0 == up and run.t1 == up + 1.0
    assert run.outages == []
    assert all(up <= s.start and s.end <= up + 1.0 for s in run.stages)
    assert 0 < len(run.stages) < 36
    assert run.jobs_claimed == 0  # claimed before the window
    assert run.backend_totals()["sim"].serving_s <= 1.0
    # a band that began before the window is cut at its start
    whole = load_run(DATA)
    middle = whole.stages[10].start
    cut = load_run(DATA, since=middle)
    assert min(b.start for b in cut.bands) >= middle


def test_parse_when() -> None:
    assert (
        parse_when("2026-05-09T07:35:00Z")
        == datetime.fromisoformat("2026-05-09T07:35:00+00:00").timestamp()
    )
    assert parse_when("2026-05-09 07:35") == parse_when("2026-05-09T07:35:00Z")  # UTC
    assert parse_when("1700000000") == 1_700_000_000
    assert parse_when("30m", now=10_000.0) == 10_000.0 - 1800
    assert parse_when("2h", now=10_000.0) == 10_000.0 - 7200
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday-ish")


def test_server_side_loads_are_estimated_under_fifo() -> None:
    """Without ihld's own loads, Ollama's load_duration shows the swaps inside requests."""

    def stage(t: float, model: str, wall: float, load: float) -> dict[str, Any]:
        stamp = datetime.fromtimestamp(t).astimezone().isoformat()
        return {"timestamp": stamp, "event": "stage_finished", "model": model,
                "backend": "gpu", "job_id": f"j{t}", "stage": "s", "wall_s": wall,
                "queue_s": 0.0, "load_duration": int(load * 1e9)}  # fmt: skip

    events = [
        stage(1010.0, "a", 10.0, 2.0),  # loads a
        stage(1020.0, "a", 10.0, 0.01),  # a resident
        stage(1032.0, "b", 12.0, 2.5),  # swaps to b
        stage(1033.0, "b", 13.0, 3.0),  # waited for the same load of b
        stage(1045.0, "a", 10.0, 2.0),  # back to a
    ]
    run = build_run(events)
    loads = run.server_loads()
    assert [(b.model, round(b.end - b.start, 3)) for b in loads] == [
        ("a", 2.0), ("b", 3.0), ("a", 2.0),
    ]  # fmt: skip
    totals = run.model_totals()
    assert (totals["a"].loads, totals["b"].loads) == (2, 1)
    backend = run.backend_totals()["gpu"]
    # loading while nothing is served: the second b request's wait overlaps the first's run
    assert backend.loading_s == pytest.approx(2.0 + 0.01 + 2.5 + 2.0, abs=0.001)
    page = render_html(run, source="synthetic")
    assert page.count('<g class="band server-load"') == 3
    assert "3 by the server" in page


def test_big_runs_stay_bounded() -> None:
    """Thousands of stages: sub-pixel bars merge, columns bin; the page stays small."""
    events = []
    t = 1_000_000.0
    for n in range(20_000):
        t += 0.05
        model = "a" if (n // 5000) % 2 == 0 else "b"
        events.append({"timestamp": datetime.fromtimestamp(t).astimezone().isoformat(),
                       "event": "stage_finished", "model": model, "backend": "gpu",
                       "job_id": f"j{n}", "stage": "s", "wall_s": 0.2, "queue_s": 1.0,
                       "eval_count": 10, "eval_duration": 10**8})  # fmt: skip
    run = build_run(events)
    assert run.slots["gpu"] == 4
    page = render_html(run, source="synthetic")
    assert len(page) < 1_500_000
    drawn = sum(
        int(n) for n in re.findall(r'<g class="stage" data-model="[ab]" data-n="(\d+)"', page)
    )
    assert drawn == 20_000


def test_empty_window_and_cli(tmp_path: Path) -> None:
    run = load_run(DATA, since=0, until=1)
    assert "Nothing to show" in render_html(run, source="x")

    out = tmp_path / "r.html"
    result = subprocess.run(
        [*IHLD, "report", "--log", str(DATA), "-o", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"wrote {out}"
    assert "12 done, 1 failed, 1 rejected" in result.stdout
    assert "sim: serving" in result.stdout and "idle with work ready" in result.stdout
    assert out.read_text().startswith("<!DOCTYPE html>")
    missing = subprocess.run(
        [*IHLD, "report", "--log", str(tmp_path / "none.jsonl"), "-o", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "no event log" in missing.stderr
    bad = subprocess.run(
        [*IHLD, "report", "--log", str(DATA), "--since", "whenever", "-o", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "not a time" in bad.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_a_headless_browser_renders_the_page(tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    write_report(DATA, html)
    png = tmp_path / "report.png"
    assert CHROMIUM is not None
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={png}", "--window-size=1400,900", html.as_uri()],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 900)
    assert len(data) > 30_000  # a drawn page, not a blank one
