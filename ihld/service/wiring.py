"""The daemon's parts built from its config: backend clients, intake's resolver, and what
recovery does with a checkpoint it cannot trust."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import structlog

from ihld.backends.base import Backend
from ihld.backends.llamacpp import LlamaCppBackend
from ihld.backends.ollama import OllamaBackend
from ihld.backends.openai import OpenAIBackend
from ihld.backends.settings import BackendConfig
from ihld.core.intake import Resolver
from ihld.core.jobs import Job, JobSpec
from ihld.core.progress import JobProgress
from ihld.core.spool import Spool
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


def quarantine_checkpoint(spool: Spool, job_id: str, error: str) -> None:
    """A checkpoint that cannot be read: its bytes kept, the job failed (never lost)."""
    path = spool.jobs / f"{job_id}.json"
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


async def poison(spool: Spool, progress: JobProgress) -> None:
    """A job that was running at every one of the last crashes: failed as poison."""
    message = (
        f"the daemon died {progress.recoveries} times while this job was running "
        "([spool] max_recoveries); quarantined as poison"
    )
    record = progress.failure(None, "poison", message)
    await asyncio.to_thread(spool.publish_failure, progress.job.id, record)
    await asyncio.to_thread(spool.remove_checkpoint, progress.job.id)
    log.error("job_poisoned", job_id=progress.job.id, recoveries=progress.recoveries)
