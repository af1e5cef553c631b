"""The built-in prompt actor: safe templates, JSON and schema replies, and the schema checker."""

from __future__ import annotations

from typing import Any

import pytest

from ihld.backends.base import ChatResult
from ihld.common.errors import StageError
from ihld.core.actors import Actor, StageContext
from ihld.core.schema import validate_schema
from ihld.plugins.builtin import (
    MAX_RENDERED_CHARS,
    PROMPT_ACTOR,
    TemplateError,
    chat_request,
    check_template,
    parse_json_reply,
)

VERDICT = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["proposer", "critic"]},
        "score": {"type": "integer"},
        "reason": {"type": "string"},
    },
    "required": ["winner", "score", "reason"],
}


def ctx(
    prompt: str | None = "Hi",
    *,
    input: Any = None,
    outputs: dict[str, Any] | None = None,
    **stage: Any,
) -> StageContext:
    from ihld.core.jobs import StageSpec

    return StageContext(
        job_id="job-7",
        input={"topic": "cats", "n": 3.14159, "tags": ["a", "b"], "deep": {"x": {"y": 1}}}
        if input is None
        else input,
        stage=StageSpec(name="s", model=stage.pop("model", "qwen2.5:7b"), prompt=prompt, **stage),
        outputs=outputs
        if outputs is not None
        else {"proposer": "Yes.", "judge": {"winner": "critic", "score": 7}},
    )


def user_text(context: StageContext) -> str:
    return str(PROMPT_ACTOR.build_request(context).messages[-1]["content"])


def result(content: str) -> ChatResult:
    return ChatResult(content=content, done_reason="stop")


# -- the actor -------------------------------------------------------------------------


def test_prompt_actor_satisfies_the_protocol() -> None:
    assert isinstance(PROMPT_ACTOR, Actor)
    assert PROMPT_ACTOR.name == "prompt"
    assert PROMPT_ACTOR.default_model is None


def test_build_request_with_system_options_and_format() -> None:
    context = ctx(
        "About {input[topic]}",
        system="Be brief. {not a template}",
        options={"temperature": 0.1},
        format="json",
    )
    request = PROMPT_ACTOR.build_request(context)
    assert request.model == "qwen2.5:7b"
    assert request.messages == [
        {"role": "system", "content": "Be brief. {not a template}"},
        {"role": "user", "content": "About cats"},
    ]
    assert request.options == {"temperature": 0.1}
    assert request.format == "json"


def test_build_request_without_system_has_one_message() -> None:
    request = PROMPT_ACTOR.build_request(ctx("Hello"))
    assert request.messages == [{"role": "user", "content": "Hello"}]
    assert request.format is None


def test_stage_without_prompt_fails_for_good() -> None:
    with pytest.raises(StageError, match="needs a 'prompt' template") as info:
        PROMPT_ACTOR.build_request(ctx(None))
    assert info.value.retryable is False


def test_chat_request_without_model_fails() -> None:
    context = ctx("x", model=None)
    with pytest.raises(StageError, match="has no model"):
        chat_request(context, [])


# -- rendering -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{input[topic]}", "cats"),
        ("{input[deep][x][y]}", "1"),
        ("{input[tags][1]}", "b"),
        ("{stages[proposer]}", "Yes."),
        ("{stages[judge]}", '{"winner":"critic","score":7}'),
        ("{stages[judge][winner]} by {stages[judge][score]}", "critic by 7"),
        ("{input[tags]}", '["a","b"]'),
        ("{job_id}", "job-7"),
        ("{{literal}} {input[topic]}", "{literal} cats"),
        ("{input[n]:.2f}", "3.14"),
        ("[{input[topic]:>6}]", "[  cats]"),
        ("{input[topic]!r}", "'cats'"),
        ("no fields at all", "no fields at all"),
    ],
)
def test_render(template: str, expected: str) -> None:
    assert user_text(ctx(template)) == expected


def test_render_whole_input_and_json_scalars() -> None:
    context = ctx("{input} {input[flag]} {input[none]}", input={"flag": True, "none": None})
    assert user_text(context) == '{"flag":true,"none":null} true null'


def test_render_keeps_unicode() -> None:
    assert user_text(ctx("{input[t]}", input={"t": "Straße ☃"})) == "Straße ☃"


UNSAFE = [
    ("{input.__class__}", "attribute access ('.__class__') is not allowed"),
    ("{input[topic].upper}", "attribute access ('.upper')"),
    ("{stages.__class__.__mro__}", "attribute access"),
    ("{}", "positional fields are not allowed"),
    ("{0}", "positional fields are not allowed"),
    ("{os}", "unknown name 'os'"),
    ("{input:{input}}", "nested fields"),
    ("{input[topic]:>100000000}", "format spec"),
    ("{input[n]:.1000f}", "format spec"),
    ("{input!x}", "unknown conversion"),
    ("{input", "malformed template"),
    ("oops }", "malformed template"),
    ("{input[topic]x}", "only [key] may follow"),
    ("{input[]}", "empty [] index"),
    ("{job_id[0]}", "job_id is a string"),
]


@pytest.mark.parametrize(("template", "message"), UNSAFE)
def test_unsafe_template_rejected_at_render(template: str, message: str) -> None:
    with pytest.raises(StageError) as info:
        PROMPT_ACTOR.build_request(ctx(template))
    assert message in str(info.value)
    assert info.value.retryable is False
    assert info.value.kind == "template_error"


