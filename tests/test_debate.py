"""The shipped worked example, plugins/debate.py, loaded the way the daemon loads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ihld.backends.base import ChatResult
from ihld.common.errors import StageError
from ihld.core import jobs
from ihld.core.actors import Actor, StageContext
from ihld.core.config import PipelineConfig
from ihld.core.jobs import Job, StageOverride, parse_document
from ihld.plugins.host import PluginHost
from ihld.plugins.loader import load_plugins

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["proposer", "critic"]},
        "score": {"type": "integer"},
        "reason": {"type": "string"},
    },
    "required": ["winner", "score", "reason"],
}


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IHLD_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("IHLD_TRACE_HOOKS", raising=False)


@pytest.fixture
def host() -> PluginHost:
    return load_plugins([PLUGINS], entry_points=False)


def resolve(host: PluginHost, document: dict[str, Any]) -> Job:
    return jobs.resolve(
        parse_document(document),
        "debate-1",
        pipelines=host.pipelines,
        actor_models=host.actor_models(),
        config_overrides=host.pipeline_overrides,
    )


def context(job: Job, stage: str, outputs: dict[str, Any]) -> StageContext:
    return StageContext(job_id=job.id, input=job.input, stage=job.stage(stage), outputs=outputs)


def reply(content: str) -> ChatResult:
    return ChatResult(content=content, done_reason="stop")


DEBATE = {"pipeline": "debate", "input": {"topic": "Cities should ban cars"}}


def test_debate_registers_three_actors_and_a_pipeline(host: PluginHost) -> None:
    assert {"proposer", "critic", "judge"} <= set(host.actors)
    assert all(isinstance(host.actors[n], Actor) for n in ("proposer", "critic", "judge"))
    row = next(r for r in host.describe() if r["name"] == "debate")
    assert row["actors"] == ["proposer", "critic", "judge"]
    assert row["pipelines"] == ["debate"]


def test_smallest_debate_job_resolves_with_default_models(host: PluginHost) -> None:
    job = resolve(host, DEBATE)
    assert [(s.name, s.actor, s.model, s.needs) for s in job.stages] == [
        ("proposer", "proposer", "qwen2.5:7b", ()),
        ("critic", "critic", "gemma2:9b", ("proposer",)),
        ("judge", "judge", "qwen2.5:7b", ("critic",)),
    ]
    assert job.stage("judge").format == VERDICT_SCHEMA


def test_per_job_model_override(host: PluginHost) -> None:
    job = resolve(host, {**DEBATE, "overrides": {"critic": {"model": "llama3.1:8b"}}})
    assert [s.model for s in job.stages] == ["qwen2.5:7b", "llama3.1:8b", "qwen2.5:7b"]


def test_config_override_and_job_override(host: PluginHost) -> None:
    config = {"debate": PipelineConfig(overrides={"judge": StageOverride(model="qwen2.5:14b")})}
    host = load_plugins([PLUGINS], entry_points=False, config_pipelines=config)
    assert resolve(host, DEBATE).stage("judge").model == "qwen2.5:14b"
    job = resolve(host, {**DEBATE, "overrides": {"judge": {"model": "mine"}}})
    assert job.stage("judge").model == "mine"


def test_proposer_request(host: PluginHost) -> None:
    job = resolve(host, {**DEBATE, "overrides": {"proposer": {"options": {"temperature": 0.7}}}})
    request = host.actors["proposer"].build_request(context(job, "proposer", {}))
    assert request.model == "qwen2.5:7b"
    assert request.options == {"temperature": 0.7}
    assert request.format is None
    assert [m["role"] for m in request.messages] == ["system", "user"]
    assert "proposer" in request.messages[0]["content"]
    assert "Cities should ban cars" in request.messages[1]["content"]


def test_critic_request_reads_the_proposal(host: PluginHost) -> None:
    job = resolve(host, DEBATE)
    ctx = context(job, "critic", {"proposer": "Cars pollute.\n"})
    request = host.actors["critic"].build_request(ctx)
    assert request.model == "gemma2:9b"
    user = request.messages[1]["content"]
    assert "Cities should ban cars" in user
    assert "Cars pollute." in user


def test_judge_request_reads_both_and_asks_for_a_verdict(host: PluginHost) -> None:
    job = resolve(host, DEBATE)
    ctx = context(job, "judge", {"proposer": "Cars pollute.", "critic": "Buses too."})
    request = host.actors["judge"].build_request(ctx)
    assert request.model == "qwen2.5:7b"
    assert request.format == VERDICT_SCHEMA
    user = request.messages[1]["content"]
    assert "Cars pollute." in user and "Buses too." in user
    assert user.index("Cars pollute.") < user.index("Buses too.")


def test_judge_asks_for_the_verdict_schema_even_without_a_stage_format(host: PluginHost) -> None:
    job = resolve(host, {"stages": [{"name": "j", "actor": "judge"}], "input": {"topic": "t"}})
    ctx = context(job, "j", {"proposer": "a", "critic": "b"})
    assert host.actors["judge"].build_request(ctx).format == VERDICT_SCHEMA
    with pytest.raises(StageError, match="schema"):
        host.actors["judge"].parse_response(ctx, reply('{"winner": "me"}'))


def test_judge_verdict_is_parsed(host: PluginHost) -> None:
    job = resolve(host, DEBATE)
    ctx = context(job, "judge", {"proposer": "a", "critic": "b"})
    verdict = {"winner": "critic", "score": 7, "reason": "Better evidence."}
    assert host.actors["judge"].parse_response(ctx, reply(json.dumps(verdict))) == verdict


def test_judge_invalid_json_is_retryable(host: PluginHost) -> None:
    job = resolve(host, DEBATE)
    ctx = context(job, "judge", {"proposer": "a", "critic": "b"})
    with pytest.raises(StageError, match="reply is not valid JSON") as info:
        host.actors["judge"].parse_response(ctx, reply("The critic wins."))
    assert info.value.retryable is True


def test_judge_schema_violation_is_retryable(host: PluginHost) -> None:
    job = resolve(host, DEBATE)
    ctx = context(job, "judge", {"proposer": "a", "critic": "b"})
    bad = {"winner": "draw", "score": 7.5, "reason": "close"}
    with pytest.raises(StageError) as info:
        host.actors["judge"].parse_response(ctx, reply(json.dumps(bad)))
    assert info.value.retryable is True
    assert "$.winner: 'draw' is not one of 'proposer', 'critic'" in str(info.value)
    assert "$.score: expected integer, got number" in str(info.value)


def test_missing_topic_fails_for_good(host: PluginHost) -> None:
    job = resolve(host, {"pipeline": "debate", "input": {"subject": "x"}})
    with pytest.raises(StageError, match=r"input\.topic") as info:
        host.actors["proposer"].build_request(context(job, "proposer", {}))
    assert info.value.retryable is False


def test_whole_debate_runs_stage_by_stage(host: PluginHost) -> None:
    """What the daemon does, minus the server: build, reply, parse, in needs order."""
    job = resolve(host, DEBATE)
    replies = {
        "proposer": "  Fewer cars, cleaner air.  ",
        "critic": "Deliveries need roads.",
        "judge": '{"winner": "proposer", "score": 6, "reason": "Clearer."}',
    }
    outputs: dict[str, Any] = {}
    for stage in job.stages:
        actor = host.actors[stage.actor]
        ctx = context(job, stage.name, dict(outputs))
        actor.build_request(ctx)
        outputs[stage.name] = actor.parse_response(ctx, reply(replies[stage.name]))
    assert outputs == {
        "proposer": "Fewer cars, cleaner air.",
        "critic": "Deliveries need roads.",
        "judge": {"winner": "proposer", "score": 6, "reason": "Clearer."},
    }
    json.dumps(outputs)  # stage outputs must be JSON-serialisable
