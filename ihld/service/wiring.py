"""The daemon's parts built from its config: backend clients, intake's resolver, and what
recovery does with poison, and with an older ihld's checkpoint files."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from ihld.backends.base import Backend
from ihld.backends.llamacpp import LlamaCppBackend
from ihld.backends.ollama import OllamaBackend
from ihld.backends.openai import OpenAIBackend
from ihld.backends.settings import BackendConfig
from ihld.common import jsonsafe
from ihld.core.intake import Resolver
from ihld.core.jobs import Job, JobSpec
from ihld.core.progress import JobProgress
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.plugins.host import PluginHost

log = structlog.get_logger("ihld")


def make_backends(
    configs: Sequence[BackendConfig], session: aiohttp.ClientSession
) -> dict[str, Backend]:
    """One client per configured server, by kind (Ollama, or OpenAI-compatible)."""
    clients: dict[str, Backend] = {}
    for b in configs:
        if b.kind == "ollama":
            clients[b.name] = OllamaBackend(b, session)
        elif b.kind == "llamacpp":
            clients[b.name] = LlamaCppBackend(b, session, stream=b.stream)
        else:
            clients[b.name] = OpenAIBackend(b, session, stream=b.stream)
    return clients


def make_resolver(host: PluginHost) -> Resolver:
    """Intake's resolver: the plugins' pipelines and actors (templates checked up front)."""

    def resolve(spec: JobSpec, job_id: str, source: dict[str, Any]) -> Job:
        return host.resolve(spec, job_id, source=source)

    return resolve


def adopt_checkpoints(spool: Spool, store: JobStore) -> int:
    """Move the checkpoint files of an ihld before the job store into it (an upgrade).

    Each is stored (with its progress) before its file is removed; one that
    cannot be read is kept under ``failed/inputs`` and its job failed, never lost.
    """
    adopted = 0
    for path in spool.legacy_checkpoints():
        job_id = path.name[:-5]
        if spool.is_finished(job_id):
            path.unlink()  # published just before the crash that left it
            continue
        try:
            record = jsonsafe.loads(path.read_text(encoding="utf-8"))
            progress = JobProgress(  # the old checkpoint, read the way it was written
                Job.from_record(record["job"]),
                int(record.get("seq", 0)),
                outputs=dict(record.get("outputs", {})),
                records=dict(record.get("stages", {})),
                events=list(record.get("events", [])),
                recoveries=int(record.get("recoveries", 0)),
                claimed_at=float(record.get("claimed_at", time.time())),
                deadline_at=record.get("deadline_at"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            quarantine_checkpoint(spool, path, repr(exc))
            continue
        checkpoint = jsonsafe.dumps(progress.checkpoint(), compact=True)
        store.adopt(progress.job, progress.claimed_at, progress.deadline_at, checkpoint)
        path.unlink()
        adopted += 1
    return adopted


def quarantine_checkpoint(spool: Spool, path: Path, error: str) -> None:
    """A checkpoint that cannot be read: its bytes kept, the job failed (never lost)."""
    job_id = path.name[:-5]
    kept = spool.failed_inputs / f"checkpoint-{job_id}.json"
    record = {
        "id": job_id,
        "status": "failed",
        "error": {"stage": None, "kind": "corrupt_checkpoint", "message": error},
        "source": {"kept_as": str(kept.relative_to(spool.root))},
    }
    spool.publish_failure(job_id, record)
    path.rename(kept)
    log.error("checkpoint_corrupt", job_id=job_id, error=error)


def recover_crashed(spool: Spool, store: JobStore, crashed: Iterable[str], limit: int) -> None:
    """Blocking. After a restart: the jobs the last daemon had in memory.

    One that ended just before a crash (published, its removal lost) leaves
    the store; one that was running gets one more recovery, and at ``limit``
    crashes in a row is failed as poison. Only then are the in-memory marks
    cleared: a crash before that finds them again.
    """
    ended = sorted(i for i in store.marked() | set(crashed) if spool.is_finished(i))
    store.commit((), ended)
    for stored in store.load(set(crashed) - set(ended)):
        progress = JobProgress.from_stored(stored)
        progress.recoveries += 1
        if progress.recoveries >= limit:
            poison(spool, store, progress)
            continue
        progress.event("job_recovered", recoveries=progress.recoveries)
        store.commit([(stored.id, jsonsafe.dumps(progress.checkpoint(), compact=True))])
    store.start()


def poison(spool: Spool, store: JobStore, progress: JobProgress) -> None:
    """A job that was running at every one of the last crashes: failed as poison."""
    message = (
        f"the daemon died {progress.recoveries} times while this job was running "
        "([spool] max_recoveries); quarantined as poison"
    )
    spool.publish_failure(progress.job.id, progress.failure(None, "poison", message))
    store.drop(progress.job.id)
    log.error("job_poisoned", job_id=progress.job.id, recoveries=progress.recoveries)
