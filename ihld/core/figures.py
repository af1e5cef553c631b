"""What ihld learns of each model from the server's own figures.

Load times and stage times feed the scheduler's cost model (when a switch
pays, when splitting a queue across backends pays) and the ETA. Each figure
is an exponentially weighted mean, so it follows a server whose speed
changes (another tenant, thermal throttling) without forgetting at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelFigures:
    """What ihld has learned of one model from the server's own figures."""

    loads: int = 0
    load_s_total: float = 0.0
    load_s_ewma: float | None = None
    service_s_ewma: float | None = None  # wall time of one stage
    tokens_per_s_ewma: float | None = None
    stages: int = 0
    prompt_evaluated: int = 0  # prompt tokens the server evaluated (not reused from a cache)
    stage_s: dict[str, float] = field(default_factory=dict)  # service EWMA per stage name

    def learn_load(self, seconds: float) -> None:
        self.loads += 1
        self.load_s_total += seconds
        self.load_s_ewma = (
            seconds if self.load_s_ewma is None else 0.7 * self.load_s_ewma + 0.3 * seconds
        )

    def learn_stage(self, record: Mapping[str, Any], stage: str | None = None) -> None:
        self.stages += 1
        self.prompt_evaluated += int(record.get("prompt_evaluated") or 0)
        # The server's own compute time: wall time also holds waits for a slot
        # (requests kept queued at the server) and ihld's round trip.
        compute_ns = int(record.get("prompt_eval_duration") or 0) + int(
            record.get("eval_duration") or 0
        )
        service = compute_ns / 1e9 if compute_ns else float(record.get("wall_s", 0.0))
        self.service_s_ewma = (
            service if self.service_s_ewma is None else 0.9 * self.service_s_ewma + 0.1 * service
        )
        if stage is not None:  # a stage's own length: a judge's verdict is not an essay
            known = self.stage_s.get(stage)
            self.stage_s[stage] = service if known is None else 0.8 * known + 0.2 * service
        count, duration = record.get("eval_count"), record.get("eval_duration")
        if count and duration:
            rate = count / duration * 1e9
            self.tokens_per_s_ewma = (
                rate
                if self.tokens_per_s_ewma is None
                else 0.9 * self.tokens_per_s_ewma + 0.1 * rate
            )


class LearnedCosts:
    """The scheduler's cost model, from what the engine learned of each model.

    Unknown models get the mean of the known ones (or a cautious default), so
    a first switch is not free in the scheduler's eyes.
    """

    DEFAULT_S = 5.0

    def __init__(self, figures: Mapping[str, ModelFigures]) -> None:
        self.figures = figures

    def load_s(self, model_key: str) -> float:
        known = self.figures.get(model_key)
        if known is not None and known.load_s_ewma is not None:
            return known.load_s_ewma
        return self._mean("load_s_ewma")

    def service_s(self, model_key: str) -> float:
        known = self.figures.get(model_key)
        if known is not None and known.service_s_ewma is not None:
            return known.service_s_ewma
        return self._mean("service_s_ewma")

    def stage_s(self, model_key: str, stage: str) -> float:
        """One stage's expected service time on this model (the model's, until learned)."""
        known = self.figures.get(model_key)
        if known is not None and stage in known.stage_s:
            return known.stage_s[stage]
        return self.service_s(model_key)

    def _mean(self, attribute: str) -> float:
        values = [getattr(f, attribute) for f in self.figures.values()]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else self.DEFAULT_S
