"""Scheduling policies: what runs next, where, and when models switch.

A policy is a class with the ``ihld.scheduler.Policy`` shape, made once per
scheduler. The built-in ``fifo`` and ``affinity`` are registered like any
plugin's, through the ``register_policies`` hook (``ihld.builtin``), so a
plugin file can add its own and name it in ``[scheduler] policy``.
"""

from __future__ import annotations

from ihld.policies.affinity import Affinity
from ihld.policies.fifo import Fifo
from ihld.scheduler import PolicyFactory

BUILTIN: dict[str, PolicyFactory] = {"affinity": Affinity, "fifo": Fifo}

__all__ = ["BUILTIN", "Affinity", "Fifo"]
