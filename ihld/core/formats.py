"""Intake formats: other kinds of JSON Lines files that become ihld jobs.

A plugin registers an :class:`IntakeFormat` with the ``register_intake_formats``
hook. Intake offers each decoded line of a ``.jsonl`` file to the formats in
turn; the first that ``recognise``\\ s it turns it into a job spec (``to_spec``)
and keeps a small JSON ``tag`` of it (an id the format's own output needs).
Lines nobody recognises are ihld jobs.

When every job of a file that came in through a format has ended (in
``outbox/`` or ``failed/``), the daemon hands the format a
:class:`FinishedBatch` and publishes the files ``finish`` returns in
``outbox/``. The batch's membership survives restarts (``ihld.core.batches``).
The OpenAI Batch plugin (``ihld.plugins.openai_batch``) is one such format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ihld.core.jobs import JobSpec


@dataclass(frozen=True)
class LineEnd:
    """How one line of a batch ended: its result record, or its failure record."""

    job_id: str
    line: int | None
    tag: Mapping[str, Any]
    result: Mapping[str, Any] | None  # outbox/<job_id>.json, if the job finished
    failure: Mapping[str, Any] | None  # failed/<job_id>.json, if it failed or was rejected


@dataclass(frozen=True)
class FinishedBatch:
    """A file of one format whose every line has ended."""

    name: str  # the file's stem (its default job id): outputs are named after it
    format: str
    lines: tuple[LineEnd, ...]


@runtime_checkable
class IntakeFormat(Protocol):
    """A kind of JSON Lines file. ``name`` matches ``[A-Za-z0-9_.-]{1,64}``."""

    name: str

    def recognise(self, value: Any) -> bool:
        """True if this decoded line belongs to this format (cheap; no validation)."""
        ...

    def to_spec(self, value: Any) -> JobSpec:
        """The line as a job spec, or raise ``JobError`` naming the bad field."""
        ...

    def tag(self, value: Any) -> dict[str, Any]:
        """What to remember of the line until the batch ends (small, JSON-able)."""
        ...

    def finish(self, batch: FinishedBatch) -> dict[str, bytes]:
        """The batch's output files for ``outbox/``: ``{file name: contents}``."""
        ...
