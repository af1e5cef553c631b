"""The ``ihld`` command line: run, submit, status, validate, plugins, sim, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ihld import __version__
from ihld.errors import IhldError


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="config file (default: $IHLD_CONFIG, else etc/ihld.toml)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ihld.daemon import run_daemon

    return asyncio.run(run_daemon(args.config, once=args.once))


def cmd_submit(args: argparse.Namespace) -> int:
    from ihld.config import load_config
    from ihld.spool import Spool
    from ihld.submit import SubmitError, control_request, submit_file

    spool = Spool(Path(args.spool) if args.spool else load_config(args.config).spool.dir)
    status = 0
    for name in args.files:
        try:
            target = submit_file(Path(name), spool.inbox)
        except (SubmitError, OSError) as exc:
            print(f"ihld submit: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"submitted {name} -> {target}")
    asyncio.run(control_request(spool.run_dir / "ihld.sock", "POST", "/poke"))
    return status


def cmd_status(args: argparse.Namespace) -> int:
    from ihld.config import load_config
    from ihld.spool import Spool
    from ihld.submit import control_request

    spool = Spool(Path(args.spool) if args.spool else load_config(args.config).spool.dir)
    snap = asyncio.run(control_request(spool.run_dir / "ihld.sock", "GET", "/status"))
    if snap is None:
        counts = spool.counts()
        if args.json:
            print(json.dumps({"daemon": "not running", "spool": counts}))
        else:
            print(
                f"ihld daemon is not running (no answer on {spool.run_dir / 'ihld.sock'}); "
                "counts from the spool directories:"
            )
            for key, value in counts.items():
                print(f"  {key:12} {value}")
        return 3
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    print(render_status(snap))
    return 0


def render_status(snap: dict[str, Any]) -> str:
    from ihld.status import summary_line

    lines = [f"ihld: {summary_line(snap)}  (policy {snap['policy']}, loads {snap['loads']})"]
    lines.append(f"  {'model':32} {'ready':>7} {'in flight':>9} {'done':>7} {'stage s':>8}")
    for model, row in sorted(snap["models"].items()):
        stage_s = f"{row['stage_s']:.2f}" if "stage_s" in row else "-"
        lines.append(
            f"  {model:32} {row['ready']:7} {row['in_flight']:9} {row['done']:7} {stage_s:>8}"
        )
    for name, backend in snap["backends"].items():
        state = "up" if backend["up"] else f"DOWN ({backend['down_reason']})"
        resident = ", ".join(f"{m} ({s})" for m, s in backend["resident"].items()) or "none"
        lines.append(f"  backend {name}: {state}; resident: {resident}")
    spool = snap.get("spool", {})
    if spool:
        lines.append("  spool: " + ", ".join(f"{k} {v}" for k, v in spool.items()))
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    from ihld.validate import validate_paths

    return validate_paths([Path(f) for f in args.files], args.config)


def cmd_plugins(args: argparse.Namespace) -> int:
    from ihld.config import load_config
    from ihld.daemon import plugins_for

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
    from ihld.demo import run_demo

    return asyncio.run(run_demo(jobs=args.jobs, speed=args.speed))


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
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="queues, models, throughput and ETA")
    _config_arg(status)
    status.add_argument("--spool", help="spool directory (instead of the config's)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

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
