"""The llama.cpp client against a scripted router (a real aiohttp server on 127.0.0.1).

The fake answers as llama.cpp's ``tools/server/server-models.cpp`` does (and as the
router built here answered, ../shared/REAL-SERVER.md): ``/props`` with ``role: router``,
``/models`` with ``status.value``, load/unload that run in the background, chats with
``autoload=false`` refused for a model that is not running, 400 ``model 'x' not found``.
The real router is exercised by tests/real/.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ihld.backends.base import (
    BackendUnavailable,
    ChatRequest,
    LoadFailed,
    ModelNotFound,
    ModelNotLoaded,
    ServerError,
)
from ihld.backends.llamacpp import LlamaCppBackend
from ihld.backends.settings import BackendConfig


@dataclass
class FakeRouter:
    models: dict[str, str] = field(
        default_factory=lambda: {"gemma3:270M": "unloaded", "gemma3-b:270M": "unloaded"}
    )
    router: bool = True
    fail_load: set[str] = field(default_factory=set)  # their child exits while loading
    polls_to_load: int = 2  # GET /models answers "loading" this many times first
    chat_status: int | None = None  # answer chats with this status instead
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    _loading: dict[str, int] = field(default_factory=dict)

    def _error(self, status: int, message: str) -> web.Response:
        body = {"error": {"code": status, "message": message, "type": "invalid_request_error"}}
        return web.json_response(body, status=status)

    async def props(self, request: web.Request) -> web.Response:
        if not self.router:
            return web.json_response({"total_slots": 2, "model_alias": "only"})
        if request.query.get("model"):
            return web.json_response({"total_slots": 4, "model_alias": request.query["model"]})
        return web.json_response({"role": "router", "max_instances": 1, "models_autoload": True})

    async def list_models(self, request: web.Request) -> web.Response:
        if not self.router:
            return web.json_response({"object": "list", "data": [{"id": "only"}]})
        data = []
        for name, state in self.models.items():
            status: dict[str, Any] = {"value": state}
            if state == "loading":
                self._loading[name] -= 1
                if self._loading[name] <= 0:
                    if name in self.fail_load:
                        self.models[name] = "unloaded"
                        status = {"value": "unloaded", "failed": True, "exit_code": 1}
                    else:
                        self.models[name] = "loaded"
            data.append({"id": name, "aliases": [], "status": status})
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        name = (await request.json())["model"]
        self.seen.append(("load", name, None))
        if name not in self.models:
            return self._error(404, "model is not found")
        if self.models[name] in ("loaded", "loading"):
            return self._error(400, "model is already running")
        for other in self.models:  # --models-max 1
            if other != name and self.models[other] == "loaded":
                self.models[other] = "unloaded"
        self.models[name] = "loading"
        self._loading[name] = self.polls_to_load
        return web.json_response({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["model"]
        self.seen.append(("unload", name, None))
        self.models[name] = "unloaded"
        return web.json_response({"success": True})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = body["model"]
        self.seen.append(("chat", name, dict(request.query)))
        if self.chat_status is not None:
            return self._error(self.chat_status, "boom")
        if self.router and name not in self.models:
            return self._error(400, f"model '{name}' not found")
        no_autoload = self.router and request.query.get("autoload") == "false"
        if no_autoload and self.models[name] != "loaded":
            return self._error(400, "model is not loaded")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [
            {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm "}}]},
            {"choices": [{"index": 0, "delta": {"content": "hello"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
             "timings": {"prompt_n": 7, "cache_n": 3, "prompt_ms": 20.0, "predicted_n": 2,
                         "predicted_ms": 10.0}},
        ]
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


@pytest.fixture
async def router() -> AsyncIterator[tuple[FakeRouter, LlamaCppBackend]]:
    fake = FakeRouter()
    app = web.Application()
    app.router.add_get("/props", fake.props)
    app.router.add_get("/models", fake.list_models)
    app.router.add_get("/v1/models", fake.list_models)
    app.router.add_post("/models/load", fake.load)
    app.router.add_post("/models/unload", fake.unload)
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_get("/health", fake.health)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        config = BackendConfig(
            name="lc", url=str(server.make_url("")).rstrip("/"), kind="llamacpp", retries=1
        )
        yield fake, LlamaCppBackend(config, session, backoff_base_s=0.001, backoff_cap_s=0.01)
    await server.close()


def ask(model: str) -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}])


async def test_load_waits_until_loaded_and_reports_total_slots(router: Any) -> None:
    fake, backend = router
    result = await backend.load("gemma3:270m", keep_alive=None)  # the job's spelling
    assert fake.models["gemma3:270M"] == "loaded"
    assert result.parallel == 4 and result.model == "gemma3:270m"
    assert await backend.ps() == [{"name": "gemma3:270M", "status": "loaded"}]
    assert await backend.load("gemma3:270m", keep_alive=None)  # "already running" is success


async def test_unload_waits_until_unloaded(router: Any) -> None:
    fake, backend = router
    await backend.load("gemma3:270M", keep_alive=None)
    await backend.unload("gemma3:270m")
    assert fake.models["gemma3:270M"] == "unloaded"
    assert await backend.ps() == []


async def test_a_child_that_exits_while_loading_is_a_failed_load(router: Any) -> None:
    fake, backend = router
    fake.fail_load.add("gemma3-b:270M")
    with pytest.raises(LoadFailed, match="exited with status 1"):
        await backend.load("gemma3-b:270m", keep_alive=None)


async def test_chats_never_autoload_and_say_when_the_model_is_gone(router: Any) -> None:
    """A chat with a keep_alive (a policy that holds models itself) carries autoload=false."""
    fake, backend = router
    with pytest.raises(ModelNotLoaded, match="model is not loaded"):
        await backend.chat(ask("gemma3:270m"), keep_alive="30m")
    assert fake.seen[-1] == ("chat", "gemma3:270M", {"autoload": "false"})
    assert sum(kind == "chat" for kind, _, _ in fake.seen) == 1  # not retried at once
    await backend.load("gemma3:270m", keep_alive=None)
    result = await backend.chat(ask("gemma3:270m"), keep_alive="30m")
    assert result.content == "hello" and result.thinking == "hmm "
    assert result.metrics["prompt_eval_count"] == 10  # evaluated 7 + 3 reused from the cache
    assert result.metrics["timings_cache_n"] == 3
    assert result.metrics["eval_duration"] == 10_000_000


async def test_without_keep_alive_the_router_loads_on_demand(router: Any) -> None:
    """fifo leaves residency to the server (as with Ollama): no autoload=false then."""
    fake, backend = router
    result = await backend.chat(ask("gemma3-b:270m"), keep_alive=None)
    assert result.content == "hello"
    assert fake.seen[-1] == ("chat", "gemma3-b:270M", {})


async def test_names_resolve_case_insensitively_only_when_unambiguous(router: Any) -> None:
    _, backend = router
    listing = [{"id": "a:1B"}, {"id": "A:1b"}, {"id": "c", "aliases": ["see"]}]
    assert backend.resolve("a:1B", listing) == "a:1B"  # exact wins
    assert backend.resolve("a:1b", listing) is None  # two candidates: ambiguous
    assert backend.resolve("SEE", listing) == "c"  # an alias, any case
    with pytest.raises(ModelNotFound, match=r"lists gemma3-b:270M, gemma3:270M"):
        await backend.load("nosuch:1b", keep_alive=None)


async def test_a_name_the_router_does_not_know_is_model_not_found(router: Any) -> None:
    fake, backend = router
    fake.models["ghost"] = "loaded"
    await backend.ps()  # the listing knows "ghost"...
    del fake.models["ghost"]  # ...and then the router does not
    with pytest.raises(ModelNotFound, match="model 'ghost' not found"):
        await backend.chat(ask("ghost"), keep_alive=None)


@pytest.mark.parametrize(("status", "error"), [(500, ServerError), (503, BackendUnavailable)])
async def test_server_errors_keep_their_effect(router: Any, status: int, error: type) -> None:
    fake, backend = router
    await backend.load("gemma3:270m", keep_alive=None)
    fake.chat_status = status
    with pytest.raises(error):
        await backend.chat(ask("gemma3:270m"), keep_alive=None)


async def test_a_single_model_server_is_one_resident_model(router: Any) -> None:
    fake, backend = router
    fake.router = False
    result = await backend.load("only", keep_alive=None)
    assert result.parallel == 2
    assert await backend.ps() == [{"name": "only"}]
    await backend.unload("only")  # nothing to do
    assert not any(kind in ("load", "unload") for kind, _, _ in fake.seen)
    assert await backend.version() == "llama.cpp"