@pytest.mark.parametrize(("template", "message"), UNSAFE)
def test_unsafe_template_rejected_by_check_template(template: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_template(template)
    assert message in str(info.value)
    assert isinstance(info.value, TemplateError)


def test_check_template_accepts_good_templates() -> None:
    check_template("{input[topic]} {stages[a][b]} {job_id} {{x}} {input[n]:.2f}")
    check_template("{stages[a]}", stages={"a"})
    with pytest.raises(ValueError, match="no earlier stage named 'b'"):
        check_template("{stages[b]}", stages={"a"})


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{input[title]}", "input has no key 'title' (available: deep, n, tags, topic)"),
        ("{input[deep][z]}", "input[deep] has no key 'z'"),
        ("{stages[critic]}", "no output from stage 'critic' (available: judge, proposer)"),
        ("{input[tags][5]}", "input[tags] is a list of 2; no index '5'"),
        ("{input[tags][-1]}", "no index '-1'"),
        ("{input[topic][0]}", "input[topic] is string, not an object or list"),
        ("{input[n]:d}", "{input[n]:d}: Unknown format code 'd'"),
    ],
)
def test_missing_data_fails_for_good_naming_the_key(template: str, message: str) -> None:
    with pytest.raises(StageError) as info:
        PROMPT_ACTOR.build_request(ctx(template))
    assert message in str(info.value)
    assert template in str(info.value)
    assert info.value.retryable is False


def test_rendered_size_is_bounded() -> None:
    big = "x" * (MAX_RENDERED_CHARS // 4 + 1)
    with pytest.raises(StageError, match="exceeds") as info:
        PROMPT_ACTOR.build_request(ctx("{input[b]}" * 4, input={"b": big}))
    assert info.value.retryable is False


# -- replies ---------------------------------------------------------------------------


def test_reply_without_format_is_the_text() -> None:
    assert PROMPT_ACTOR.parse_response(ctx(), result("  Hello\n")) == "  Hello\n"


def test_json_reply_is_parsed() -> None:
    assert PROMPT_ACTOR.parse_response(ctx(format="json"), result('{"a": [1, 2]}')) == {"a": [1, 2]}


def test_json_reply_in_a_code_fence_is_accepted() -> None:
    assert parse_json_reply('```json\n{"a": 1}\n```', "json") == {"a": 1}


@pytest.mark.parametrize("content", ["not json", '{"a": 1', "", '{"a": NaN}', '{"a": 1, "a": 2}'])
def test_invalid_json_reply_is_retryable(content: str) -> None:
    with pytest.raises(StageError, match="reply is not valid JSON") as info:
        PROMPT_ACTOR.parse_response(ctx(format="json"), result(content))
    assert info.value.retryable is True


def test_schema_reply_is_validated() -> None:
    reply = '{"winner": "critic", "score": 8, "reason": "sharper"}'
    assert PROMPT_ACTOR.parse_response(ctx(format=VERDICT), result(reply)) == {
        "winner": "critic",
        "score": 8,
        "reason": "sharper",
    }


def test_schema_violation_is_retryable_and_lists_paths() -> None:
    reply = '{"winner": "nobody", "score": "high"}'
    with pytest.raises(StageError) as info:
        PROMPT_ACTOR.parse_response(ctx(format=VERDICT), result(reply))
    message = str(info.value)
    assert info.value.retryable is True
    assert info.value.kind == "schema_mismatch"
    assert "$.winner: 'nobody' is not one of 'proposer', 'critic'" in message
    assert "$.score: expected integer, got string" in message
    assert "$.reason: required but missing" in message


# -- the schema checker ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "schema", "problems"),
    [
        (1, {"type": "integer"}, []),
        (1.0, {"type": "integer"}, []),
        (1.5, {"type": "integer"}, ["$: expected integer, got number"]),
        (True, {"type": "integer"}, ["$: expected integer, got boolean"]),
        (True, {"type": "boolean"}, []),
        (2, {"type": "number"}, []),
        (None, {"type": ["string", "null"]}, []),
        ("x", {"type": "object"}, ["$: expected object, got string"]),
        (
            [1, "a"],
            {"type": "array", "items": {"type": "integer"}},
            ["$[1]: expected integer, got string"],
        ),
        (1, {"enum": [True]}, ["$: 1 is not one of True"]),
        (1.0, {"enum": [1]}, []),
        ({"a": 1}, {"const": {"a": 1}}, []),
        (
            {"a": {"b": "x"}},
            {"properties": {"a": {"properties": {"b": {"type": "integer"}}}}},
            ["$.a.b: expected integer, got string"],
        ),
        (
            {"a": 1, "zz": 2},
            {"properties": {"a": {}}, "additionalProperties": False},
            ["$.zz: unexpected property"],
        ),
        ({"my key": 1}, {"required": ["other key"]}, ["$['other key']: required but missing"]),
        (5, {"minimum": 1, "maximum": 3}, ["$: 5 is more than the maximum 3"]),
        ("ab", {"minLength": 3}, ["$: 2 characters, fewer than minLength 3"]),
        ([], {"minItems": 1}, ["$: 0 items, fewer than minItems 1"]),
        ({"a": 1}, {"type": "object", "patternProperties": {}}, []),  # unknown keyword ignored
    ],
)
def test_validate_schema(value: Any, schema: dict[str, Any], problems: list[str]) -> None:
    assert validate_schema(value, schema) == problems


def test_validate_schema_bounds_the_report() -> None:
    problems = validate_schema(list(range(500)), {"items": {"type": "string"}})
    assert len(problems) == 50
