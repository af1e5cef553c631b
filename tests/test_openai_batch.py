"""OpenAI Batch files: lines become jobs; the outputs parse with the openai package's types."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from ihld.common.errors import JobError
from ihld.plugins.openai_batch import to_spec
from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, drop


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "qwen2.5:7b",
            "messages": [{"role": "user", "content": f"Say hi to {custom_id}"}],
            **body,
        },
    }


def test_line_maps_options_and_format() -> None:
    spec = to_spec(
        line("a", temperature=0.2, max_tokens=50, seed=7, response_format={"type": "json_object"})
    )
    assert spec.stages is not None
    (stage,) = spec.stages
    assert stage.actor == "openai-chat" and stage.model == "qwen2.5:7b"
    assert stage.options == {"temperature": 0.2, "num_predict": 50, "seed": 7}
    assert stage.format == "json"
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    spec = to_spec(
        line(
            "b",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    )
    assert spec.stages is not None and spec.stages[0].format == schema


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({**line("a"), "url": "/v1/embeddings"}, "url"),
        ({**line("a"), "method": "GET"}, "method"),
        (line("a", n=2), "body.n"),
        (line("a", tools=[]), "body.tools"),
        ({**line("a"), "custom_id": ""}, "custom_id"),
        ({**line("a"), "body": {"messages": []}}, "body.model"),
        (line("a", response_format={"type": "xml"}), "body.response_format.type"),
    ],
)
def test_bad_lines_name_the_field(value: dict[str, Any], path: str) -> None:
    with pytest.raises(JobError) as info:
        to_spec(value)
    assert info.value.path == path and path in str(info.value)


def test_batch_round_trip(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory(speed=500.0)
    rig = rig_factory(sim.url)
    lines = [line(f"req-{n}", temperature=0.1) for n in range(6)]
    lines.append(line("bad", tools=[{"type": "function"}]))
    lines.append(
        line(
            "schema",
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "v",
                    "schema": {
                        "type": "object",
                        "properties": {"ok": {"type": "boolean"}},
                        "required": ["ok"],
                    },
                },
            },
        )
    )
    drop(rig.inbox, "nightly.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run(
        [*IHLD, "run", "--once", "--config", str(rig.config)],
        capture_output=True,
        timeout=90,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    outbox = rig.spool / "outbox"
    outputs = [json.loads(x) for x in (outbox / "nightly.output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (outbox / "nightly.errors.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(
        [f"req-{n}" for n in range(6)] + ["schema"]
    )
    for output in outputs:
        assert output["error"] is None and output["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(output["response"]["body"])
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens > 0
    schema_reply = next(o for o in outputs if o["custom_id"] == "schema")
    assert json.loads(schema_reply["response"]["body"]["choices"][0]["message"]["content"])[
        "ok"
    ] in (True, False)
    (error,) = errors
    assert error["custom_id"] == "bad" and error["response"] is None
    assert "body.tools" in error["error"]["message"]
    assert not (rig.spool / "work" / "batches").exists() or not list(
        (rig.spool / "work" / "batches").iterdir()
    )


def test_a_manifest_written_before_formats_were_plugins_still_completes(tmp_path: Any) -> None:
    """An upgrade with a batch half done: its old-style manifest (custom_id per line, no
    format) is read as openai-batch, and the batch's files are written from the records."""
    from ihld.core.batches import BatchTracker
    from ihld.core.spool import Spool
    from ihld.plugins.openai_batch import OpenAIBatchFormat

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    stage = {"name": "chat", "model": "m", "output": "hi", "eval_count": 1, "backend": "b"}
    spool.publish(spool.outbox, "old.1", {"id": "old.1", "stages": [stage], "finished_at": 1.0})
    spool.publish_failure("old.2", {"id": "old.2", "error": {"kind": "bad_request",
                                                             "message": "no"}})  # fmt: skip
    legacy = {"batch": "old", "claim": "old.jsonl", "created_at": 0.0, "lines": [
        {"job_id": "old.1", "custom_id": "a", "line": 1},
        {"job_id": "old.2", "custom_id": "b", "line": 2},
    ]}  # fmt: skip
    tracker = BatchTracker(spool, {"openai-batch": OpenAIBatchFormat()})
    assert tracker.register(legacy) == "old"  # both lines had ended
    tracker.assemble("old")
    (ok,) = [json.loads(x) for x in (spool.outbox / "old.output.jsonl").read_text().splitlines()]
    (bad,) = [json.loads(x) for x in (spool.outbox / "old.errors.jsonl").read_text().splitlines()]
    assert ok["custom_id"] == "a" and ok["response"]["body"]["choices"][0]["message"]["content"]
    assert bad["custom_id"] == "b" and bad["error"]["code"] == "bad_request"
