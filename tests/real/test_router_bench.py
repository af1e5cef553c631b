"""``ihld bench --backend`` and ``ihld calibrate`` against the real router (marker ``real``).

Small on purpose (a few jobs, few tokens): the figures in benchmarks/README.md come
from full runs; here every run must finish its jobs, count its loads from the
router, and the calibrated profile must load into the simulator and serve.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ihld.sim.profiles import get_profile
from tests.real.router import Router

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[2]


def ihld(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ihld", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_backend_runs_fifo_affinity_and_the_hand_batched_reference(router: Router) -> None:
    out = ihld("bench", "--backend", router.url, "--jobs", "3", "--tokens", "8", "--json")
    runs = {r["run"]: r for r in json.loads(out)}
    assert set(runs) == {"fifo", "affinity", "hand-batched"}
    for run in runs.values():
        assert run["done"] == run["jobs"] == 3
        assert run["makespan_s"] > 0 and run["tokens"] > 0
    assert runs["affinity"]["loads_total"] == 3  # A, B, A: one load each
    assert runs["fifo"]["loads_total"] > runs["affinity"]["loads_total"]


def test_calibrate_writes_a_profile_the_simulator_takes(router: Router, tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    ihld("calibrate", router.url, "--models", "gemma3:270m", "--rounds", "1", "--tokens", "8",
         "--out", str(out))
    profile = get_profile(str(out))
    (model,) = profile.models
    assert model.name == "gemma3:270m" and model.load_s > 0 and model.gen_tps > 0
    assert profile.slots == 4 and len(model.throughput) == 4 and model.throughput[0] == 1.0
