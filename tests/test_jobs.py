"""Job files: schema errors name the field path or line; resolution fills models and needs."""

from __future__ import annotations

import json

import pytest

from ihld.common.errors import JobError
from ihld.core.entries import read_entries
from ihld.core.jobs import StageOverride, StageSpec, default_id_for, resolve

PIPELINES = {
    "two": (
        StageSpec(name="a", actor="prompt", model="m1", prompt="x"),
        StageSpec(name="b", actor="prompt", model="m2", prompt="y"),
    ),
}
ACTORS = {"prompt": None, "critic": "gemma2:9b"}


def entries(name: str, text: str) -> list:
    stem, _, suffix = name.rpartition(".")
    return list(read_entries(stem, "." + suffix, text.encode()))


def test_json_file_id_defaults_to_stem() -> None:
    (entry,) = entries("batch1.json", '{"pipeline": "two"}')
    assert entry.error is None and entry.job_id == "batch1"


def test_jsonl_ids_default_to_stem_and_line() -> None:
    found = entries("b.jsonl", '{"pipeline": "two"}\n\n{"pipeline": "two", "id": "x"}\n')
    assert [e.job_id for e in found] == ["b.1", "x"]
    assert [e.line for e in found] == [1, 3]


def test_bad_line_names_line_and_field_rest_still_parse() -> None:
    found = entries(
        "b.jsonl", '{"pipeline": "two"}\n{"pipeline": "two", "priority": "hi"}\n{oops\n'
    )
    assert found[0].error is None
    assert "line 2: priority" in str(found[1].error)
    assert "line 3: malformed JSON" in str(found[2].error)


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"pipeline": "two", "extra": 1}, "extra: unknown field"),
        ({"input": {}}, "needs 'pipeline' or 'stages'"),
        ({"pipeline": "two", "stages": []}, "not both"),
        ({"pipeline": "two", "id": "../etc"}, "id: Value error"),
        ({"pipeline": "two", "id": "a/b"}, "id: Value error"),
        ({"pipeline": "two", "id": "x" * 129}, "id: Value error"),
        ({"stages": [{"name": "bad name"}]}, "stages.0.name"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_schema_errors_name_the_field(doc: object, needle: str) -> None:
    (entry,) = entries("j.json", json.dumps(doc))
    assert entry.error is not None and needle in str(entry.error)


def test_default_id_for_unsafe_stems_is_safe_and_stable() -> None:
    assert default_id_for("ok-name_1.2") == "ok-name_1.2"
    weird = default_id_for("bad\nname\x1b[31m")
    assert weird == default_id_for("bad\nname\x1b[31m")
    assert all(c.isalnum() or c in "._-" for c in weird)


def test_resolve_pipeline_with_overrides_precedence() -> None:
    (entry,) = entries(
        "j.json",
        json.dumps(
            {
                "pipeline": "two",
                "overrides": {"b": {"model": "job-model", "options": {"num_ctx": 8192}}},
            }
        ),
    )
    config = {"two": {"a": StageOverride(model="config-model"), "b": StageOverride(model="cfg-b")}}
    job = resolve(
        entry.spec, "j", pipelines=PIPELINES, actor_models=ACTORS, config_overrides=config
    )
    assert [s.model for s in job.stages] == ["config-model", "job-model"]
    assert job.stages[1].needs == ("a",)
    assert job.stages[1].model_key() == "job-model{num_ctx=8192}"


@pytest.mark.parametrize(
    ("doc", "kind", "needle"),
    [
        ({"pipeline": "nope"}, "unknown_pipeline", "unknown pipeline 'nope' (known: two)"),
        ({"stages": [{"name": "a", "actor": "ghost", "model": "m"}]}, "unknown_actor", "ghost"),
        ({"stages": [{"name": "a", "prompt": "x"}]}, "invalid_schema", "no model"),
        (
            {"stages": [{"name": "a", "model": "m", "needs": ["b"]}, {"name": "b", "model": "m"}]},
            "invalid_schema",
            "not an earlier stage",
        ),
        (
            {"pipeline": "two", "overrides": {"zz": {"model": "m"}}},
            "invalid_schema",
            "overrides.zz",
        ),
    ],
)
def test_resolve_errors(doc: dict, kind: str, needle: str) -> None:
    (entry,) = entries("j.json", json.dumps(doc))
    with pytest.raises(JobError) as info:
        resolve(entry.spec, "j", pipelines=PIPELINES, actor_models=ACTORS)
    assert info.value.kind == kind and needle in str(info.value)


def test_actor_default_model_is_used() -> None:
    (entry,) = entries("j.json", json.dumps({"stages": [{"name": "c", "actor": "critic"}]}))
    job = resolve(entry.spec, "j", pipelines=PIPELINES, actor_models=ACTORS)
    assert job.stages[0].model == "gemma2:9b"


def test_job_record_round_trip() -> None:
    (entry,) = entries("j.json", json.dumps({"pipeline": "two", "priority": 3, "input": {"t": 1}}))
    job = resolve(entry.spec, "j", pipelines=PIPELINES, actor_models=ACTORS, source={"line": None})
    from ihld.core.jobs import Job

    assert Job.from_record(json.loads(json.dumps(job.to_record()))) == job
