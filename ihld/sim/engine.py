"""The scheduler of the simulated Ollama: which model is resident, who waits, who loads.

It follows Ollama's server/sched.go:

- a request for a resident model with the same runner options attaches at
  once (no queue); the model's slots then limit how many *run*;
- any other request enters one FIFO of pending loads, handled one at a time
  and capped at ``max_queue`` (beyond it: 503);
- if the model does not fit (``max_loaded``, VRAM) one resident model is
  evicted: the first idle one by shortest keep_alive, else the shortest
  anyway, and the queue **blocks until that model's in-flight requests
  finish** and it is unloaded;
- a load belongs to the request that caused it: if that client goes away,
  the load is abandoned;
- after a model's last request ends it stays for its keep_alive, then unloads.

Durations of the simulated world (load time, keep_alive) are divided by the
speed factor; everything else is real asyncio time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ihld.sim.profiles import ModelSpec, Profile
from ihld.sim.runner import Runner, RunnerOptions
from ihld.sim.stats import SimStats

ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"

# Go's time.Now().Add(math.MaxInt64): how far away "forever" is in /api/ps.
FOREVER_S = (2**63 - 1) / 1e9


# Architectures Ollama runs one request at a time whatever OLLAMA_NUM_PARALLEL says
# (server/sched.go, where numParallel is forced to 1), and embedding models.
PARALLEL_ONE = frozenset(
    {
        "mllama",
        "qwen3vl",
        "qwen3vlmoe",
        "qwen3next",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "bert",
        "nomic-bert",
    }
)


def parallel_for(spec: ModelSpec, slots: int) -> int:
    """Requests the runner serves at once: the server's slots, or 1 for those families."""
    return 1 if spec.family in PARALLEL_ONE else slots


class QueueFull(Exception):
    """The pending-load queue is full (Ollama's ErrMaxQueue, a 503)."""

    def __init__(self) -> None:
        super().__init__(ERR_MAX_QUEUE)


@dataclass(eq=False)
class PendingLoad:
    """A request waiting for its model to be loaded (or reloaded)."""

    spec: ModelSpec
    options: RunnerOptions
    num_ctx: int
    keep_alive: float | None
    future: asyncio.Future[Runner]


