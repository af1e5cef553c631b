"""The ``ihld`` command line: run, submit, status, report, validate, plugins, sim, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ihld import __version__
from ihld.common.errors import IhldError


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="config file (default: $IHLD_CONFIG, else etc/ihld.toml)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ihld.service.daemon import run_daemon

    return asyncio.run(run_daemon(args.config, once=args.once))


def _spool_and_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The spool (``--spool`` wins) and the config (None when ``--spool`` is given)."""
    from ihld.core.config import load_config
    from ihld.core.spool import Spool

    if args.spool:
        return Spool(Path(args.spool)), None
    config = load_config(args.config)
    return Spool(config.spool.dir, node=config.spool.node), config


def cmd_submit(args: argparse.Namespace) -> int:
    from ihld.client.submit import SubmitError, control_request, expected_ids, follow, submit_file

    spool, config = _spool_and_config(args)
    max_bytes = config.limits.max_job_bytes if config is not None else 16 * 1024 * 1024
    status = 0
    waiter = None
    ids_of: dict[str, list[str]] = {}
    if args.wait:
        from ihld.client.submit import JobWaiter

        # Before submitting: a fast daemon may finish a job before we look.
        for name in args.files:
            try:
                ids_of[name] = expected_ids(Path(name).read_bytes(), Path(name).name, max_bytes)
            except OSError:
                ids_of[name] = []  # submit_file reports it
        waiter = JobWaiter(spool.outbox, spool.failed, [i for v in ids_of.values() for i in v])
    for name in args.files:
        try:
            target = submit_file(Path(name), spool.inbox)
        except (SubmitError, OSError) as exc:
            print(f"ihld submit: {exc}", file=sys.stderr)
            status = 1
            if waiter is not None:
                waiter.forget(ids_of.get(name, []))
            continue
        if not args.quiet:
            print(f"submitted {name} -> {target}")
    socket = spool.run_dir / "ihld.sock"
    answered = asyncio.run(control_request(socket, "POST", "/poke"))
    if waiter is None:
        return status
    if answered is None:
        print(
            f"ihld submit: no daemon answers on {socket}; waiting anyway "
            "(the jobs run once `ihld run` starts)",
            file=sys.stderr,
        )
    return max(status, follow(waiter, args.timeout))


def cmd_status(args: argparse.Namespace) -> int:
    from ihld.client.submit import control_request
    from ihld.core.spool import Spool
    from ihld.observe.status_view import fallback_view, render_text, status_view

    spool: Spool = _spool_and_config(args)[0]
    socket = spool.run_dir / "ihld.sock"

    async def fetch() -> dict[str, Any] | None:
        return await control_request(socket, "GET", "/status")

    def view(snap: dict[str, Any] | None) -> Any:
        if snap is None:
            return fallback_view(str(socket), spool.counts())
        return status_view(snap)

    def as_json(snap: dict[str, Any] | None, indent: int | None) -> str:
        if snap is None:
            return json.dumps({"daemon": "not running", "spool": spool.counts()}, indent=indent)
        return json.dumps(snap, indent=indent)

    if not args.watch:
        snap = asyncio.run(fetch())
        if args.json:
            print(as_json(snap, 2))
        else:
            print(render_text(view(snap), width=_width()))
        return 3 if snap is None else 0
    return asyncio.run(_watch_status(fetch, view, as_json, args))


def _width() -> int:
    import shutil

    return max(80, min(shutil.get_terminal_size((110, 24)).columns, 160))


async def _watch_status(fetch: Any, view: Any, as_json: Any, args: argparse.Namespace) -> int:
    """``--watch``: rich Live in place on a terminal; ANSI home+clear frames otherwise."""
    from ihld.observe.status_view import render_text

    frames = 0
    snap = None
    try:
        if args.json:  # JSON Lines, one snapshot per interval
            while args.count is None or frames < args.count:
                snap = await fetch()
                print(as_json(snap, None), flush=True)
                frames += 1
                if args.count is None or frames < args.count:
                    await asyncio.sleep(args.interval)
        elif sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            console = Console()
            snap = await fetch()
            frames = 1
            with Live(view(snap), console=console, auto_refresh=False) as live:
                while args.count is None or frames < args.count:
                    await asyncio.sleep(args.interval)
                    snap = await fetch()
                    live.update(view(snap), refresh=True)
                    frames += 1
        else:
            while args.count is None or frames < args.count:
                snap = await fetch()
                text = render_text(view(snap), width=_width())
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                sys.stdout.flush()
                frames += 1
                if args.count is None or frames < args.count:
                    await asyncio.sleep(args.interval)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    return 3 if snap is None else 0


