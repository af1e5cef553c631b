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
    from ihld.actors import Actor as Actor
    from ihld.actors import ActorLike as ActorLike
    from ihld.actors import StageContext as StageContext
    from ihld.backends.base import ChatRequest as ChatRequest
    from ihld.backends.base import ChatResult as ChatResult
    from ihld.builtin import chat_request as chat_request
    from ihld.builtin import parse_json_reply as parse_json_reply
    from ihld.errors import StageError as StageError
    from ihld.hookspecs import hookimpl as hookimpl
    from ihld.jobs import Job as Job
    from ihld.jobs import StageSpec as StageSpec
    from ihld.policies import Affinity as Affinity
    from ihld.policies import Fifo as Fifo
    from ihld.scheduler import Action as Action
    from ihld.scheduler import BackendSlots as BackendSlots
    from ihld.scheduler import Policy as Policy
    from ihld.scheduler import Scheduler as Scheduler
    from ihld.scheduler import Task as Task

_API = {
    "Actor": "ihld.actors",
    "ActorLike": "ihld.actors",
    "StageContext": "ihld.actors",
    "ChatRequest": "ihld.backends.base",
    "ChatResult": "ihld.backends.base",
    "chat_request": "ihld.builtin",
    "parse_json_reply": "ihld.builtin",
    "StageError": "ihld.errors",
    "hookimpl": "ihld.hookspecs",
    "Job": "ihld.jobs",
    "StageSpec": "ihld.jobs",
    "Affinity": "ihld.policies",
    "Fifo": "ihld.policies",
    "Action": "ihld.scheduler",
    "BackendSlots": "ihld.scheduler",
    "Policy": "ihld.scheduler",
    "Scheduler": "ihld.scheduler",
    "Task": "ihld.scheduler",
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
    "Job",
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
