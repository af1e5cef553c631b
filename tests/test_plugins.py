"""The plugin host: loading, validation, clashes, allow-list, observers, config pipelines."""

from __future__ import annotations

import asyncio
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from ihld.backends.base import ChatRequest, ChatResult
from ihld.common.errors import JobError, PluginError
from ihld.core.actors import Actor, ActorLike, StageContext
from ihld.core.config import PipelineConfig
from ihld.core.jobs import Job, StageOverride, StageSpec, parse_document
from ihld.plugins import builtin, openai_batch
from ihld.plugins.hookspecs import hookimpl
from ihld.plugins.host import PluginHost
from ihld.plugins.loader import load_plugins
from tests.conftest import REPO

ECHO = """
from ihld.backends.base import ChatRequest
from ihld.plugins.builtin import chat_request
from ihld.plugins.hookspecs import hookimpl


class Echo:
    name = "{name}"
    default_model = {model!r}

    def build_request(self, ctx):
        return chat_request(ctx, [{{"role": "user", "content": str(ctx.input)}}])

    def parse_response(self, ctx, result):
        return result.content


@hookimpl
def register_actors(register):
    register(Echo())
"""


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IHLD_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("IHLD_TRACE_HOOKS", raising=False)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "plugins"
    directory.mkdir()
    return directory


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def echo(name: str = "echo", model: str | None = "m1") -> str:
    return ECHO.format(name=name, model=model)


def load(*dirs: Path, **kwargs: Any) -> PluginHost:
    kwargs.setdefault("entry_points", False)
    return load_plugins(list(dirs), **kwargs)


def row(host: PluginHost, name: str) -> dict[str, Any]:
    return next(r for r in host.describe() if r["name"] == name)


def sample_job() -> Job:
    stage = StageSpec(name="a", model="m1", needs=())
    return Job(id="j1", priority=0, input={"topic": "t"}, stages=(stage,), pipeline="p")


