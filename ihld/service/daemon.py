"""The daemon: start-up, the long-lived tasks, reload and graceful stop.

Start-up, in order (each step undone on failure by the exit stack):
logs → config → spool (prepare, lock) → job store → plugins → HTTP session
and backends → recover (poison, finished batches) → control socket →
``READY=1``. Recovery reads only the jobs that were running, so ``READY``
comes as fast with a million jobs queued as with none. Then sibling tasks
run until the stop event: the dispatch loop, the feeder (store → engine),
intake (claims left by a crash, then watcher → claim → store), deadlines,
status/watchdog.

Graceful stop (SIGTERM, SIGINT, or ``--once`` when all is done):

1. ``STOPPING=1``; stop claiming new files.
2. Stop dispatching; let in-flight stages finish within ``[control] grace_s``
   (keep it below the unit's ``TimeoutStopSec``).
3. Cancel what is still running: those stages were not checkpointed, so a
   restart runs them again; everything finished is on disk.
4. Close the in-flight log, mark a clean shutdown, close the HTTP session,
   release the spool lock. Exit 0.

Reload (SIGHUP) is transactional: the new config and plugins are fully
loaded first; if either fails the old ones stay and the reason is logged
and put in ``STATUS=``. Spool and backend changes need a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from ihld.backends.ollama import make_session
from ihld.common.errors import ConfigError, PluginError
from ihld.core import events
from ihld.core.batches import BatchTracker
from ihld.core.config import Config, load_config
from ihld.core.engine import Engine
from ihld.core.feeder import Feeder
from ihld.core.inflight import InflightLog
from ihld.core.intake import Intake, IntakeResult
from ihld.core.progress import JobProgress
from ihld.core.scheduler import PolicyFactory
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.core.watcher import InboxWatcher
from ihld.observe import logs
from ihld.observe.control import start_control
from ihld.observe.metrics import Metrics
from ihld.observe.ps_cache import PsCache
from ihld.observe.status import status_document, summary_line
from ihld.observe.systemd import Notifier, watchdog_loop
from ihld.plugins.host import PluginHost
from ihld.plugins.loader import plugins_for
from ihld.service.claims import Claims
from ihld.service.wiring import adopt_checkpoints, make_backends, make_resolver, recover_crashed

log = structlog.get_logger("ihld")


@dataclass
class Daemon:
    config_path: str | None
    once: bool = False
    config: Config = field(init=False)
    host: PluginHost = field(init=False)
    spool: Spool = field(init=False)
    store: JobStore = field(init=False)
    feeder: Feeder = field(init=False)
    engine: Engine = field(init=False)
    intake: Intake = field(init=False)
    batches: BatchTracker = field(init=False)
    watcher: InboxWatcher = field(init=False)
    notifier: Notifier = field(default_factory=Notifier.from_env)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reload: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: Metrics = field(default_factory=Metrics)  # fed by the event log (issue 5)
    claims: Claims = field(init=False)
    _cancelled: int = 0

    # -- start-up -------------------------------------------------------------------

    async def run(self) -> int:
        logs.configure_logging("info", stderr=True)
        self.config = load_config(self.config_path)
        self.spool = Spool(self.config.spool.dir, node=self.config.spool.node)
        self.spool.prepare()
        self.spool.lock()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.spool.unlock)
            self.store = JobStore(self.spool.store_path, exclusive=self.spool.node is not None)
            stack.callback(self.store.close)
            self._configure_logs(self.config)
            stack.callback(logs.close_logging)
            self.host = plugins_for(self.config)
            session = make_session()
            stack.push_async_callback(session.close)
            backends = make_backends(self.config.backends, session)
            clean = self.spool.was_clean_shutdown()
            crashed = {} if clean else self.spool.read_inflight()
            inflight_log = InflightLog(self.spool.inflight_log)
            stack.callback(inflight_log.close)
            self.engine = Engine(
                config=self.config,
                spool=self.spool,
                store=self.store,
                backends=backends,
                actors=lambda: self.host.actors,
                inflight_log=inflight_log,
                policy=self._policy(),
                arrivals=self._arriving,
            )
            self.batches = BatchTracker(self.spool, self.host.formats)
            self.engine.events.subscribe(self._batch_event)
            self.engine.events.subscribe(self._plugin_event)
            self.engine.events.subscribe(self._ended_event)
            loop = asyncio.get_running_loop()
            self.intake = Intake(
                self.spool,
                self.store,
                make_resolver(self.host),
                max_bytes=self.config.limits.max_job_bytes,
                deadline_s=self.config.limits.job_deadline_s,
                formats=list(self.host.formats.values()),
                on_added=lambda: loop.call_soon_threadsafe(self.feeder.wake),
            )
            self.claims = Claims(
                self.spool, self.intake, admit=self._admit, rejected=self._log_rejected
            )
            self.spool.mark_running()
            recovered = await self._recover(crashed, clean)
            self.watcher = InboxWatcher(
                self.spool, settle_s=self.config.spool.settle_s, rescan_s=self.config.spool.rescan_s
            )
            # -- observability (issue 5): /status, /metrics, optional TCP listener --
            self.metrics.state = self.snapshot
            control = self.config.control
            if control.socket or control.listen:
                server = await start_control(
                    self.spool.run_dir / "ihld.sock" if control.socket else None,
                    self.snapshot,
                    self.watcher.poke,
                    metrics=self.metrics,
                    ps=PsCache(
                        self.engine.backends,
                        lambda: self.engine.down,
                        lambda: bool(self.engine.jobs),
                    ),
                    listen=control.listen,
                )
                stack.push_async_callback(server.cleanup)
            self._install_signals(stack)
            log.info(
                "daemon_ready",
                spool=str(self.spool.root),
                recovered=recovered,
                policy=self.config.scheduler.policy,
                config=str(self.config.source),
                backends=[b.url for b in self.config.backends],
                slots={b.name: b.slots for b in self.config.backends},  # for `ihld report`
            )
            self.notifier.ready(status=f"ready, {recovered} jobs recovered")
            await self._serve()
            cancelled = self._cancelled
            self.spool.mark_clean_shutdown()
            log.info(
                "daemon_stopped",
                cancelled_stages=cancelled,
                jobs_done=self.engine.counters.jobs_done,
                jobs_failed=self.engine.counters.jobs_failed,
            )
        return 0

    def _policy(self) -> PolicyFactory:
        name = self.config.scheduler.policy
        factory = self.host.policies.get(name)
        if factory is None:
            known = ", ".join(sorted(self.host.policies))
            raise ConfigError(
                f"{self.config.source}: key scheduler.policy: no policy {name!r} is registered "
                f"(known: {known})"
            )
        return factory

    def _configure_logs(self, config: Config) -> None:
        logs.configure_logging(
            config.log.level,
            log_file=self.spool.log_file if config.log.file else None,
            stderr=config.log.stderr,
            listeners=[self.metrics.observe],  # metrics derive from the events (issue 5)
        )

    def _install_signals(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)
        stack.callback(loop.remove_signal_handler, signal.SIGHUP)

    async def _plugin_event(self, event: events.Event) -> None:
        """The plugins' observer hooks (the host in force now: a reload swaps it)."""
        hook, kwargs = events.hook_call(event)
        await self.host.notify(hook, **kwargs)

    async def _ended_event(self, event: events.Event) -> None:
        """A job ended: its id is taken for good, and the engine has room for another."""
        job_id = events.ended_job_id(event)
        if job_id is not None:
            self.intake.ended(job_id)
            self.feeder.wake()

    async def _batch_event(self, event: events.Event) -> None:
        job_id = events.ended_job_id(event)
        name = None if job_id is None else self.batches.job_ended(job_id)
        if name is not None:
            await self._assemble_batch(name)

    async def _assemble_batch(self, name: str) -> None:
        """Publish a batch's output files (its intake format's) once all its lines ended."""
        try:
            files = await asyncio.to_thread(self.batches.assemble, name)
        except (OSError, LookupError) as exc:
            log.error("batch_output_failed", batch=name, error=str(exc))
            return
        log.info("batch_finished", batch=name, files=[str(f) for f in files if f is not None])

    def snapshot(self) -> dict[str, Any]:
        paused = self.claims.paused()
        return self._document(self.spool.counts(store=False), intake_paused=paused)

    def _document(self, counts: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
        """The status document, with the jobs waiting in the store (not in the engine)."""
        doc = status_document(self.engine.snapshot(), counts, **extra)
        if counts is not None:
            doc["spool"]["in_progress"] = doc["jobs"]["waiting"] + doc["jobs"]["in_progress"]
        return doc

    def _arriving(self) -> bool:
        """Jobs on their way into the engine (the scheduler's ``hold_dry``): inbox files
        settling or being read, or jobs the feeder is about to take from the store."""
        return self.watcher.settling() or not self.claims.idle.is_set() or self.feeder.arriving()

    # -- recovery ----------------------------------------------------------------------

    async def _recover(self, crashed: dict[str, int], clean: bool) -> int:
        """Make the store current: poison, jobs that ended just before a crash, old spools.

        Reads only what was running, never the queue: its cost does not grow with it.
        """
        self.notifier.extend_timeout(90)  # a large spool takes a while; keep systemd patient
        for tmp in self.spool.iter_tmp_files():
            tmp.unlink(missing_ok=True)
        adopted = await asyncio.to_thread(adopt_checkpoints, self.spool, self.store)
        limit = self.config.spool.max_recoveries
        await asyncio.to_thread(recover_crashed, self.spool, self.store, crashed, limit)
        self.feeder = Feeder(
            self.store,
            in_memory=lambda: len(self.engine.jobs),
            limit=lambda: self.config.limits.max_jobs_in_memory,
            admit=self.engine.add_job,
        )
        for name in self.batches.load_all():
            await self._assemble_batch(name)
        stored = await asyncio.to_thread(self.store.count)
        if stored or adopted:
            log.info(
                "spool_recovered",
                jobs=stored,
                adopted_checkpoints=adopted or None,
                clean_shutdown=clean,
                crashed_jobs=len(crashed),
            )
        return stored

    # -- the running daemon ---------------------------------------------------------------

    async def _serve(self) -> None:
        async with asyncio.TaskGroup() as group:
            dispatcher = group.create_task(self.engine.run(), name="dispatch")
            claimer = group.create_task(self.claims.run(self.watcher), name="intake")
            others = [
                group.create_task(self.feeder.run(), name="feeder"),
                group.create_task(self._deadline_loop(), name="deadlines"),
                group.create_task(self._status_loop(), name="status"),
                group.create_task(self._reload_loop(), name="reload"),
                group.create_task(watchdog_loop(self.notifier, self.stop), name="watchdog"),
            ]
            if self.once:
                others.append(group.create_task(self._once_loop(), name="once"))
            await self.stop.wait()
            self.notifier.stopping(status="stopping: finishing in-flight stages")
            log.info("daemon_stopping")
            claimer.cancel()
            for task in others:
                task.cancel()
            self._cancelled = await self.engine.stop_dispatching(self.config.control.grace_s)
            await dispatcher

    def _admit(self, result: IntakeResult | None) -> None:
        if result is None:
            return
        if result.batch_manifest is not None:
            complete = self.batches.register(result.batch_manifest)
            if complete is not None:
                self.engine.events.spawn(self._assemble_batch(complete))
        if result.accepted:
            log.info("file_accepted", file=result.file, jobs=len(result.accepted))
        for record in result.rejected:
            self._log_rejected(record)

    def _log_rejected(self, record: dict[str, Any]) -> None:
        error = record["error"]
        log.warning(
            "job_rejected",
            job_id=record["id"],
            kind=error["kind"],
            error=error["message"],
            file=record.get("source", {}).get("file"),
        )
        self.engine.job_rejected(record)

    async def _deadline_loop(self) -> None:
        """Fail jobs past their deadline: in memory, and waiting in the store."""
        while True:
            await asyncio.sleep(1.0)
            try:
                expired = await asyncio.to_thread(self.store.expired, time.time(), 1000)
            except OSError as exc:  # a failing disk: try again at the next tick
                log.error("deadline_scan_failed", error=str(exc))
                expired = []
            for stored in expired:
                self.engine.add_job(JobProgress.from_stored(stored), ready=False)
            await self.engine.expire_deadlines()

    async def _status_loop(self) -> None:
        while True:  # the summary needs no spool counts: no directory listing every 2 s
            self.notifier.status(summary_line(self._document()))
            await asyncio.sleep(2.0)

    async def _once_loop(self) -> None:
        """``--once``: stop when the engine is idle and the inbox and the claims are empty.

        Woken by events, not a timer: the engine going idle, intake finishing a
        file, the watcher finishing a scan.
        """
        while True:
            await self.engine.wait_idle()
            await self.claims.idle.wait()
            self.watcher.scanned.clear()
            inbox = await asyncio.to_thread(self.spool.scan_inbox)
            pending = any(e.kind == "file" and e.name.endswith((".json", ".jsonl")) for e in inbox)
            if pending or self.spool.claimed_files():
                await self.watcher.scanned.wait()  # intake will take them: look again after
                continue
            if not self.feeder.drained():
                await self.feeder.idle.wait()  # the rest of the queue goes into the engine
                continue
            if self.engine.jobs or not self.claims.idle.is_set():
                continue  # something arrived meanwhile
            self.stop.set()
            return

    async def _reload_loop(self) -> None:
        while True:
            await self.reload.wait()
            self.reload.clear()
            self._reload()

    def _reload(self) -> None:
        """Swap config and plugins, or keep the old ones and say why. Always ends READY=1."""
        self.notifier.reloading()
        log.info("reload_started")
        try:
            config = load_config(self.config_path)
            host = plugins_for(config)
        except (ConfigError, PluginError) as exc:
            log.error("reload_failed", error=str(exc))
            self.notifier.ready(status=f"reload failed, old config kept: {exc}".splitlines()[0])
            return
        restart_needed = self.engine.apply_settings(config)
        self.config = self.engine.config  # what is in force: restart-only keys keep old values
        self.host = host
        self.intake.resolver = make_resolver(host)
        self.intake.formats = list(host.formats.values())
        self.batches.formats = host.formats
        self.intake.max_bytes = config.limits.max_job_bytes
        self.intake.deadline_s = config.limits.job_deadline_s
        self.feeder.wake()  # max_jobs_in_memory may have grown
        self._configure_logs(config)
        log.info(
            "config_reloaded",
            config=str(config.source),
            plugins=[p["name"] for p in host.describe()],
            restart_needed=restart_needed or None,
        )
        if restart_needed:
            log.warning("reload_partial", kept_until_restart=restart_needed)
        self.notifier.ready(status=summary_line(self.snapshot()))


async def run_daemon(config_path: str | None, *, once: bool = False) -> int:
    return await Daemon(config_path, once=once).run()
