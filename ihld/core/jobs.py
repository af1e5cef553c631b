"""Job files: the schema users write, and its resolution into runnable stages.

A job file is JSON (one job) or JSON Lines (one job per line). Parsing is
strict (see ``jsonsafe``) and every error names the field path and, for JSON
Lines, the line number, so the author can find it. Resolution turns a
``JobSpec`` into a ``Job`` whose stages all have an actor, a model and explicit
``needs``; the scheduler only ever sees resolved jobs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ihld.common.errors import JobError

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
STAGE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Options that make Ollama reload a model when they differ from the loaded
# instance (server/sched.go needsReload). A stage that sets one of these runs
# on a *different* model as far as the scheduler is concerned.
RUNNER_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict"}
)

JsonFormat = Literal["json"] | dict[str, Any]
# Ollama's ``think``: on/off, or a level for models that have levels (api/types.go).
Think = bool | Literal["high", "medium", "low"]


class StageOverride(BaseModel):
    """Per-job or per-config changes to one stage of a named pipeline."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1, max_length=200)
    options: dict[str, Any] | None = None
    format: JsonFormat | None = None
    think: Think | None = None


class StageSpec(BaseModel):
    """One stage: which actor runs it, on which model, after which stages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    actor: str = "prompt"
    model: str | None = Field(default=None, min_length=1, max_length=200)
    needs: tuple[str, ...] | None = None  # None: the stage before it (a chain)
    options: dict[str, Any] = Field(default_factory=dict)
    format: JsonFormat | None = None
    think: Think | None = None  # None: the model's default (thinking models think)
    system: str | None = None  # for the prompt actor
    prompt: str | None = None  # for the prompt actor: a template, see ihld.plugins.builtin
    params: dict[str, Any] = Field(default_factory=dict)  # free, actor-specific

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not STAGE_NAME_RE.match(value):
            raise ValueError("stage name must match [A-Za-z0-9_-]{1,64}")
        return value

    def model_key(self) -> str:
        """The scheduler's model identity: the model plus any runner options."""
        runner = {k: v for k, v in sorted(self.options.items()) if k in RUNNER_OPTIONS}
        if not runner:
            return self.model or ""
        extra = ",".join(f"{k}={v}" for k, v in runner.items())
        return f"{self.model}{{{extra}}}"


class JobSpec(BaseModel):
    """A job as written in a job file."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    pipeline: str | None = None
    stages: list[StageSpec] | None = None
    input: Any = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    overrides: dict[str, StageOverride] = Field(default_factory=dict)
    deadline_s: float | None = Field(default=None, gt=0)

    @field_validator("id")
    @classmethod
    def _id_ok(cls, value: str | None) -> str | None:
        if value is not None and not ID_RE.match(value):
            raise ValueError("id must match [A-Za-z0-9._-] and be 1 to 128 characters")
        if value in (".", ".."):
            raise ValueError("id must not be '.' or '..'")
        return value


@dataclass(frozen=True)
class Job:
    """A validated job with resolved stages, ready for the scheduler."""

    id: str
    priority: int
    input: Any
    stages: tuple[StageSpec, ...]
    pipeline: str | None = None
    deadline_s: float | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_record(self) -> dict[str, Any]:
        """The job as stored in checkpoints and results (round-trips via ``from_record``)."""
        return {
            "id": self.id,
            "priority": self.priority,
            "input": self.input,
            "pipeline": self.pipeline,
            "deadline_s": self.deadline_s,
            "stages": [s.model_dump(mode="json", exclude_defaults=True) for s in self.stages],
            "source": self.source,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        return cls(
            id=record["id"],
            priority=record["priority"],
            input=record["input"],
            pipeline=record.get("pipeline"),
            deadline_s=record.get("deadline_s"),
            stages=tuple(StageSpec.model_validate(s) for s in record["stages"]),
            source=dict(record.get("source", {})),
        )


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """Pydantic errors as ``field.path: message`` lines, prefixed by ``where``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    prefix = f"{where}: " if where else ""
    return prefix + "; ".join(parts)


def _first_loc(exc: ValidationError) -> str:
    errors = exc.errors()
    return ".".join(str(p) for p in errors[0]["loc"]) if errors else ""


