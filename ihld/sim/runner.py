"""One loaded model instance: its slots, its keep-alive state and its token pacing.

Ollama calls this a runner (``runnerRef`` in server/sched.go): a model
loaded with one set of runner options, serving up to ``OLLAMA_NUM_PARALLEL``
requests at once. The pacing here is the cost model at work: a stream's
speed depends on how many streams share the GPU *right now*, recomputed on
every tick, so a request that starts alone and is joined later slows down.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ihld.sim.profiles import ModelSpec
from ihld.sim.stats import SimStats

# The shortest real sleep between two emitted chunks: below it, tokens are
# batched into one NDJSON line so high speed factors do not drown in writes.
MIN_TICK_S = 0.004

RunnerOptions = tuple[tuple[str, Any], ...]


@dataclass(eq=False)
class Runner:
    """A model resident (or loading) on the simulated GPU."""

    spec: ModelSpec
    options: RunnerOptions
    keep_alive: float
    slots: int
    size_vram: int
    num_ctx: int
    refcount: int = 0
    active: int = 0
    evicting: bool = False
    dead: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    expires_at: float | None = None  # wall-clock time of the idle expiry
    _sem: asyncio.Semaphore | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def idle(self) -> bool:
        return self.refcount <= 0

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @contextlib.asynccontextmanager
    async def slot(self, stats: SimStats) -> AsyncIterator[None]:
        """Hold one of the model's parallel slots (waiting for it, uncapped)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        async with self._sem:
            self.active += 1
            stats.slot_taken(self.name)
            try:
                yield
            finally:
                self.active -= 1
                stats.slot_freed(self.name)

    def tokens_per_second(self, speed: float) -> float:
        """Real-time decode rate of one stream at the current concurrency."""
        k = max(1, self.active)
        return self.spec.gen_tps * self.spec.speedup(k) / k * speed

    async def pace(
        self,
        count: int,
        speed: float,
        emit: Callable[[int, int], Awaitable[None]],
        start: float | None = None,
    ) -> None:
        """Produce ``count`` tokens at the modelled rate, calling ``emit(start, end)``.

        Progress is measured, not assumed: time that passes (a late wake-up, a
        slow write, a busy event loop) counts as decoding, so the total stays
        on the model. ``start`` (monotonic) is when decoding should have begun:
        a late wake-up from the phase before is absorbed here too.
        """
        done = 0.0
        sent = 0
        last = time.monotonic() if start is None else min(start, time.monotonic())
        for _ in range(count + 1_000_000):  # bounded: every pass makes progress
            if sent >= count:
                return
            rate = self.tokens_per_second(speed)
            remaining = count - done
            if not math.isfinite(rate):
                await asyncio.sleep(0)
                done = float(count)
            elif remaining / rate <= MIN_TICK_S:
                await asyncio.sleep(max(0.0, last + remaining / rate - time.monotonic()))
                done = float(count)
            else:
                step = max(MIN_TICK_S, (math.floor(done) + 1 - done) / rate)
                await asyncio.sleep(max(0.0, last + step - time.monotonic()))
                now = time.monotonic()
                done = min(float(count), done + (now - last) * rate)
                last = now
            upto = min(count, math.floor(done + 1e-9))
            if upto > sent:
                await emit(sent, upto)
                sent = upto
