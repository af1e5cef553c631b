"""HTTP fixtures the client and simulator tests share, so each is written once.

Import a fixture function into the test module to get its fixture (as with
``ollama_peer_fixture``): ``session_fixture`` provides ``session``, the
daemon's own session (``make_session``); ``http_fixture`` provides ``http``, a
plain aiohttp session with a 30 s total timeout. ``sims`` backs a module's own
``sim`` fixture, whose default speed is the module's choice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from ihld.backends.ollama import make_session
from ihld.sim import SimHandle, start_sim

__all__ = ["SimFactory", "http_fixture", "msgs", "session_fixture", "sims"]

SimFactory = Callable[..., Awaitable[SimHandle]]


@asynccontextmanager
async def sims(*, speed: float, profile: str = "laptop-6gb") -> AsyncIterator[SimFactory]:
    """Start simulators on 127.0.0.1 (a free port each), by default ``profile`` at ``speed``.

    Every simulator started is closed when the block ends.
    """
    handles: list[SimHandle] = []

    async def make(**kwargs: Any) -> SimHandle:
        kwargs.setdefault("profile", profile)
        kwargs.setdefault("speed", speed)
        handle = await start_sim("127.0.0.1", 0, **kwargs)
        handles.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in handles:
            await handle.close()


@pytest.fixture(name="http")
async def http_fixture() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture(name="session")
async def session_fixture() -> AsyncIterator[aiohttp.ClientSession]:
    s = make_session()
    yield s
    await s.close()


def msgs(text: str) -> list[dict[str, str]]:
    """One user message, as a chat request's ``messages``."""
    return [{"role": "user", "content": text}]
