"""Injected failures: the ways a real Ollama breaks, on demand and reproducibly.

ihld must survive a server that errors, sheds load, drops connections, cuts
a stream or stops answering. Each chat/generate request that carries content
draws a fault from a seeded ``random.Random``, always consuming the same
number of draws, so one seed gives one fault sequence for one request order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# "silent": some output, then the stream just ends, with neither a done object nor an
# error line: Ollama's token-repeat abort (llm/server.go) ends a stream like that.
FAULT_KINDS: tuple[str, ...] = ("500", "503", "drop", "midstream", "hang", "silent")


def _default_weights() -> dict[str, float]:
    return {kind: 1.0 for kind in FAULT_KINDS}


@dataclass
class Faults:
    """How often chat requests fail, and how.

    - ``error_rate``: share (0..1) of chat/generate requests with content that fail.
    - ``weights``: relative weight of each kind among failures:
      ``500`` error before any output, ``503`` "server busy", ``drop`` the
      connection closed abruptly (before the response or mid-body),
      ``midstream`` status 200, some output, then an ``{"error": ...}`` line,
      ``hang`` accept and send nothing.
    - ``hang_s``: how long a hang lasts in real seconds (None: until the client
      gives up or the server stops); after it the request is served normally.
    """

    error_rate: float = 0.0
    weights: dict[str, float] = field(default_factory=_default_weights)
    hang_s: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within 0..1, got {self.error_rate}")
        unknown = set(self.weights) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {list(FAULT_KINDS)}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("fault weights must be >= 0")
        if self.error_rate > 0 and sum(self.weights.values()) <= 0:
            raise ValueError("error_rate > 0 needs at least one positive weight")
        if self.hang_s is not None and self.hang_s < 0:
            raise ValueError(f"hang_s must be >= 0, got {self.hang_s}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base: Faults | None = None) -> Faults:
        """Faults from a JSON object; keys left out keep ``base``'s values.

        ``weights`` given as a list of kinds means weight 1 each.
        """
        extra = set(data) - {"error_rate", "weights", "hang_s", "seed"}
        if extra:
            raise ValueError(f"unknown fault settings {sorted(extra)}")
        base = base or cls()
        rate = data.get("error_rate", base.error_rate)
        weights_raw = data.get("weights", base.weights)
        hang = data.get("hang_s", base.hang_s)
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ValueError("error_rate must be a number")
        if isinstance(weights_raw, list):
            weights_raw = {str(k): 1.0 for k in weights_raw}
        if not isinstance(weights_raw, Mapping):
            raise ValueError("weights must be an object of kind -> weight")
        weights: dict[str, float] = {}
        for kind, weight in weights_raw.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"weight of {kind!r} must be a number")
            weights[str(kind)] = float(weight)
        if hang is not None and (isinstance(hang, bool) or not isinstance(hang, int | float)):
            raise ValueError("hang_s must be a number or null")
        return cls(
            error_rate=float(rate),
            weights=weights,
            hang_s=None if hang is None else float(hang),
        )

    def to_json(self) -> dict[str, Any]:
        return {"error_rate": self.error_rate, "weights": dict(self.weights), "hang_s": self.hang_s}


@dataclass(frozen=True)
class FaultChoice:
    """One drawn fault. ``early`` (for ``drop``): before any response bytes."""

    kind: str
    early: bool


class FaultPicker:
    """Draws faults from a seeded generator; settings can change at runtime."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self._rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def pick(self) -> FaultChoice | None:
        """The fault for the next request, or None. Always three draws."""
        hit, which, where = self._rng.random(), self._rng.random(), self._rng.random()
        if hit >= self.faults.error_rate:
            return None
        items = [(k, w) for k, w in self.faults.weights.items() if w > 0]
        total = sum(w for _, w in items)
        point = which * total
        for kind, weight in items:
            if point < weight:
                return FaultChoice(kind, where < 0.5)
            point -= weight
        return FaultChoice(items[-1][0], where < 0.5)
