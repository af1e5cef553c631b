"""The job store's schema and the rows it reads and writes (``ihld.core.store``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ihld.core.jobs import StageSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    claim TEXT NOT NULL UNIQUE,     -- the claimed file's name under work/claimed
    file TEXT NOT NULL,             -- the name the user gave it
    claimed_at REAL NOT NULL,
    recorded INTEGER NOT NULL DEFAULT 0,   -- entries recorded so far (a replay resumes after)
    ingested INTEGER NOT NULL DEFAULT 0    -- every entry is recorded
);
CREATE TABLE IF NOT EXISTS stagesets (
    id INTEGER PRIMARY KEY,
    stages TEXT NOT NULL UNIQUE,    -- resolved stages, compact JSON
    pipeline TEXT,
    model TEXT NOT NULL             -- the first stage's model key (status, ordering)
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    id TEXT NOT NULL UNIQUE,
    batch INTEGER NOT NULL,
    line INTEGER,
    priority INTEGER NOT NULL,
    stageset INTEGER NOT NULL,
    deadline_s REAL,                        -- the job's own, as written
    deadline_at REAL,                       -- when it fails unfinished (NULL: never)
    input TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 0,      -- materialised by the running daemon
    progress TEXT                           -- NULL until a stage has finished
);
CREATE INDEX IF NOT EXISTS queue ON jobs (active, priority DESC, seq);
CREATE INDEX IF NOT EXISTS started ON jobs (seq) WHERE progress IS NOT NULL;
CREATE INDEX IF NOT EXISTS deadlines ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;
"""


@dataclass(frozen=True)
class Batch:
    """A claimed file as the store knows it."""

    id: int
    claim: str
    file: str
    claimed_at: float
    recorded: int  # entries recorded so far: a replay after a crash resumes after them
    ingested: bool


@dataclass(frozen=True)
class NewJob:
    """An accepted entry, as intake records it."""

    id: str
    line: int | None
    priority: int
    stages: tuple[StageSpec, ...]
    pipeline: str | None
    deadline_s: float | None
    deadline_at: float | None
    input: str  # compact JSON


@dataclass(frozen=True)
class StoredJob:
    """A job read back for the engine: everything ``JobProgress`` needs."""

    seq: int
    id: str
    batch: Batch
    line: int | None
    priority: int
    stages: tuple[StageSpec, ...]
    pipeline: str | None
    deadline_s: float | None
    deadline_at: float | None
    input: Any
    progress: dict[str, Any] | None  # None: no stage finished yet


@dataclass(frozen=True)
class Waiting:
    """Jobs in the store that are not in memory (``JobStore.waiting_view``; the snapshot's)."""

    jobs: int = 0
    by_model: Mapping[str, int] = field(default_factory=dict)  # by first stage's model
    stages: Mapping[str, int] = field(default_factory=dict)  # their stages, by model


COLUMNS = "seq, id, batch, line, priority, stageset, deadline_s, deadline_at, input, progress"


def stages_text(stages: Sequence[StageSpec]) -> str:
    return json.dumps(
        [s.model_dump(mode="json", exclude_defaults=True) for s in stages],
        separators=(",", ":"),
        sort_keys=True,
    )
