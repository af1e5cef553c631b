"""Several backends: models side by side, allow-lists, a backend killed mid-run loses no job."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, debate_lines, drop


def two_backend_rig(tmp_path: Path, urls: list[str], extra: list[str] | None = None) -> DaemonRig:
    root = tmp_path / "multi"
    root.mkdir()
    backends = "".join(
        f'[[backends]]\nname = "gpu{n}"\nurl = "{url}"\nslots = 1\nmax_loaded = 1\n'
        f"connect_timeout_s = 1\nread_timeout_s = 5\nretries = 1\n{(extra or [''] * 9)[n]}\n"
        for n, url in enumerate(urls)
    )
    config = root / "ihld.toml"
    config.write_text(
        f'[spool]\ndir = "{root / "spool"}"\nsettle_s = 0.1\nrescan_s = 0.3\n\n{backends}'
        '[limits]\nretry_backoff_s = 0.05\n\n[log]\nstderr = true\n\n[control]\ngrace_s = 5\n'
    )
    return DaemonRig(root, config)


def served_by(rig: DaemonRig) -> Counter[tuple[str, str]]:
    return Counter(
        (stage["model"], stage["backend"])
        for result in rig.results().values() for stage in result["stages"]
    )


def test_two_gpus_serve_models_side_by_side(sim_factory: Callable[..., SimProcess],
                                            tmp_path: Path) -> None:
    sims = [sim_factory(speed=200.0), sim_factory(speed=200.0)]
    rig = two_backend_rig(tmp_path, [s.url for s in sims])
    drop(rig.inbox, "batch.jsonl", debate_lines(40))
    proc = subprocess.run([*IHLD, "run", "--once", "--config", str(rig.config)],
                          capture_output=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert len(rig.results()) == 40
    used = served_by(rig)
    assert {backend for _model, backend in used} == {"gpu0", "gpu1"}
    # each GPU keeps few models resident: far fewer loads than stages
    assert sum(s.loads() for s in sims) <= 8


def test_allow_list_and_missing_model_route_elsewhere(sim_factory: Callable[..., SimProcess],
                                                     tmp_path: Path) -> None:
    sims = [sim_factory(speed=200.0), sim_factory(speed=200.0)]
    rig = two_backend_rig(tmp_path, [s.url for s in sims],
                          extra=['models = ["qwen2.5:7b"]\n', ""])
    jobs = [{"id": f"j{n}", "stages": [
        {"name": "a", "model": "qwen2.5:7b", "prompt": "hi {input[n]}"},
        {"name": "b", "model": "gemma2:9b", "prompt": "and {stages[a]}"},
        {"name": "c", "model": "no-such-model:1b", "prompt": "x"}] if n == 0 else [
        {"name": "a", "model": "qwen2.5:7b", "prompt": "hi {input[n]}"},
        {"name": "b", "model": "gemma2:9b", "prompt": "and {stages[a]}"}],
        "input": {"n": n}} for n in range(10)]
    drop(rig.inbox, "jobs.jsonl", "".join(json.dumps(j) + "\n" for j in jobs))
    proc = subprocess.run([*IHLD, "run", "--once", "--config", str(rig.config)],
                          capture_output=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert ("gemma2:9b", "gpu0") not in served_by(rig)  # the allow-list kept it off gpu0
    assert len(rig.results()) == 9
    failure = rig.failures()["j0"]["error"]
    assert failure["kind"] == "model_not_found" and "no-such-model:1b" in failure["message"]


def test_backend_killed_mid_run_loses_no_job(sim_factory: Callable[..., SimProcess],
                                             tmp_path: Path) -> None:
    sims = [sim_factory(speed=50.0), sim_factory(speed=50.0)]
    rig = two_backend_rig(tmp_path, [s.url for s in sims])
    drop(rig.inbox, "batch.jsonl", debate_lines(30))
    rig.start()
    rig.wait_ready()
    deadline = time.monotonic() + 30
    while len(rig.results()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    sims[0].proc.kill()  # gpu0 dies with requests in flight
    killed_at = time.time()
    rig.wait_finished(30, timeout=120)
    rig.stop_all()
    assert len(rig.results()) == 30 and not rig.failures()
    events = [e["event"] for e in rig.events()]
    assert "backend_down" in events
    after = [s["backend"] for r in rig.results().values() for s in r["stages"]
             if s["started_at"] > killed_at + 0.5]
    assert after and set(after) == {"gpu1"}  # everything after the kill ran on gpu1
