"""Scheduling policies: what runs next, where, and when models switch.

A policy is a class with the ``ihld.core.scheduler.Policy`` shape, made once per
scheduler. The built-in ``fifo`` and ``affinity`` are registered like any
plugin's, through the ``register_policies`` hook (``ihld.plugins.builtin``), so a
plugin file can add its own and name it in ``[scheduler] policy``.
"""

from __future__ import annotations

from ihld.core.policies.affinity import Affinity
from ihld.core.policies.fifo import Fifo
from ihld.core.scheduler import PolicyFactory

BUILTIN: dict[str, PolicyFactory] = {"affinity": Affinity, "fifo": Fifo}

__all__ = ["BUILTIN", "Affinity", "Fifo"]
