"""Plugin files that add an intake format and a scheduling policy, run by the real daemon.

Each plugin imports only from ``ihld`` (checked on its source), is loaded from
a plugin directory, and drives ``ihld run --once`` against the simulator.
"""

from __future__ import annotations

import ast
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from ihld.plugins.loader import load_plugins
from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, drop
from tests.test_plugins import NEWEST_POLICY  # the policy plugin of test_hook_register_policies

PROMPTS_FORMAT = '''
"""Lines {"ask": ..., "model": ...} become jobs; answers go to <file>.answers.jsonl."""
import json

from ihld import FinishedBatch, JobError, JobSpec, StageSpec, hookimpl


class Prompts:
    name = "prompts"

    def recognise(self, value):
        return isinstance(value, dict) and "ask" in value

    def to_spec(self, value):
        if not isinstance(value["ask"], str) or not value["ask"]:
            raise JobError("ask: must be a non-empty string", kind="invalid_prompt", path="ask")
        stage = StageSpec(name="answer", actor="prompt", model=value.get("model"),
                          prompt="{input[ask]}", options={"num_predict": 8})
        return JobSpec(stages=[stage], input={"ask": value["ask"]})

    def tag(self, value):
        return {"ask": value.get("ask")}

    def finish(self, batch: FinishedBatch):
        lines = []
        for line in batch.lines:
            if line.result is not None:
                answer = line.result["stages"][0]["output"]
                lines.append({"line": line.line, "ask": line.tag["ask"], "answer": answer})
            else:
                lines.append({"line": line.line, "ask": line.tag["ask"],
                              "error": line.failure["error"]["kind"]})
        text = "".join(json.dumps(x) + "\\n" for x in lines)
        return {f"{batch.name}.answers.jsonl": text.encode()}


@hookimpl
def register_intake_formats(register):
    register(Prompts())
'''


def ihld_imports_only(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {m for m in modules if m.split(".")[0] == "ihld"}


def plugin_dir(tmp_path: Path, name: str, source: str) -> Path:
    directory = tmp_path / "my-plugins"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(source)
    return directory


def plugins_extra(directory: Path) -> str:
    return f'[plugins]\ndirs = ["{REPO / "plugins"}", "{directory}"]\nentry_points = false\n'


def run_once(rig: DaemonRig) -> None:
    proc = subprocess.run(
        [*IHLD, "run", "--once", "--config", str(rig.config)],
        capture_output=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_plugins_import_only_from_ihld() -> None:
    assert ihld_imports_only(PROMPTS_FORMAT) == {"ihld"}
    assert ihld_imports_only(NEWEST_POLICY) == {"ihld"}


def test_hook_register_intake_formats(
    tmp_path: Path,
    sim_factory: Callable[..., SimProcess],
    rig_factory: Callable[..., DaemonRig],
) -> None:
    directory = plugin_dir(tmp_path, "prompts", PROMPTS_FORMAT)
    host = load_plugins([directory], entry_points=False)
    assert set(host.formats) == {"openai-batch", "prompts"}
    assert next(r for r in host.describe() if r["name"] == "prompts")["formats"] == ["prompts"]

    sim = sim_factory(speed=500.0)
    rig = rig_factory(sim.url, extra=plugins_extra(directory))
    lines = [
        {"ask": "Name a colour.", "model": "qwen2.5:7b"},
        {"id": "plain", "pipeline": "debate", "input": {"topic": "tea"}},  # an ihld job
        {"ask": "", "model": "qwen2.5:7b"},  # rejected by the format, naming the field
        {"ask": "Name a fruit.", "model": "gemma2:9b"},
    ]
    drop(rig.inbox, "quiz.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    run_once(rig)

    outbox = rig.spool / "outbox"
    answers = [json.loads(x) for x in (outbox / "quiz.answers.jsonl").read_text().splitlines()]
    assert [a["line"] for a in answers] == [1, 3, 4]  # line 2 is not the format's
    assert answers[0]["ask"] == "Name a colour." and answers[0]["answer"]
    assert answers[1] == {"line": 3, "ask": "", "error": "invalid_prompt"}
    assert answers[2]["answer"]
    assert json.loads((outbox / "plain.json").read_text())["status"] == "done"
    rejected = json.loads((rig.spool / "failed" / "quiz.3.json").read_text())
    assert rejected["error"]["field"] == "ask" and "line 3: ask:" in rejected["error"]["message"]
    assert not list((rig.spool / "work" / "batches").glob("*.json"))  # manifest dropped


def test_a_plugin_policy_runs_the_daemon(
    tmp_path: Path,
    sim_factory: Callable[..., SimProcess],
    rig_factory: Callable[..., DaemonRig],
) -> None:
    directory = plugin_dir(tmp_path, "newest", NEWEST_POLICY)
    sim = sim_factory(speed=500.0)
    rig = rig_factory(sim.url, policy="newest", extra=plugins_extra(directory))
    jobs = [{"id": f"j{n}", "pipeline": "debate", "input": {"topic": f"t{n}"}} for n in range(4)]
    drop(rig.inbox, "batch.jsonl", "".join(json.dumps(x) + "\n" for x in jobs))
    run_once(rig)
    assert sorted(p.name for p in (rig.spool / "outbox").glob("*.json")) == [
        f"j{n}.json" for n in range(4)
    ]
    ready = [
        json.loads(line)
        for line in (rig.spool / "log" / "ihld.jsonl").read_text().splitlines()
        if '"daemon_ready"' in line
    ]
    assert ready and ready[0]["policy"] == "newest"
