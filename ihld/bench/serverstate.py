"""A real server's models as the real-server bench sees them: count the loads the server
makes (for ihld and the hand-written references alike), and unload everything so every
run starts from the same state. Used by ``ihld bench --backend`` and ``ihld calibrate``.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp


class LoadCounter:
    """Counts each model's transitions to ``loaded``: in llama.cpp's ``GET /models``, or
    (``ollama``: the simulator, for predictions) a model appearing in ``/api/ps``."""

    def __init__(self, session: aiohttp.ClientSession, url: str, kind: str = "llamacpp") -> None:
        self.session, self.url, self.kind = session, url, kind
        self.loads: Counter[str] = Counter()
        self._last: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def states(self) -> dict[str, str]:
        if self.kind == "ollama":
            async with self.session.get(self.url + "/api/ps") as resp:
                models = (await resp.json()).get("models", [])
            return {m["name"]: "loaded" for m in models}
        async with self.session.get(self.url + "/models") as resp:
            data = (await resp.json()).get("data", [])
        return {m["id"]: (m.get("status") or {}).get("value", "") for m in data}

    async def _poll(self) -> None:
        while True:
            for model, state in (await self.states()).items():
                if state == "loaded" and self._last.get(model) != "loaded":
                    self.loads[model] += 1
                self._last[model] = state
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> LoadCounter:
        self._last = await self.states()
        self.loads.clear()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def unload_all(session: aiohttp.ClientSession, url: str, kind: str = "llamacpp") -> None:
    """Start every run from the same state: nothing loaded."""
    counter = LoadCounter(session, url, kind)
    for _ in range(600):
        running = [m for m, s in (await counter.states()).items() if s in ("loaded", "loading")]
        if not running:
            return
        for model in running:
            if kind == "ollama":
                path, body = "/api/chat", {"model": model, "messages": [], "keep_alive": 0}
            else:
                path, body = "/models/unload", {"model": model}
            async with session.post(url + path, json=body) as resp:
                await resp.read()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url}: models still loaded after unloading: {running}")