def cmd_report(args: argparse.Namespace) -> int:
    from ihld.observe.report import parse_when, summary, write_report

    log = Path(args.log) if args.log else _spool_and_config(args)[0].log_file
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        print(f"ihld report: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output)
    try:
        run = write_report(log, output, since=since, until=until)
    except FileNotFoundError:
        print(f"ihld report: no event log at {log} (use --log FILE)", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    for text in summary(run):
        print(text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ihld.client.validate import validate_paths

    return validate_paths([Path(f) for f in args.files], args.config)


def cmd_plugins(args: argparse.Namespace) -> int:
    from ihld.core.config import load_config
    from ihld.plugins.loader import plugins_for

    host = plugins_for(load_config(args.config))
    described = host.describe()
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return 0
    for plugin in described:
        print(f"{plugin['name']}  ({plugin.get('source', '')})")
        print(f"  hooks:     {', '.join(plugin.get('hooks', [])) or '-'}")
        print(f"  actors:    {', '.join(plugin.get('actors', [])) or '-'}")
        print(f"  pipelines: {', '.join(plugin.get('pipelines', [])) or '-'}")
        print(f"  policies:  {', '.join(plugin.get('policies', [])) or '-'}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from ihld.sim import Faults, run_sim

    faults = Faults(error_rate=args.error_rate)
    run_sim(
        args.host,
        args.port,
        args.profile,
        args.speed,
        faults,
        args.seed,
        args.slots,
        args.max_loaded,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ihld.bench.demo import run_demo

    return asyncio.run(run_demo(jobs=args.jobs, speed=args.speed))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ihld.bench.calibrate import calibrate
    from ihld.sim.profiles import profile_to_json

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    profile = asyncio.run(calibrate(args.url, models, rounds=args.rounds, tokens=args.tokens))
    text = json.dumps(profile_to_json(profile), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}: " + ", ".join(
            f"{m.name} load {m.load_s} s, prompt {m.prompt_tps}/s, decode {m.gen_tps}/s "
            f"x{list(m.throughput)}" for m in profile.models))  # fmt: skip
    else:
        print(text)
    return 0


def cmd_bench_real(args: argparse.Namespace) -> int:
    from ihld.bench.real import run_cli

    return run_cli(args)


MULTI = ("multi-1", "multi-2", "multi-4")  # the seed workload on 1, 2, 4 simulated GPUs
SCALE = ("scale", "scale-10k", "scale-100k", "scale-1m")  # queue sizes: memory, disk, restart


def cmd_bench(args: argparse.Namespace) -> int:
    if args.backend:
        return cmd_bench_real(args)
    from ihld.bench import POLICIES, BenchOptions, run_bench
    from ihld.bench.workloads import BUILDERS
    from ihld.observe.logs import configure_logging

    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    if workloads and all(w in SCALE for w in workloads):
        from ihld.bench.scale import bench_scale

        return bench_scale(workloads, jobs=args.jobs, as_json=args.json, keep=args.keep)
    if workloads and all(w in MULTI for w in workloads):
        from ihld.bench.multi import bench_multi

        return bench_multi(workloads, jobs=args.jobs or 400, speed=args.speed, as_json=args.json)
    policies = [p.strip() for p in (args.policy or "fifo,affinity").split(",") if p.strip()]
    for name in workloads:
        if name not in BUILDERS:
            known = ", ".join([*BUILDERS, *MULTI, *SCALE])
            print(f"ihld bench: unknown workload {name!r}; known: {known}",
                  file=sys.stderr)  # fmt: skip
            return 2
    for policy in policies:
        if policy not in POLICIES:
            print(f"ihld bench: unknown policy {policy!r}; known: {', '.join(POLICIES)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    if args.jobs is not None and args.jobs < 1:
        print("ihld bench: --jobs must be >= 1", file=sys.stderr)
        return 2
    if not args.speed > 0:
        print("ihld bench: --speed must be > 0", file=sys.stderr)
        return 2
    configure_logging("warning", stderr=True)  # plugin loading for the cost model stays quiet
    opts = BenchOptions(
        speed=args.speed,
        seed=args.seed,
        timeout_s=args.timeout,
        keep=args.keep,
        workdir=Path(args.workdir) if args.workdir else None,
        cprofile=args.cprofile,
    )
    return run_bench(workloads, policies, opts, jobs=args.jobs, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ihld", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ihld {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    _config_arg(run)
    run.add_argument(
        "--once", action="store_true", help="process everything in the inbox, wait for it, exit 0"
    )
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="copy job files into the inbox atomically")
    _config_arg(submit)
    submit.add_argument("--spool", help="spool directory (instead of the config's)")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the submitted jobs finish; exit 1 if any failed",
    )
    submit.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait: give up after this long (exit 124)",
    )
    submit.add_argument("--quiet", "-q", action="store_true", help="no line per submitted file")
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="queues, models, throughput and ETA")
    _config_arg(status)
    status.add_argument("--spool", help="spool directory (instead of the config's)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", "-w", action="store_true", help="refresh in place until ^C")
    status.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="--watch refresh period"
    )
    status.add_argument("--count", type=int, metavar="N", help="--watch: stop after N refreshes")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="an HTML timeline and summary of a run's event log")
    _config_arg(report)
    report.add_argument("--spool", help="spool directory (instead of the config's)")
    report.add_argument("--log", metavar="FILE", help="event log (default: <spool>/log/ihld.jsonl)")
    report.add_argument(
        "--since", metavar="TIME", help="window start: ISO 8601 (UTC), epoch seconds, or 30m/2h ago"
    )
    report.add_argument("--until", metavar="TIME", help="window end (same forms)")
    report.add_argument(
        "--output", "-o", default="ihld-report.html", metavar="FILE", help="the HTML file to write"
    )
    report.set_defaults(func=cmd_report)

    validate = sub.add_parser("validate", help="check job files without submitting them")
    _config_arg(validate)
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list plugins, actors, pipelines and hooks")
    _config_arg(plugins)
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    sim = sub.add_parser("sim", help="run the built-in Ollama simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=11434)
    sim.add_argument("--profile", default="laptop-6gb")
    sim.add_argument("--speed", type=float, default=1.0, help="divide all simulated times")
    sim.add_argument("--error-rate", type=float, default=0.0, help="fraction of failed requests")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--slots", type=int, help="override OLLAMA_NUM_PARALLEL of the profile")
    sim.add_argument("--max-loaded", type=int, help="override max loaded models")
    sim.set_defaults(func=cmd_sim)

    demo = sub.add_parser("demo", help="the whole thing on the simulator, no GPU needed")
    demo.add_argument("--jobs", type=int, default=40)
    demo.add_argument("--speed", type=float, default=100.0)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench", help="workloads on the simulator: each policy against a lower bound"
    )
    bench.add_argument(
        "--workload",
        default="seed",
        help="comma-separated: seed, seed-4slot, three-models, stream, urgent, overhead, "
        "rubrics, files; multi-1, multi-2, multi-4 (several backends); scale, scale-10k, "
        "scale-100k, scale-1m (queue size: memory, disk, restart) (default: seed)",
    )
    bench.add_argument(
        "--policy",
        help="comma-separated policies (default: fifo,affinity; with --backend: "
        "fifo,affinity,hand-batched)",
    )
    bench.add_argument(
        "--speed", type=float, default=200.0, help="simulator speed factor (default 200)"
    )
    bench.add_argument("--jobs", type=int, help="scale each workload down to N jobs")
    bench.add_argument("--seed", type=int, default=0, help="stream arrivals and priorities")
    bench.add_argument("--json", action="store_true", help="a JSON list, one object per run")
    bench.add_argument("--timeout", type=float, default=3600.0, help="real seconds allowed per run")
    bench.add_argument("--keep", action="store_true", help="keep each run's spool and logs")
    bench.add_argument("--workdir", help="where run directories go (default: temp dir)")
    bench.add_argument(
        "--cprofile", action="store_true", help="run the daemon under cProfile (kept run dir)"
    )
    bench.add_argument(
        "--backend",
        metavar="URL",
        help="a real server instead of the simulator: workload aba with fifo, affinity and a "
        "hand-batched reference, side by side (ihld.bench.real)",
    )
    bench.add_argument("--kind", default="llamacpp", help="--backend: its kind (llamacpp)")
    bench.add_argument(
        "--models",
        default="gemma3:270m,gemma3-b:270m",
        help="--backend: the two models A,B of workload aba",
    )
    bench.add_argument("--tokens", type=int, default=32, help="--backend: output tokens a stage")
    bench.add_argument("--slots", type=int, default=4, help="--backend: the server's slots")
    bench.set_defaults(func=cmd_bench)

    calibrate = sub.add_parser(
        "calibrate", help="measure a llama.cpp router; write a simulator profile (JSON)"
    )
    calibrate.add_argument("url", help="the router, e.g. http://127.0.0.1:8080")
    calibrate.add_argument("--models", required=True, help="comma-separated model names")
    calibrate.add_argument("--rounds", type=int, default=3, help="repeats of each measurement")
    calibrate.add_argument("--tokens", type=int, default=32, help="output tokens a request")
    calibrate.add_argument("--out", help="write the profile here (default: stdout)")
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except IhldError as exc:
        print(f"ihld {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result
