"""Docs as contract (datasette's pattern) for every hookspec.

Each hook must have a section in docs/plugins.md titled with its name, holding
its exact signature (as ``inspect.signature`` renders the spec) and a runnable
example, and a test named ``test_hook_<name>`` somewhere under tests/.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from ihld.core.jobs import Job, StageSpec, parse_document
from ihld.plugins import hookspecs
from ihld.plugins.loader import load_plugins

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
HOOKS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if callable(value) and hasattr(value, f"{hookspecs.PROJECT}_spec")
)


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IHLD_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("IHLD_TRACE_HOOKS", raising=False)


def signature_text(name: str) -> str:
    """``def name(arg: Type, ...) -> Ret`` from the spec's (string) annotations."""
    signature = inspect.signature(getattr(hookspecs, name))
    params = []
    for param in signature.parameters.values():
        assert isinstance(param.annotation, str), "hookspecs.py must keep postponed annotations"
        params.append(f"{param.name}: {param.annotation}")
    return f"def {name}({', '.join(params)}) -> {signature.return_annotation}"


def sections(text: str) -> dict[str, str]:
    """Markdown heading title -> its body up to the next heading of the same or higher level."""
    found: dict[str, str] = {}
    open_sections: list[tuple[int, str, list[str]]] = []
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"^(#{1,6}) (.+?)\s*$", line)
        if match:
            level = len(match.group(1))
            while open_sections and open_sections[-1][0] >= level:
                _, title, body = open_sections.pop()
                found[title] = "\n".join(body)
            open_sections.append((level, match.group(2), []))
            continue
        for _, _, body in open_sections:
            body.append(line)
    for _, title, body in open_sections:
        found[title] = "\n".join(body)
    return found


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_hook_lists_match_specs() -> None:
    assert sorted((*hookspecs.REGISTRATION_HOOKS, *hookspecs.OBSERVER_HOOKS)) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_exact_signature(hook: str) -> None:
    docs = sections(DOCS.read_text(encoding="utf-8"))
    assert hook in docs, f"docs/plugins.md has no section titled {hook!r}"
    expected = signature_text(hook)
    assert expected in docs[hook], f"section {hook!r} lacks the signature line {expected!r}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names.update(
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        )
    assert f"test_hook_{hook}" in names


def _sample_kwargs() -> dict[str, dict[str, Any]]:
    stage = StageSpec(name="judge", actor="judge", model="qwen2.5:7b", needs=())
    job = Job(id="j1", priority=0, input={"topic": "t"}, stages=(stage,), pipeline="debate")
    return {
        "stage_finished": {
            "job": job,
            "stage": stage,
            "output": {"winner": "critic"},
            "record": {},
        },
        "stage_failed": {"job": job, "stage": stage, "error": "boom", "attempt": 3, "final": True},
        "job_finished": {"job": job, "result": {"id": "j1"}},
        "job_failed": {"job_id": "j1", "job": None, "error": {"message": "boom"}},
    }


@pytest.mark.parametrize("hook", HOOKS)
async def test_hook_example_runs(hook: str, tmp_path: Path) -> None:
    """The section's example is a plugin file that loads and, for observers, runs cleanly."""
    blocks = [
        b
        for b in python_blocks(sections(DOCS.read_text(encoding="utf-8"))[hook])
        if "@hookimpl" in b
    ]
    assert blocks, f"section {hook!r} has no example plugin"
    (tmp_path / "example.py").write_text(blocks[0], encoding="utf-8")
    host = load_plugins([tmp_path], entry_points=False)
    row = next(r for r in host.describe() if r["name"] == "example")
    assert hook in row["hooks"]
    if hook in hookspecs.OBSERVER_HOOKS:
        with structlog.testing.capture_logs() as logs:
            await host.notify(hook, **_sample_kwargs()[hook])
        assert not [e for e in logs if e["event"] == "plugin_hook_failed"], logs


def test_complete_plugin_example_works(tmp_path: Path) -> None:
    docs = sections(DOCS.read_text(encoding="utf-8"))
    (tmp_path / "summarise.py").write_text(python_blocks(docs["A complete plugin"])[0])
    host = load_plugins([tmp_path], entry_points=False)
    job = host.resolve(parse_document({"pipeline": "summarise", "input": {"text": "x"}}), "j")
    assert [(s.name, s.model) for s in job.stages] == [
        ("summary", "qwen2.5:7b"),
        ("french", "gemma2:9b"),
    ]