class Engine:
    """Resident models, the pending-load queue and keep-alive timers."""

    def __init__(self, profile: Profile, speed: float, stats: SimStats) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.profile = profile
        self.speed = speed
        self.stats = stats
        self.runners: dict[str, Runner] = {}
        self.pending: deque[PendingLoad] = deque()
        self.closing = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the pending-load loop (needs the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._process_pending())

    async def stop(self) -> None:
        """Stop the loop, drop timers, fail whoever still waits for a load."""
        self.closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for runner in list(self.runners.values()):
            runner.cancel_timer()
        while self.pending:
            p = self.pending.popleft()
            if not p.future.done():
                p.future.cancel()

    # --- what handlers call ------------------------------------------------------

    async def acquire(
        self,
        spec: ModelSpec,
        options: RunnerOptions,
        num_ctx: int,
        keep_alive: float | None,
    ) -> Runner:
        """A ready runner for ``spec`` with ``options``, attached to the caller.

        The caller must ``release`` it. Raises QueueFull when a load is needed
        and the pending queue is full.
        """
        for _ in range(16):  # a retry only follows an abandoned load
            runner = self.runners.get(spec.name)
            if runner is None or runner.dead or runner.options != options:
                return await self._enqueue(spec, options, num_ctx, keep_alive)
            self._attach(runner, keep_alive)
            if not runner.ready.is_set():
                try:
                    await runner.ready.wait()
                except asyncio.CancelledError:
                    self.release(runner)
                    raise
            if not runner.dead:
                return runner
            runner.refcount -= 1
        raise RuntimeError(f"model {spec.name!r} failed to load repeatedly")

    def release(self, runner: Runner) -> None:
        """The caller's request is over; start the idle clock if it was the last."""
        runner.refcount -= 1
        if runner.refcount > 0 or runner.dead:
            return
        if runner.evicting or runner.keep_alive <= 0:
            self._unload(runner)
            return
        runner.cancel_timer()
        if math.isinf(runner.keep_alive):
            runner.expires_at = None
            return
        delay = runner.keep_alive / self.speed
        runner.timer = asyncio.get_running_loop().call_later(delay, self._expire, runner)
        runner.expires_at = time.time() + delay

    def expire(self, model: str) -> None:
        """keep_alive 0 without content: unload now, or when in-flight requests end."""
        runner = self.runners.get(model)
        if runner is None or runner.dead:
            return
        runner.keep_alive = 0.0
        runner.cancel_timer()
        runner.expires_at = time.time()
        if runner.idle:
            self._unload(runner)

    def ps(self) -> list[tuple[Runner, float]]:
        """Resident (or loading) runners with their expiry as wall-clock time."""
        now = time.time()
        out: list[tuple[Runner, float]] = []
        for runner in self.runners.values():
            if runner.dead:
                continue
            if runner.expires_at is not None:
                expiry = runner.expires_at
            elif math.isinf(runner.keep_alive):
                expiry = now + FOREVER_S
            else:
                expiry = now + runner.keep_alive / self.speed
            out.append((runner, expiry))
        return out

    def describe(self) -> dict[str, Any]:
        """Scheduler state for /sim/stats: resident models and queue length."""
        return {
            "resident": {
                r.name: {"in_flight": r.refcount, "running": r.active, "evicting": r.evicting}
                for r in self.runners.values()
                if not r.dead
            },
            "pending_loads": len(self.pending),
        }

    # --- internals ---------------------------------------------------------------

    def _attach(self, runner: Runner, keep_alive: float | None) -> None:
        runner.refcount += 1
        runner.cancel_timer()
        runner.expires_at = None
        if keep_alive is not None:
            runner.keep_alive = keep_alive

    async def _enqueue(
        self,
        spec: ModelSpec,
        options: RunnerOptions,
        num_ctx: int,
        keep_alive: float | None,
    ) -> Runner:
        if len(self.pending) >= self.profile.max_queue:
            raise QueueFull()
        future: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        self.pending.append(PendingLoad(spec, options, num_ctx, keep_alive, future))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled after the load finished but before we resumed: give it back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            raise

    async def _process_pending(self) -> None:
        """Ollama's processPending: one pending load at a time, in arrival order."""
        while not self.closing.is_set():
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            p = self.pending.popleft()
            if p.future.done():
                continue  # the client went away while queued
            try:
                await self._schedule(p)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not kill the queue
                if not p.future.done():
                    p.future.set_exception(exc)

    async def _schedule(self, p: PendingLoad) -> None:
        for _ in range(2 * len(self.runners) + 8):  # each pass unloads one or finishes
            if p.future.done():
                return
            current = self.runners.get(p.spec.name)
            if current is not None and not current.dead:
                if current.options == p.options and current.ready.is_set():
                    self._attach(current, p.keep_alive)
                    p.future.set_result(current)
                    return
                victim = current  # runner options changed: reload
            elif len(self.runners) >= self.profile.max_loaded or not self._fits(p.spec):
                victim = self._pick_victim()
            else:
                await self._load(p)
                return
            victim.evicting = True
            victim.cancel_timer()
            if victim.idle:
                self._unload(victim)
            # Blocks every other pending load too, as Ollama does.
            await victim.unloaded.wait()
        if not p.future.done():
            p.future.set_exception(RuntimeError(f"no room for model {p.spec.name!r}"))

    def _fits(self, spec: ModelSpec) -> bool:
        vram = self.profile.vram_bytes
        if vram <= 0 or not self.runners:
            return True
        used = sum(r.size_vram for r in self.runners.values())
        return used + spec.size_bytes <= vram

    def _pick_victim(self) -> Runner:
        """Ollama's findRunnerToUnload: first idle by (keep_alive, path), else the first.

        Ollama breaks ties by the model's blob path (sha256-<digest>); the
        digest stands in for it here.
        """
        ranked = sorted(self.runners.values(), key=lambda r: (r.keep_alive, r.spec.digest))
        for runner in ranked:
            if runner.idle:
                return runner
        return ranked[0]

    async def _load(self, p: PendingLoad) -> None:
        spec = p.spec
        vram = self.profile.vram_bytes
        keep = p.keep_alive if p.keep_alive is not None else self.profile.default_keep_alive
        runner = Runner(
            spec=spec,
            options=p.options,
            keep_alive=keep,
            slots=parallel_for(spec, self.profile.slots),
            size_vram=spec.size_bytes if vram <= 0 else min(spec.size_bytes, vram),
            num_ctx=p.num_ctx,
            refcount=1,
        )
        self.runners[spec.name] = runner
        self.stats.note_resident(len(self.runners))
        began = time.monotonic()
        seconds = spec.load_s / self.speed
        if seconds > 0:
            # Wait out the load, unless the requesting client disconnects first.
            await asyncio.wait({p.future}, timeout=seconds)
        else:
            await asyncio.sleep(0)
        if p.future.done():
            runner.refcount -= 1
            runner.dead = True
            self.runners.pop(spec.name, None)
            runner.ready.set()
            runner.unloaded.set()
            self.stats.note_aborted_load(spec.name)
            return
        self.stats.note_load(spec.name, time.monotonic() - began)
        runner.ready.set()
        p.future.set_result(runner)

    def _expire(self, runner: Runner) -> None:
        runner.timer = None
        if runner.idle and not runner.dead:
            self._unload(runner)

    def _unload(self, runner: Runner) -> None:
        runner.cancel_timer()
        runner.dead = True
        if self.runners.get(runner.name) is runner:
            del self.runners[runner.name]
        runner.ready.set()
        runner.unloaded.set()
        self.stats.note_unload(runner.name)
