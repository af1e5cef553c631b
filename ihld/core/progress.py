"""One job's progress: which stages are done, which are ready, what to write.

The progress the job store keeps after every finished stage is exactly
``JobProgress.checkpoint()``; ``JobProgress.from_stored`` reads it back, so a
restarted daemon resumes each job at its first unfinished stage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ihld.core.actors import ActorLike, StageContext, prompt_prefix
from ihld.core.jobs import RUNNER_OPTIONS, Job, StageSpec
from ihld.core.storerows import StoredJob
from ihld.core.tasks import Task


def _now() -> float:
    return round(time.time(), 6)


@dataclass
class JobProgress:
    job: Job
    seq: int  # arrival order
    outputs: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    recoveries: int = 0
    claimed_at: float = field(default_factory=_now)
    deadline_at: float | None = None  # wall-clock deadline (time.time())
    arrived: float = field(default_factory=time.monotonic)  # for wait bounds; not persisted

    # -- state ------------------------------------------------------------------

    def context(self, stage: str, attempt: int) -> StageContext:
        """What the actor of ``stage`` may read: the input and the outputs so far (read-only)."""
        return StageContext(
            job_id=self.job.id,
            input=self.job.input,
            stage=self.job.stage(stage),
            outputs=MappingProxyType(self.outputs),
            attempt=attempt,
        )

    def ready_tasks(self, now: float, actors: Mapping[str, ActorLike] | None = None) -> list[Task]:
        """The stages that became ready, as scheduler tasks (now marked running).

        With ``actors``, each task carries its prompt's prefix key (prompt-cache order).
        """
        tasks = []
        for stage in self.ready_stages():
            self.running.add(stage.name)
            attempt = self.attempts.get(stage.name, 0) + 1
            prefix = None
            if actors is not None:
                prefix = prompt_prefix(actors.get(stage.actor), self.context(stage.name, attempt))
            tasks.append(
                Task(
                    job_id=self.job.id,
                    stage=stage.name,
                    model_key=stage.model_key(),
                    model=stage.model or "",
                    priority=self.job.priority,
                    job_seq=self.seq,
                    ready_at=now,
                    job_ready_at=self.arrived,
                    attempt=attempt,
                    options={k: v for k, v in stage.options.items() if k in RUNNER_OPTIONS},
                    prefix=prefix,
                    successors=frozenset(
                        s.model_key() for s in self.job.stages if stage.name in (s.needs or ())
                    ),
                )
            )
        return tasks

    def ready_stages(self) -> list[StageSpec]:
        """Stages not done or running whose ``needs`` are all done."""
        return [
            stage
            for stage in self.job.stages
            if stage.name not in self.outputs
            and stage.name not in self.running
            and all(need in self.outputs for need in stage.needs or ())
        ]

    def is_complete(self) -> bool:
        return len(self.outputs) == len(self.job.stages)

    def event(self, name: str, **fields: Any) -> None:
        self.events.append({"t": _now(), "event": name, **fields})

    def finish_stage(self, stage: str, output: Any, record: dict[str, Any]) -> None:
        self.running.discard(stage)
        self.outputs[stage] = output
        self.records[stage] = record

    # -- records ------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """What the job store keeps of a started job (the job itself is stored once)."""
        return {
            "deadline_at": self.deadline_at,
            "recoveries": self.recoveries,
            "outputs": self.outputs,
            "stages": self.records,
            "events": self.events,
        }

    @classmethod
    def from_stored(cls, stored: StoredJob) -> JobProgress:
        """A job read back from the store: fresh (no stage finished yet) or resumed."""
        batch = stored.batch
        source: dict[str, Any] = {"file": batch.file, "claim": batch.claim}
        if stored.line is not None:
            source["line"] = stored.line
        job = Job(
            id=stored.id,
            priority=stored.priority,
            input=stored.input,
            stages=stored.stages,
            pipeline=stored.pipeline,
            deadline_s=stored.deadline_s,
            source=source,
        )
        waited = max(0.0, time.time() - batch.claimed_at)
        progress = cls(
            job,
            stored.seq,
            claimed_at=batch.claimed_at,
            arrived=time.monotonic() - waited,  # wait bounds count from the claim
        )
        record = stored.progress
        if record is None:
            progress.deadline_at = stored.deadline_at
            progress.events.append(
                {
                    "t": batch.claimed_at,
                    "event": "job_claimed",
                    "file": batch.file,
                    "line": stored.line,
                }
            )
            return progress
        progress.outputs = dict(record.get("outputs", {}))
        progress.records = dict(record.get("stages", {}))
        progress.events = list(record.get("events", []))
        progress.recoveries = int(record.get("recoveries", 0))
        progress.deadline_at = record.get("deadline_at")
        return progress

    def result(self) -> dict[str, Any]:
        """The outbox record: the job, each stage's output and figures, the timeline."""
        stages = []
        for stage in self.job.stages:
            record = dict(self.records.get(stage.name, {}))
            stages.append({"name": stage.name, "output": self.outputs.get(stage.name), **record})
        return {
            "id": self.job.id,
            "status": "done",
            "job": self.job.to_record(),
            "stages": stages,
            "claimed_at": self.claimed_at,
            "finished_at": _now(),
            "events": self.events,
        }

    def failure(self, stage: str | None, kind: str, message: str, **extra: Any) -> dict[str, Any]:
        """The failed/ record: which stage, what kind of error, what it said."""
        return {
            "id": self.job.id,
            "status": "failed",
            "error": {"stage": stage, "kind": kind, "message": message, **extra},
            "job": self.job.to_record(),
            "stages": {
                name: {"output": self.outputs[name], **self.records.get(name, {})}
                for name in self.outputs
            },
            "claimed_at": self.claimed_at,
            "failed_at": _now(),
            "events": self.events,
        }