class Recorder:
    """A temporary observer plugin: remembers every call, sync or async."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def stage_finished(
        self, job: Job, stage: StageSpec, output: Any, record: dict[str, Any]
    ) -> None:
        self.calls.append(
            ("stage_finished", {"job": job.id, "stage": stage.name, "output": output})
        )

    @hookimpl
    async def stage_failed(self, job: Job, error: str, attempt: int, final: bool) -> None:
        await asyncio.sleep(0)
        self.calls.append(("stage_failed", {"job": job.id, "error": error, "final": final}))

    @hookimpl
    async def job_finished(self, job: Job, result: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        self.calls.append(("job_finished", {"job": job.id, "result": result}))

    @hookimpl
    def job_failed(self, job_id: str, job: Job | None, error: dict[str, Any]) -> None:
        self.calls.append(("job_failed", {"job_id": job_id, "job": job, "error": error}))


# -- one test per hook ------------------------------------------------------------------


def test_hook_register_actors(plugin_dir: Path) -> None:
    write(plugin_dir, "echoes", echo("echo", "m1"))
    host = load(plugin_dir)
    assert set(host.actors) == {"prompt", "openai-chat", "echo"}
    assert host.actors["echo"].name == "echo"
    assert isinstance(host.actors["echo"], ActorLike)  # duck-typed actors register too
    assert host.actor_models() == {"prompt": None, "openai-chat": None, "echo": "m1"}
    assert row(host, "echoes")["actors"] == ["echo"]
    assert row(host, "echoes")["hooks"] == ["register_actors"]


def test_hook_register_pipelines(plugin_dir: Path) -> None:
    write(plugin_dir, "echoes", echo())
    write(
        plugin_dir,
        "flows",
        """
        from ihld.plugins.hookspecs import hookimpl
        from ihld.core.jobs import StageSpec

        @hookimpl
        def register_pipelines(register):
            register("flow", [
                {"name": "first", "actor": "echo"},
                StageSpec(name="second", model="m2", prompt="Again: {stages[first]}"),
            ])
        """,
    )
    host = load(plugin_dir)
    assert [s.name for s in host.pipelines["flow"]] == ["first", "second"]
    assert all(isinstance(s, StageSpec) for s in host.pipelines["flow"])
    job = host.resolve(parse_document({"pipeline": "flow", "input": {"x": 1}}), "j1")
    assert [(s.name, s.actor, s.model, s.needs) for s in job.stages] == [
        ("first", "echo", "m1", ()),
        ("second", "prompt", "m2", ("first",)),
    ]
    assert row(host, "flows")["pipelines"] == ["flow"]


async def test_hook_stage_finished() -> None:
    recorder = Recorder()
    host = load(plugins={"recorder": recorder})
    job = sample_job()
    await host.notify(
        "stage_finished", job=job, stage=job.stages[0], output={"k": 1}, record={"model": "m1"}
    )
    assert recorder.calls == [("stage_finished", {"job": "j1", "stage": "a", "output": {"k": 1}})]


async def test_hook_stage_failed() -> None:
    recorder = Recorder()
    host = load(plugins={"recorder": recorder})
    job = sample_job()
    await host.notify(
        "stage_failed", job=job, stage=job.stages[0], error="boom", attempt=2, final=False
    )
    assert recorder.calls == [("stage_failed", {"job": "j1", "error": "boom", "final": False})]


async def test_hook_job_finished(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "announcer",
        """
        import asyncio
        from ihld.plugins.hookspecs import hookimpl

        SEEN = []

        @hookimpl
        async def job_finished(job, result):
            await asyncio.sleep(0)
            SEEN.append((job.id, result["status"]))
        """,
    )
    host = load(plugin_dir)
    await host.notify("job_finished", job=sample_job(), result={"status": "done"})
    assert getattr(host.pm.get_plugin("announcer"), "SEEN", None) == [("j1", "done")]


async def test_hook_job_failed() -> None:
    recorder = Recorder()
    host = load(plugins={"recorder": recorder})
    await host.notify("job_failed", job_id="bad-1", job=None, error={"message": "malformed"})
    assert recorder.calls == [
        ("job_failed", {"job_id": "bad-1", "job": None, "error": {"message": "malformed"}})
    ]


# -- names: overriding the built-in, clashes -----------------------------------------


def test_user_plugin_overrides_builtin_prompt(plugin_dir: Path) -> None:
    write(plugin_dir, "myprompt", echo("prompt", "mine"))
    host = load(plugin_dir)
    assert host.actors["prompt"] is not builtin.PROMPT_ACTOR
    assert host.actor_models()["prompt"] == "mine"
    assert row(host, "ihld.plugins.builtin")["actors"] == []
    assert row(host, "ihld.plugins.builtin")["shadowed"] == ["prompt"]
    assert row(host, "ihld.plugins.openai_batch")["actors"] == ["openai-chat"]
    assert row(host, "myprompt")["actors"] == ["prompt"]


def test_user_object_plugin_overrides_builtin_prompt() -> None:
    class MyPrompt:
        name = "prompt"
        default_model: str | None = "x"

        def build_request(self, ctx: StageContext) -> ChatRequest:
            raise NotImplementedError

        def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
            return result.content

    class Plugin:
        @hookimpl(tryfirst=True)  # call order does not decide who wins
        def register_actors(self, register: Callable[[Actor], None]) -> None:
            register(MyPrompt())

    host = load(plugins={"mine": Plugin()})
    assert isinstance(host.actors["prompt"], MyPrompt)


def test_two_user_plugins_same_actor_is_an_error_naming_both(plugin_dir: Path) -> None:
    first = write(plugin_dir, "alpha", echo("echo"))
    second = write(plugin_dir, "beta", echo("echo"))
    with pytest.raises(PluginError) as info:
        load(plugin_dir)
    message = str(info.value)
    assert "actor 'echo'" in message
    assert "'alpha'" in message and "'beta'" in message
    assert str(first) in message and str(second) in message


def test_two_user_plugins_same_pipeline_is_an_error_naming_both(plugin_dir: Path) -> None:
    source = """
        from ihld.plugins.hookspecs import hookimpl

        @hookimpl
        def register_pipelines(register):
            register("same", [{"name": "s", "model": "m", "prompt": "hi"}])
        """
    write(plugin_dir, "one", source)
    write(plugin_dir, "two", source)
    with pytest.raises(
        PluginError, match=r"pipeline 'same' is registered by two plugins.*'one'.*'two'"
    ):
        load(plugin_dir)


def test_plugin_registering_a_name_twice_is_an_error(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "twice",
        echo("echo").replace("register(Echo())", "register(Echo())\n    register(Echo())"),
    )
    with pytest.raises(PluginError, match="registers actor 'echo' twice"):
        load(plugin_dir)


def test_same_file_name_in_two_dirs_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a", "dup", echo("one"))
    write(tmp_path / "b", "dup", echo("two"))
    with pytest.raises(PluginError, match="two plugins are named 'dup'"):
        load(tmp_path / "a", tmp_path / "b")


# -- loading errors --------------------------------------------------------------------


def test_syntax_error_names_the_file(plugin_dir: Path) -> None:
    path = write(plugin_dir, "broken", "def register_actors(:\n")
    with pytest.raises(PluginError, match="SyntaxError") as info:
        load(plugin_dir)
    assert str(path) in str(info.value)


def test_import_error_names_the_file(plugin_dir: Path) -> None:
    path = write(plugin_dir, "needy", "import ihld_no_such_module\n")
    with pytest.raises(PluginError, match=r"ModuleNotFoundError.*ihld_no_such_module") as info:
        load(plugin_dir)
    assert str(path) in str(info.value)
    assert not [m for m in sys.modules if m.endswith("_needy")]


def test_plugin_calling_exit_at_import_does_not_exit(plugin_dir: Path) -> None:
    write(plugin_dir, "quitter", "import sys\nsys.exit(3)\n")
    with pytest.raises(PluginError, match="SystemExit"):
        load(plugin_dir)


def test_misspelt_hook_fails_via_check_pending(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "typo",
        """
        from ihld.plugins.hookspecs import hookimpl

        @hookimpl
        def register_actor(register):
            pass
        """,
    )
    with pytest.raises(PluginError) as info:
        load(plugin_dir)
    message = str(info.value)
    assert "unknown hook 'register_actor'" in message
    assert "did you mean 'register_actors'" in message
    assert "typo.py" in message


def test_misspelt_argument_names_the_file(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "argtypo",
        """
        from ihld.plugins.hookspecs import hookimpl

        @hookimpl
        def register_actors(regster):
            pass
        """,
    )
    with pytest.raises(PluginError, match=r"argtypo\.py.*regster"):
        load(plugin_dir)


def test_undecorated_hook_is_an_error(plugin_dir: Path) -> None:
    write(plugin_dir, "plain", "def register_actors(register):\n    pass\n")
    with pytest.raises(PluginError, match=r"register_actors\(\) is not decorated with @hookimpl"):
        load(plugin_dir)


def test_wrapper_impls_are_rejected() -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def job_finished(self, job: Job, result: dict[str, Any]) -> Any:
            return (yield)

    with pytest.raises(PluginError, match="wrapper"):
        load(plugins={"wrapping": Wrapping()})


def test_register_hook_that_raises_is_a_plugin_error(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "raiser",
        """
        from ihld.plugins.hookspecs import hookimpl

        @hookimpl
        def register_pipelines(register):
            raise RuntimeError("no pipelines today")
        """,
    )
    with pytest.raises(PluginError, match=r"'raiser'.*register_pipelines raised RuntimeError"):
        load(plugin_dir)


def test_missing_plugin_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"plugins\.dirs: .*nowhere is not a directory"):
        load(tmp_path / "nowhere")


def test_private_and_hidden_files_are_skipped(plugin_dir: Path) -> None:
    write(plugin_dir, "_helper", "raise RuntimeError('must not be imported')\n")
    write(plugin_dir, ".hidden", "raise RuntimeError('must not be imported')\n")
    (plugin_dir / "notes.txt").write_text("not python")
    write(plugin_dir, "echoes", echo())
    host = load(plugin_dir)
    assert [r["name"] for r in host.describe()] == [
        "ihld.plugins.builtin", "ihld.plugins.openai_batch", "echoes"
    ]


def test_each_load_is_fresh(plugin_dir: Path) -> None:
    path = write(plugin_dir, "echoes", echo("echo", "m1"))
    first = load(plugin_dir)
    path.write_text(textwrap.dedent(echo("echo", "m2")))
    second = load(plugin_dir)
    assert first.pm is not second.pm
    assert first.actor_models()["echo"] == "m1"
    assert second.actor_models()["echo"] == "m2"


# -- invalid registrations ------------------------------------------------------------


class _Good:
    name = "good"
    default_model: str | None = None

    def build_request(self, ctx: StageContext) -> ChatRequest:
        raise NotImplementedError

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        return None


class _BadName(_Good):
    name = "has space"


class _NoParse:
    name = "noparse"
    default_model: str | None = None

    def build_request(self, ctx: StageContext) -> ChatRequest:
        raise NotImplementedError


class _AsyncBuild(_Good):
    name = "asyncbuild"

    async def build_request(self, ctx: StageContext) -> ChatRequest:  # type: ignore[override]
        raise NotImplementedError


class _NoDefault:
    name = "nodefault"

    def build_request(self, ctx: StageContext) -> ChatRequest:
        raise NotImplementedError

    def parse_response(self, ctx: StageContext, result: ChatResult) -> Any:
        return None


def _actor_plugin(actor: object) -> object:
    class Plugin:
        @hookimpl
        def register_actors(self, register: Callable[[object], None]) -> None:
            register(actor)

    return Plugin()


@pytest.mark.parametrize(
    ("actor", "message"),
    [
        (_Good, "register an instance, not the class"),
        (_BadName(), "name must be a string matching"),
        (_NoParse(), "parse_response"),
        (_AsyncBuild(), "build_request must be synchronous"),
        (_NoDefault(), "set default_model"),
        ("prompt", "name must be a string"),
    ],
)
def test_invalid_actor_is_rejected(actor: object, message: str) -> None:
    with pytest.raises(PluginError, match=message) as info:
        load(plugins={"bad": _actor_plugin(actor)})
    assert "'bad'" in str(info.value)


def _pipeline_plugin(name: object, stages: object) -> object:
    class Plugin:
        @hookimpl
        def register_pipelines(self, register: Callable[[object, object], None]) -> None:
            register(name, stages)

    return Plugin()


@pytest.mark.parametrize(
    ("name", "stages", "message"),
    [
        ("p", [], "at least one stage"),
        ("bad name", [{"name": "a", "prompt": "x"}], "pipeline name must match"),
        ("p", {"name": "a"}, "stages must be a list"),
        ("p", [{"name": "a", "colour": "red"}], r"stages\[0\]: colour: unknown field"),
        ("p", [{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"}], "two stages are named"),
        ("p", [{"name": "a", "needs": ["b"], "prompt": "x"}], "needs 'b', which is not an earlier"),
        ("p", [{"name": "a", "actor": "ghost"}], "unknown actor 'ghost'"),
        ("p", [{"name": "a"}], "the prompt actor needs a 'prompt' template"),
        ("p", [{"name": "a", "prompt": "{input.__class__}"}], "attribute access"),
        (
            "p",
            [
                {"name": "a", "prompt": "x"},
                {"name": "b", "needs": [], "prompt": "{stages[a]}"},
            ],
            "no earlier stage named 'a'",
        ),
    ],
)
def test_invalid_pipeline_is_rejected(name: object, stages: object, message: str) -> None:
    with pytest.raises(PluginError, match=message) as info:
        load(plugins={"bad": _pipeline_plugin(name, stages)})
    assert "'bad'" in str(info.value)


def test_template_may_read_stages_finished_through_needs() -> None:
    stages = [
        {"name": "a", "prompt": "x"},
        {"name": "b", "prompt": "{stages[a]}"},
        {"name": "c", "needs": ["b"], "prompt": "{stages[a]} {stages[b]}"},
    ]
    host = load(plugins={"ok": _pipeline_plugin("p", stages)})
    assert [s.name for s in host.pipelines["p"]] == ["a", "b", "c"]


# -- IHLD_LOAD_PLUGINS -----------------------------------------------------------------


def _two_plugins(directory: Path) -> None:
    write(directory, "alpha", echo("a"))
    # beta refuses to be imported: proves that a plugin outside the list is never imported.
    write(directory, "beta", echo("b") + "\nraise RuntimeError('beta imported')\n")


def test_allow_list_env_loads_only_named_plugins(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_plugins(plugin_dir)
    monkeypatch.setenv("IHLD_LOAD_PLUGINS", " alpha , other")
    with structlog.testing.capture_logs() as logs:
        host = load(plugin_dir)
    assert [e["plugin"] for e in logs if e["event"] == "plugin_not_found"] == ["other"]
    assert set(host.actors) == {"prompt", "openai-chat", "a"}
    assert [r["name"] for r in host.describe()] == [
        "ihld.plugins.builtin", "ihld.plugins.openai_batch", "alpha"
    ]


def test_allow_list_env_empty_loads_only_builtin(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_plugins(plugin_dir)
    monkeypatch.setenv("IHLD_LOAD_PLUGINS", "")
    host = load(plugin_dir)
    assert set(host.actors) == {"prompt", "openai-chat"}


def test_allow_argument_wins_over_env(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _two_plugins(plugin_dir)
    monkeypatch.setenv("IHLD_LOAD_PLUGINS", "beta")
    host = load(plugin_dir, allow=["alpha"])
    assert set(host.actors) == {"prompt", "openai-chat", "a"}


# -- entry points ----------------------------------------------------------------------


def _fake_distribution(site: Path, module: str, body: str) -> None:
    dist_info = site / "ihld_fake_dist-1.2.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ihld-fake-dist\nVersion: 1.2\n"
    )
    (dist_info / "entry_points.txt").write_text(f"[ihld]\nfakeplug = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(body))


def test_entry_point_plugins_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"ihld_fake_{tmp_path.name.replace('-', '_')}"
    _fake_distribution(tmp_path / "site", module, echo("installed"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        assert "installed" not in load(entry_points=False).actors
        host = load(entry_points=True)
        assert "installed" in host.actors
        info = row(host, "fakeplug")
        assert info["kind"] == "entry_point"
        assert info["dist"] == "ihld-fake-dist 1.2"
        monkeypatch.setenv("IHLD_LOAD_PLUGINS", "")
        assert "installed" not in load(entry_points=True).actors
    finally:
        sys.modules.pop(module, None)


def test_entry_point_import_error_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"ihld_fake_{tmp_path.name.replace('-', '_')}"
    _fake_distribution(tmp_path / "site", module, "raise ImportError('missing dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(PluginError, match=f"entry point fakeplug = '{module}'.*missing dependency"):
        load(entry_points=True)


# -- observers -------------------------------------------------------------------------


async def test_async_observer_is_awaited(plugin_dir: Path) -> None:
    write(
        plugin_dir,
        "slow",
        """
        import asyncio
        from ihld.plugins.hookspecs import hookimpl

        DONE = []

        @hookimpl
        async def job_failed(job_id):
            await asyncio.sleep(0.01)
            DONE.append(job_id)
        """,
    )
    host = load(plugin_dir)
    await host.notify("job_failed", job_id="x", job=None, error={})
    assert getattr(host.pm.get_plugin("slow"), "DONE", None) == ["x"]


async def test_raising_observers_are_logged_and_swallowed() -> None:
    class SyncBoom:
        @hookimpl
        def job_finished(self, job: Job) -> None:
            raise ValueError("sync boom")

    class AsyncBoom:
        @hookimpl
        async def job_finished(self, job: Job) -> None:
            raise RuntimeError("async boom")

    recorder = Recorder()
    host = load(plugins={"recorder": recorder, "syncboom": SyncBoom(), "asyncboom": AsyncBoom()})
    with structlog.testing.capture_logs() as logs:
        await host.notify("job_finished", job=sample_job(), result={})
    assert recorder.calls == [("job_finished", {"job": "j1", "result": {}})]
    failures = sorted(
        (e["plugin"], e["hook"], e["error"], e["log_level"])
        for e in logs
        if e["event"] == "plugin_hook_failed"
    )
    assert failures == [
        ("asyncboom", "job_finished", "RuntimeError: async boom", "error"),
        ("syncboom", "job_finished", "ValueError: sync boom", "error"),
    ]


async def test_observer_cancellation_propagates() -> None:
    class Hang:
        @hookimpl
        async def job_finished(self) -> None:
            await asyncio.sleep(3600)

    host = load(plugins={"hang": Hang()})
    task = asyncio.create_task(host.notify("job_finished", job=sample_job(), result={}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_notify_rejects_registration_hooks_and_wrong_arguments() -> None:
    host = load()
    with pytest.raises(ValueError, match="not an observer hook"):
        await host.notify("register_actors", register=print)
    with pytest.raises(TypeError, match="job_finished takes"):
        await host.notify("job_finished", job=sample_job())


async def test_trace_hooks_env_logs_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IHLD_TRACE_HOOKS", "1")
    with structlog.testing.capture_logs() as logs:
        host = load(plugins={"recorder": Recorder()})
        await host.notify("job_failed", job_id="x", job=None, error={})
    called = [(e["hook"], e["plugins"]) for e in logs if e["event"] == "plugin_hook_called"]
    assert ("register_actors", ["ihld.plugins.builtin"]) in called
    assert ("job_failed", ["recorder"]) in called
    returned = [e for e in logs if e["event"] == "plugin_hook_returned"]
    assert len(returned) == len(called)
    assert all(e["error"] is None for e in returned)


def test_no_trace_logs_without_env() -> None:
    with structlog.testing.capture_logs() as logs:
        load(plugins={"recorder": Recorder()})
    assert not [e for e in logs if e["event"] == "plugin_hook_called"]


# -- config pipelines ------------------------------------------------------------------


def _flow_plugin(directory: Path) -> None:
    write(directory, "echoes", echo("echo", "m1"))
    write(
        directory,
        "flows",
        """
        from ihld.plugins.hookspecs import hookimpl

        @hookimpl
        def register_pipelines(register):
            register("flow", [
                {"name": "first", "actor": "echo"},
                {"name": "second", "actor": "echo"},
            ])
        """,
    )


def test_config_pipeline_defines_a_new_pipeline() -> None:
    config = {
        "haiku": PipelineConfig(stages=[StageSpec(name="draft", model="q", prompt="{input}")])
    }
    host = load(config_pipelines=config)
    job = host.resolve(parse_document({"pipeline": "haiku", "input": {}}), "j")
    assert [(s.name, s.model) for s in job.stages] == [("draft", "q")]
    assert row(host, "(config)")["pipelines"] == ["haiku"]


def test_config_pipeline_replaces_a_plugin_pipeline(plugin_dir: Path) -> None:
    _flow_plugin(plugin_dir)
    config = {"flow": PipelineConfig(stages=[StageSpec(name="only", actor="echo")])}
    host = load(plugin_dir, config_pipelines=config)
    assert [s.name for s in host.pipelines["flow"]] == ["only"]
    assert row(host, "flows")["shadowed"] == ["flow"]


def test_config_overrides_apply_to_a_plugin_pipeline(plugin_dir: Path) -> None:
    _flow_plugin(plugin_dir)
    override = StageOverride(model="big", options={"temperature": 0})
    host = load(
        plugin_dir, config_pipelines={"flow": PipelineConfig(overrides={"second": override})}
    )
    assert host.pipeline_overrides == {"flow": {"second": override}}
    job = host.resolve(parse_document({"pipeline": "flow"}), "j")
    assert [(s.model, s.options) for s in job.stages] == [("m1", {}), ("big", {"temperature": 0})]
    # A job's own override wins over the config's.
    spec = parse_document({"pipeline": "flow", "overrides": {"second": {"model": "mine"}}})
    assert host.resolve(spec, "j").stages[1].model == "mine"


def test_config_overrides_for_unknown_pipeline_is_an_error() -> None:
    config = {"nope": PipelineConfig(overrides={"a": StageOverride(model="x")})}
    with pytest.raises(PluginError, match=r"pipelines\.nope: overrides for unknown pipeline"):
        load(config_pipelines=config)


def test_config_overrides_for_unknown_stage_is_an_error(plugin_dir: Path) -> None:
    _flow_plugin(plugin_dir)
    config = {"flow": PipelineConfig(overrides={"third": StageOverride(model="x")})}
    with pytest.raises(PluginError, match=r"pipelines\.flow\.overrides\.third: .*no stage 'third'"):
        load(plugin_dir, config_pipelines=config)


def test_config_pipeline_with_unknown_actor_is_an_error() -> None:
    config = {"p": PipelineConfig(stages=[StageSpec(name="a", actor="ghost")])}
    with pytest.raises(PluginError, match=r"pipelines\.p: stage 'a' uses unknown actor 'ghost'"):
        load(config_pipelines=config)


# -- describe --------------------------------------------------------------------------


def test_describe_lists_every_plugin(plugin_dir: Path) -> None:
    path = write(plugin_dir, "echoes", echo())
    host = load(plugin_dir, plugins={"recorder": Recorder()})
    assert host.describe() == [
        {
            "name": "ihld.plugins.builtin",
            "kind": "builtin",
            "file": builtin.__file__,
            "dist": None,
            "hooks": ["register_actors", "register_policies"],
            "actors": ["prompt"],
            "pipelines": [],
            "policies": ["affinity", "fifo"],
            "formats": [],
            "shadowed": [],
        },
        {
            "name": "ihld.plugins.openai_batch",
            "kind": "builtin",
            "file": openai_batch.__file__,
            "dist": None,
            "hooks": ["register_actors", "register_intake_formats"],
            "actors": ["openai-chat"],
            "pipelines": [],
            "policies": [],
            "formats": ["openai-batch"],
            "shadowed": [],
        },
        {
            "name": "echoes",
            "kind": "directory",
            "file": str(path),
            "dist": None,
            "hooks": ["register_actors"],
            "actors": ["echo"],
            "pipelines": [],
            "policies": [],
            "formats": [],
            "shadowed": [],
        },
        {
            "name": "recorder",
            "kind": "object",
            "file": None,
            "dist": None,
            "hooks": ["job_failed", "job_finished", "stage_failed", "stage_finished"],
            "actors": [],
            "policies": [],
            "formats": [],
            "pipelines": [],
            "shadowed": [],
        },
    ]


# -- resolving jobs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "path", "message"),
    [
        (
            [{"name": "a", "model": "m", "prompt": "{input.__class__}"}],
            "stages[0].prompt",
            "attribute",
        ),
        ([{"name": "a", "model": "m"}], "stages[0].prompt", "needs a 'prompt' template"),
        (
            [
                {"name": "a", "model": "m", "prompt": "x"},
                {"name": "b", "model": "m", "needs": [], "prompt": "{stages[a]}"},
            ],
            "stages[1].prompt",
            "no earlier stage named 'a'",
        ),
    ],
)
def test_resolve_checks_prompt_templates(
    stages: list[dict[str, Any]], path: str, message: str
) -> None:
    host = load()
    with pytest.raises(JobError) as info:
        host.resolve(parse_document({"stages": stages}), "j")
    assert info.value.path == path
    assert message in str(info.value)
    assert str(info.value).startswith(path)


def test_resolve_accepts_stages_finished_through_needs() -> None:
    stages = [
        {"name": "a", "model": "m", "prompt": "{input[q]}"},
        {"name": "b", "model": "m", "prompt": "{stages[a]}"},
        {"name": "c", "model": "m", "needs": ["b"], "prompt": "{stages[a]}{stages[b]}"},
    ]
    job = load().resolve(parse_document({"stages": stages, "input": {"q": 1}}), "j")
    assert [s.needs for s in job.stages] == [(), ("a",), ("b",)]


def test_resolve_leaves_other_actors_templates_alone(plugin_dir: Path) -> None:
    write(plugin_dir, "echoes", echo())
    spec = parse_document({"stages": [{"name": "a", "actor": "echo", "prompt": "{x.y}"}]})
    assert load(plugin_dir).resolve(spec, "j").stages[0].model == "m1"


def test_plugin_author_imports_only_from_ihld() -> None:
    """The plugin API is one import: the worked example and the docs' plugin examples use
    ``from ihld import ...`` and nothing deeper (the host API section is for the daemon)."""
    import ihld

    docs = (REPO / "docs" / "plugins.md").read_text().split("## For the daemon")[0]
    sources = {"plugins/debate.py": (REPO / "plugins" / "debate.py").read_text(), "docs": docs}
    for where, text in sources.items():
        deep = re.findall(r"^\s*(?:from|import) ihld\.\S+", text, flags=re.MULTILINE)
        assert not deep, f"{where} imports ihld internals: {deep}"
    for name in ihld.__all__:
        assert getattr(ihld, name) is not None, name


NEWEST_POLICY = '''
from ihld import Affinity, Task, hookimpl


class Newest(Affinity):
    name = "newest"

    def queue_order(self, task: Task) -> float:
        return -task.ready_at


@hookimpl
def register_policies(register):
    register("newest", Newest)
'''


def test_hook_register_policies(plugin_dir: Path) -> None:
    """A plugin file adds a policy, importing only from ihld; the scheduler runs it."""
    from ihld import BackendSlots, Scheduler, Task
    from ihld.core.tasks import Dispatch

    write(plugin_dir, "newest", NEWEST_POLICY)
    host = load(plugin_dir)
    assert set(host.policies) == {"affinity", "fifo", "newest"}
    assert row(host, "newest")["policies"] == ["newest"]
    sched = Scheduler([BackendSlots("b")], policy=host.policies["newest"], prefetch=0)
    assert sched.policy.name == "newest" and sched.policy.pins_models
    sched.add(Task("old", "s", "m", "m", ready_at=0))
    sched.add(Task("new", "s", "m", "m", ready_at=5))
    sched.next_actions(5)
    sched.loaded("b", "m", 5)
    (first,) = sched.next_actions(5)
    assert isinstance(first, Dispatch) and first.task.job_id == "new"


def test_policy_clash_and_bad_name_fail_loading(plugin_dir: Path) -> None:
    write(plugin_dir, "one", NEWEST_POLICY)
    write(plugin_dir, "two", NEWEST_POLICY)
    with pytest.raises(PluginError, match="policy 'newest' is registered by two plugins"):
        load(plugin_dir)
    renamed = NEWEST_POLICY.replace('"newest", Newest', '"no way", Newest')
    (plugin_dir / "two.py").write_text(renamed)
    with pytest.raises(PluginError, match="policy name 'no way'"):
        load(plugin_dir)
