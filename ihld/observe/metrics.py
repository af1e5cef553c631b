"""Prometheus metrics: counters and histograms from the event stream, gauges from the status.

Served as ``GET /metrics`` on the control socket (and on ``[control] listen``
when configured); every metric is documented in ``docs/observability.md``.

Why it is built this way:

* **Counters and histograms are derived from the structured events.** The
  daemon already logs one event per state change, with the job, stage,
  model, backend and durations (``stage_finished``, ``model_loaded`` …).
  :class:`Metrics` is a *listener* on that stream
  (``logs.configure_logging(listeners=[metrics.observe])``): it sees every
  event dict, context merged, *before* level filtering, so ``level =
  "warning"`` does not blind it. Data flows one way — engine → event →
  log file and metrics — so the engine and scheduler make no metrics calls,
  the log and the metrics cannot disagree, and anything worth a metric is
  also in the log a report can replay. A listener that raises is reported
  once and never breaks logging (see ``ihld.observe.logs``).
* **Gauges are read, not tracked.** Ready and in-flight stages, resident
  models and backend health are *state*. Keeping them with inc/dec from
  events would drift (recovery after a crash, cancelled jobs, reloads);
  instead a custom collector reads the live status snapshot at scrape time,
  the same figures ``GET /status`` returns.
* **One registry per daemon.** A :class:`~prometheus_client.CollectorRegistry`
  of its own (never the process-global one), so several daemons or tests in
  one process never share or collide on metric names. No process/platform
  collectors: node-exporter does that better, and the unit is what matters.

The ``model`` label of the event-derived series is the model name the stage
was sent with; the gauges' ``model`` label is the scheduler's model key (the
same name, plus ``{num_ctx=…}`` when runner options make it a separate load).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ihld import __version__

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Bucket bounds chosen for local LLM work: stages from sub-second (the
# simulator, short prompts) to many minutes; loads from cached (< 1 s) to a
# cold 70B (minutes); decode rates from a CPU's few tokens/s to a GPU's hundreds.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800)
QUEUE_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 14400)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 40, 80, 160)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 400, 1000, 5000)

Snapshot = Callable[[], Mapping[str, Any]]


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Metrics:
    """The daemon's metrics: feed it events with :meth:`observe`, scrape with :meth:`render`."""

    def __init__(self, state: Snapshot | None = None) -> None:
        self.state = state  # the status snapshot, read at scrape time for the gauges
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()  # events may come from worker threads
        r = self.registry
        mb = ["model", "backend"]
        self.stages = Counter(
            "ihld_stages_finished", "Stages finished successfully.", mb, registry=r
        )
        self.stage_seconds = Histogram(
            "ihld_stage_duration_seconds",
            "Wall time of one stage request (send to last byte), successful stages.",
            mb,
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "ihld_stage_queue_wait_seconds",
            "Time a stage waited in ihld's ready queue before it was dispatched.",
            mb,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ihld_tokens_generated", "Tokens generated (Ollama's eval_count).", mb, registry=r
        )
        self.tokens_per_s = Histogram(
            "ihld_stage_tokens_per_second",
            "Decode rate of one stage: eval_count / eval_duration (Ollama's figures).",
            mb,
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.truncated = Counter(
            "ihld_stages_truncated",
            "Stages whose reply was cut by num_predict (done_reason length).",
            mb,
            registry=r,
        )
        self.retries = Counter(
            "ihld_stage_retries",
            "Stage attempts that failed and were retried.",
            [*mb, "kind"],
            registry=r,
        )
        self.loads = Counter("ihld_model_loads", "Model loads completed.", mb, registry=r)
        self.load_seconds = Histogram(
            "ihld_model_load_duration_seconds",
            "Time to load a model (the load request's wall time).",
            mb,
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "ihld_model_load_failures",
            "Model loads that failed for good (model not found, bad request).",
            [*mb, "kind"],
            registry=r,
        )
        self.unloads = Counter("ihld_model_unloads", "Models ihld unloaded.", mb, registry=r)
        self.jobs_claimed = Counter(
            "ihld_jobs_claimed",
            "Jobs accepted from the inbox (recovered ones excluded).",
            registry=r,
        )
        self.jobs_done = Counter("ihld_jobs_finished", "Jobs written to outbox/.", registry=r)
        self.jobs_failed = Counter(
            "ihld_jobs_failed", "Jobs that failed while running (failed/).", ["kind"], registry=r
        )
        self.jobs_rejected = Counter(
            "ihld_jobs_rejected",
            "Job files or lines rejected at intake (failed/): bad JSON, schema, duplicates …",
            ["kind"],
            registry=r,
        )
        self.backend_down = Counter(
            "ihld_backend_down_events", "Times a backend was marked down.", ["backend"], registry=r
        )
        self.backend_up = Counter(
            "ihld_backend_up_events", "Times a down backend came back.", ["backend"], registry=r
        )
        r.register(_StateCollector(self))
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "stage_finished": self._stage_finished,
            "stage_retried": self._stage_retried,
            "model_loaded": self._model_loaded,
            "model_load_failed": self._model_load_failed,
            "model_unloaded": self._model_unloaded,
            "job_claimed": lambda _e: self.jobs_claimed.inc(),
            "job_finished": lambda _e: self.jobs_done.inc(),
            "job_failed": lambda e: self.jobs_failed.labels(_label(e.get("kind"))).inc(),
            "job_rejected": lambda e: self.jobs_rejected.labels(_label(e.get("kind"))).inc(),
            "backend_down": lambda e: self.backend_down.labels(_label(e.get("backend"))).inc(),
            "backend_up": lambda e: self.backend_up.labels(_label(e.get("backend"))).inc(),
        }

    # -- events in -------------------------------------------------------------------

    def observe(self, method_name: str, event: Mapping[str, Any]) -> None:
        """The log listener: update the series an event stands for (others are ignored)."""
        name = event.get("event")
        handler = self._handlers.get(name) if isinstance(name, str) else None
        if handler is not None:
            with self._lock:
                handler(event)

    def _mb(self, event: Mapping[str, Any]) -> tuple[str, str]:
        return _label(event.get("model")), _label(event.get("backend"))

    def _stage_finished(self, event: Mapping[str, Any]) -> None:
        labels = self._mb(event)
        self.stages.labels(*labels).inc()
        wall = _number(event.get("wall_s"))
        if wall is not None:
            self.stage_seconds.labels(*labels).observe(wall)
        queued = _number(event.get("queue_s"))
        if queued is not None:
            self.queue_seconds.labels(*labels).observe(queued)
        count = _number(event.get("eval_count"))
        if count is not None:
            self.tokens.labels(*labels).inc(count)
            duration_ns = _number(event.get("eval_duration"))
            if duration_ns:
                self.tokens_per_s.labels(*labels).observe(count / duration_ns * 1e9)
        if event.get("truncated"):
            self.truncated.labels(*labels).inc()

    def _stage_retried(self, event: Mapping[str, Any]) -> None:
        self.retries.labels(*self._mb(event), _label(event.get("kind"))).inc()

    def _model_loaded(self, event: Mapping[str, Any]) -> None:
        labels = self._mb(event)
        self.loads.labels(*labels).inc()
        seconds = _number(event.get("load_s"))
        if seconds is not None:
            self.load_seconds.labels(*labels).observe(seconds)

    def _model_load_failed(self, event: Mapping[str, Any]) -> None:
        self.load_failures.labels(*self._mb(event), _label(event.get("kind"))).inc()

    def _model_unloaded(self, event: Mapping[str, Any]) -> None:
        self.unloads.labels(*self._mb(event)).inc()

    # -- scrape ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every series (``CONTENT_TYPE_LATEST``)."""
        with self._lock:
            return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the live status snapshot at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(self._families({}))

    def collect(self) -> Iterator[Metric]:
        state = self.metrics.state
        return iter(self._families(state() if state is not None else {}))

    @staticmethod
    def _families(snap: Mapping[str, Any]) -> list[Metric]:
        info = GaugeMetricFamily(
            "ihld_info", "Always 1; the version and policy as labels.", labels=["version", "policy"]
        )
        ready = GaugeMetricFamily(
            "ihld_ready_stages", "Stages ready and waiting, per model.", labels=["model"]
        )
        inflight = GaugeMetricFamily(
            "ihld_inflight_stages", "Stages being served now, per model.", labels=["model"]
        )
        up = GaugeMetricFamily(
            "ihld_backend_up", "1 when the backend answers, 0 while it is down.", labels=["backend"]
        )
        resident = GaugeMetricFamily(
            "ihld_model_resident",
            "1 per model the scheduler holds on a backend (state: loaded, loading, unloading).",
            labels=["backend", "model", "state"],
        )
        jobs = GaugeMetricFamily("ihld_jobs_in_progress", "Jobs claimed and not finished.")
        eta = GaugeMetricFamily(
            "ihld_eta_seconds",
            "Estimated time to finish the jobs in progress (absent until rates are learned).",
        )
        holds = CounterMetricFamily(
            "ihld_model_holds",
            "Times a model that ran dry kept its slots for work on its way (hold_dry).",
        )
        families: list[Metric] = [info, ready, inflight, up, resident, jobs, eta, holds]
        if not snap:
            return families
        info.add_metric([__version__, str(snap.get("policy", ""))], 1)
        for model, row in sorted(snap.get("models", {}).items()):
            ready.add_metric([model], row.get("ready", 0))
            inflight.add_metric([model], row.get("in_flight", 0))
        for name, backend in sorted(snap.get("backends", {}).items()):
            up.add_metric([name], 1 if backend.get("up") else 0)
            for model, state in sorted(backend.get("resident", {}).items()):
                resident.add_metric([name, model, str(state)], 1)
        jobs.add_metric([], snap.get("jobs", {}).get("in_progress", 0))
        if snap.get("eta_s") is not None:
            eta.add_metric([], snap["eta_s"])
        holds.add_metric([], snap.get("holds", 0))
        return families
