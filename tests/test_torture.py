"""Crash torture: the daemon is killed with SIGKILL over and over while a batch runs.

The harness is ``benchmarks/torture.py`` (its docstring says what is checked);
``benchmarks/RELIABILITY.md`` has the figures of the full run. Here a short
run (10 kills, one of each mode in turn) is part of ``make test``; the full
one (400 jobs, 120 kills) is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.torture import Torture


def test_short_torture_loses_nothing(tmp_path: Path) -> None:
    torture = Torture(
        tmp_path / "torture",
        jobs=60,
        kills=10,
        seed=3,
        speed=20.0,
        modes=["failpoint", "event", "random"],
        finish_timeout_s=120.0,
        wait_s=(3.0, 5.0),
    )
    report = torture.run()
    assert report.ok, report.summary()
    assert len(report.kill_log) == 10
    assert report.in_outbox == 60 and report.in_failed == 0
    assert report.kills_with_work >= 6, report.summary()
    assert report.finished_resent == [] and report.lost == [] and report.duplicates == []


@pytest.mark.slow
def test_full_torture_loses_nothing(tmp_path: Path) -> None:
    """The run behind RELIABILITY.md: 400 jobs, 120 kills (about 6 minutes here)."""
    report = Torture(tmp_path / "torture", jobs=400, kills=120, seed=1, speed=10.0).run()
    assert report.ok, report.summary()
    assert len(report.kill_log) >= 100
    assert report.in_outbox == 400
    assert sum(report.failpoints_fired.values()) >= 10, report.summary()
    assert report.events_killed_on.get("model_loading", 0) >= 3, report.summary()
