"""The job store read from another process: tests, the torture bench, ``ihld status``.

Read-only connections (``mode=ro``); SQLite's WAL lets them read while the
daemon writes, and they only ever see committed transactions.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection; None while there is no store yet (no file, or a file whose
    schema the daemon has not committed yet: a store being created holds no jobs)."""
    if not path.exists():
        yield None
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        made = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
        yield db if made.fetchone() else None
    finally:
        db.close()


def read_progress(path: Path) -> dict[str, dict[str, Any]]:
    """Each started job's progress, by id."""
    with _reading(path) as db:
        if db is None:
            return {}
        rows = db.execute("SELECT id, progress FROM jobs WHERE progress IS NOT NULL").fetchall()
    return {job_id: json.loads(text) for job_id, text in rows}


def read_ids(path: Path) -> list[str]:
    """The ids of the jobs the store holds, in arrival order."""
    with _reading(path) as db:
        if db is None:
            return []
        return [row[0] for row in db.execute("SELECT id FROM jobs ORDER BY seq")]


def count_jobs(path: Path) -> int:
    """How many jobs the store holds (``ihld status`` with the daemon down)."""
    with _reading(path) as db:
        if db is None:
            return 0
        value: int = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return value
