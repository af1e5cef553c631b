"""What each stage of a workload costs on the simulator, computed without running it.

The bound is only as good as its stage costs, so they are not estimated:
each job is resolved by the same plugin host the daemon uses, each stage's
request is built by its real actor, and the simulator's own functions give
the answer it will send (``plan_output`` over ``request_key``) and the
prompt size (``prompt_tokens`` of the characters the sim counts, via its own
request parser). The answer is fed to the actor's ``parse_response`` and
becomes the input of the next stage, exactly as in a real run. Only the
rates come from the profile: a stage's one-slot time is
``prompt_tokens / prompt_tps + output_tokens / gen_tps``.

The runner checks these predictions against the token counts the simulator
reported in every result file (``cost_check`` in the bench output).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ihld.backends.base import ChatResult
from ihld.core.actors import StageContext
from ihld.core.config import Config
from ihld.core.executor import finalize_request
from ihld.core.jobs import Job, parse_document
from ihld.plugins.host import PluginHost, finished_before
from ihld.sim.api import parse_call
from ihld.sim.output import plan_output, prompt_tokens, request_key
from ihld.sim.profiles import Profile


@dataclass(frozen=True)
class StageCost:
    """One stage as the simulator will serve it; times in simulated seconds at one slot."""

    name: str
    model: str
    needs: tuple[str, ...]
    prompt_tokens: int
    output_tokens: int
    prompt_s: float
    decode_s: float

    @property
    def service_s(self) -> float:
        return self.prompt_s + self.decode_s


@dataclass(frozen=True)
class JobCost:
    """One job: when it is released (simulated seconds), its priority and its stage DAG."""

    id: str
    arrival_s: float
    priority: int
    stages: tuple[StageCost, ...]

    @property
    def service_s(self) -> float:
        return sum(s.service_s for s in self.stages)


class CostError(Exception):
    """A workload job that cannot be costed (it would fail in the daemon too)."""


def _seconds(amount: int, rate: float) -> float:
    return 0.0 if math.isinf(rate) else amount / rate


def stage_costs(job: Job, host: PluginHost, profile: Profile) -> tuple[StageCost, ...]:
    """Cost every stage of ``job``, feeding each simulated answer to the next stage."""
    outputs: dict[str, Any] = {}
    costs: list[StageCost] = []
    certain = finished_before(job.stages)  # what a stage may read: its needs, transitively
    for stage in job.stages:  # resolved jobs list stages after the ones they need
        actor = host.actors.get(stage.actor)
        if actor is None:
            raise CostError(f"{job.id}: stage {stage.name!r}: unknown actor {stage.actor!r}")
        ctx = StageContext(
            job_id=job.id,
            input=job.input,
            stage=stage,
            outputs=MappingProxyType({k: outputs[k] for k in certain[stage.name]}),
        )
        request = finalize_request(actor.build_request(ctx), stage)
        # The body the Ollama client sends, through the simulator's own parser.
        body: dict[str, Any] = {"model": request.model, "messages": request.messages}
        if request.options:
            body["options"] = request.options
        if request.format is not None:
            body["format"] = request.format
        call = parse_call(json.loads(json.dumps(body)), "chat")
        spec = profile.spec(call.model)
        if spec is None:
            raise CostError(f"{job.id}: stage {stage.name!r}: model {call.model!r} not in profile")
        key = request_key(spec.name, call.content(), call.format, call.options.get("seed"))
        plan = plan_output(
            key,
            mean_tokens=spec.mean_output_tokens,
            fmt=call.format,
            num_predict=call.num_predict(),
        )
        n_prompt = prompt_tokens(call.prompt_chars())
        n_out = len(plan.tokens)
        outputs[stage.name] = actor.parse_response(
            ctx, ChatResult(content=plan.text, done_reason=plan.done_reason)
        )
        costs.append(
            StageCost(
                name=stage.name,
                model=spec.name,
                needs=tuple(stage.needs or ()),
                prompt_tokens=n_prompt,
                output_tokens=n_out,
                prompt_s=_seconds(n_prompt, spec.prompt_tps),
                decode_s=_seconds(n_out, spec.gen_tps),
            )
        )
    return tuple(costs)


def job_costs(
    jobs: Iterable[tuple[float, Mapping[str, Any]]], config: Config, profile: Profile
) -> list[JobCost]:
    """Cost ``(arrival_s, job document)`` pairs as the daemon with ``config`` would run them."""
    from ihld.plugins.loader import plugins_for

    host = plugins_for(config)
    out = []
    for arrival, doc in jobs:
        spec = parse_document(dict(doc))
        job_id = spec.id or "job"
        job = host.resolve(spec, job_id)
        out.append(JobCost(job_id, arrival, job.priority, stage_costs(job, host, profile)))
    return out
