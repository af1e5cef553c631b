"""ihld: a scheduling daemon for batch LLM work on local inference servers.

The plugin API is this package's top level; a plugin imports only from here::

    from ihld import Actor, ChatRequest, ChatResult, StageContext, StageError, hookimpl

Names load on first use (PEP 562), so ``import ihld`` stays cheap for the
CLI and a plugin never pulls the daemon's internals in by accident.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from ihld.backends.base import ChatRequest as ChatRequest
    from ihld.backends.base import ChatResult as ChatResult
    from ihld.common.errors import JobError as JobError
    from ihld.common.errors import StageError as StageError
    from ihld.core.actors import Actor as Actor
    from ihld.core.actors import ActorLike as ActorLike
    from ihld.core.actors import StageContext as StageContext
    from ihld.core.actors import parse_json_reply as parse_json_reply
    from ihld.core.formats import FinishedBatch as FinishedBatch
    from ihld.core.formats import IntakeFormat as IntakeFormat
    from ihld.core.formats import LineEnd as LineEnd
    from ihld.core.jobs import Job as Job
    from ihld.core.jobs import JobSpec as JobSpec
    from ihld.core.jobs import StageSpec as StageSpec
    from ihld.core.policies import Affinity as Affinity
    from ihld.core.policies import Fifo as Fifo
    from ihld.core.scheduler import Policy as Policy
    from ihld.core.scheduler import Scheduler as Scheduler
    from ihld.core.tasks import Action as Action
    from ihld.core.tasks import BackendSlots as BackendSlots
    from ihld.core.tasks import Task as Task
    from ihld.plugins.builtin import chat_request as chat_request
    from ihld.plugins.hookspecs import hookimpl as hookimpl

_API = {
    "Actor": "ihld.core.actors",
    "ActorLike": "ihld.core.actors",
    "StageContext": "ihld.core.actors",
    "ChatRequest": "ihld.backends.base",
    "ChatResult": "ihld.backends.base",
    "chat_request": "ihld.plugins.builtin",
    "parse_json_reply": "ihld.core.actors",
    "StageError": "ihld.common.errors",
    "JobError": "ihld.common.errors",
    "FinishedBatch": "ihld.core.formats",
    "IntakeFormat": "ihld.core.formats",
    "LineEnd": "ihld.core.formats",
    "JobSpec": "ihld.core.jobs",
    "hookimpl": "ihld.plugins.hookspecs",
    "Job": "ihld.core.jobs",
    "StageSpec": "ihld.core.jobs",
    "Affinity": "ihld.core.policies",
    "Fifo": "ihld.core.policies",
    "Action": "ihld.core.tasks",
    "BackendSlots": "ihld.core.tasks",
    "Policy": "ihld.core.scheduler",
    "Scheduler": "ihld.core.scheduler",
    "Task": "ihld.core.tasks",
}

__all__ = [
    "Action",
    "Actor",
    "ActorLike",
    "Affinity",
    "BackendSlots",
    "ChatRequest",
    "ChatResult",
    "Fifo",
    "FinishedBatch",
    "IntakeFormat",
    "Job",
    "JobError",
    "JobSpec",
    "LineEnd",
    "Policy",
    "Scheduler",
    "StageContext",
    "StageError",
    "StageSpec",
    "Task",
    "__version__",
    "chat_request",
    "hookimpl",
    "parse_json_reply",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ihld' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
