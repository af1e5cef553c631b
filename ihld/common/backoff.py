"""Capped exponential backoff with jitter: the one retry delay of the daemon.

Used wherever something is tried again: the clients' quick transport retries,
a stage retried after a failure, a model load that failed, the health probe of
a backend, the group committer on a failing disk and intake on a full one.
Jitter over the upper half keeps clients that failed together (a 503 burst)
from retrying together, while the wait still grows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def backoff_delay(
    retry: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
    ceiling = min(cap_s, base_s * (2 ** min(max(0, retry - 1), 62)))
    return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass
class Backoff:
    """A retry counter for one loop: ``next()`` gives the next delay, ``reset()`` starts over."""

    base_s: float
    cap_s: float
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next(self) -> float:
        self.failures += 1
        return backoff_delay(self.failures, base_s=self.base_s, cap_s=self.cap_s, rng=self.rng)

    def reset(self) -> None:
        self.failures = 0