def parse_document(value: Any, where: str = "") -> JobSpec:
    """Validate one decoded JSON value against the job schema."""
    if not isinstance(value, dict):
        raise JobError(
            f"{where + ': ' if where else ''}a job must be a JSON object, "
            f"got {type(value).__name__}",
            kind="invalid_schema",
        )
    try:
        spec = JobSpec.model_validate(value)
    except ValidationError as exc:
        raise JobError(
            format_validation_error(exc, where), kind="invalid_schema", path=_first_loc(exc)
        ) from None
    if spec.pipeline is None and spec.stages is None:
        raise JobError(
            f"{where + ': ' if where else ''}a job needs 'pipeline' or 'stages'",
            kind="invalid_schema",
            path="pipeline",
        )
    if spec.pipeline is not None and spec.stages is not None:
        raise JobError(
            f"{where + ': ' if where else ''}give 'pipeline' or 'stages', not both",
            kind="invalid_schema",
            path="stages",
        )
    return spec


def default_id_for(stem: str) -> str:
    """The file stem if it is a valid id, else a safe stand-in derived from it."""
    if ID_RE.match(stem) and stem not in (".", ".."):
        return stem
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:100].strip(".") or "job"
    import hashlib

    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{safe}-{digest}"


def resolve(
    spec: JobSpec,
    job_id: str,
    *,
    pipelines: Mapping[str, Sequence[StageSpec]],
    actor_models: Mapping[str, str | None],
    config_overrides: Mapping[str, Mapping[str, StageOverride]] | None = None,
    source: dict[str, Any] | None = None,
) -> Job:
    """Turn a spec into a runnable job, or raise JobError naming what is unknown.

    ``actor_models`` maps every registered actor to its default model.
    Model precedence: job override > config override > stage > actor default.
    """
    if spec.pipeline is not None:
        if spec.pipeline not in pipelines:
            known = ", ".join(sorted(pipelines)) or "none"
            raise JobError(
                f"unknown pipeline {spec.pipeline!r} (known: {known})",
                kind="unknown_pipeline",
                path="pipeline",
            )
        base = list(pipelines[spec.pipeline])
        prefix = "pipeline"
    else:
        base = list(spec.stages or [])
        prefix = "stages"
    if not base:
        raise JobError("a job needs at least one stage", kind="invalid_schema", path=prefix)
    names = [s.name for s in base]
    for unknown in set(spec.overrides) - set(names):
        raise JobError(
            f"overrides.{unknown}: no stage named {unknown!r} (stages: {', '.join(names)})",
            kind="invalid_schema",
            path=f"overrides.{unknown}",
        )
    if len(set(names)) != len(names):
        raise JobError("stage names must be unique", kind="invalid_schema", path=prefix)
    pipeline_overrides = (config_overrides or {}).get(spec.pipeline or "", {})
    stages: list[StageSpec] = []
    for index, stage in enumerate(base):
        where = (
            f"{prefix}[{index}]"
            if prefix == "stages"
            else f"pipeline {spec.pipeline!r} stage {stage.name!r}"
        )
        if stage.actor not in actor_models:
            raise JobError(
                f"{where}: unknown actor {stage.actor!r} "
                f"(known: {', '.join(sorted(actor_models))})",
                kind="unknown_actor",
                path=f"{prefix}[{index}].actor" if prefix == "stages" else "pipeline",
            )
        update: dict[str, Any] = {}
        for override in (pipeline_overrides.get(stage.name), spec.overrides.get(stage.name)):
            if override is None:
                continue
            if override.model is not None:
                update["model"] = override.model
            if override.options is not None:
                update["options"] = {**stage.options, **override.options}
            if override.format is not None:
                update["format"] = override.format
            if override.think is not None:
                update["think"] = override.think
        model = update.get("model") or stage.model or actor_models[stage.actor]
        if not model:
            raise JobError(
                f"{where}: no model (set 'model' on the stage or in overrides)",
                kind="invalid_schema",
                path=f"{prefix}[{index}].model"
                if prefix == "stages"
                else f"overrides.{stage.name}.model",
            )
        update["model"] = model
        needs = stage.needs if stage.needs is not None else ((names[index - 1],) if index else ())
        for need in needs:
            if need not in names[:index]:
                raise JobError(
                    f"{where}: needs {need!r}, which is not an earlier stage",
                    kind="invalid_schema",
                    path=f"{prefix}[{index}].needs",
                )
        update["needs"] = tuple(needs)
        stages.append(stage.model_copy(update=update))
    return Job(
        id=job_id,
        priority=spec.priority,
        input=spec.input,
        stages=tuple(stages),
        pipeline=spec.pipeline,
        deadline_s=spec.deadline_s,
        source=source or {},
    )
