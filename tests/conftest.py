"""Shared fixtures: the simulator and the daemon as real subprocesses, on temp spools."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
IHLD = [sys.executable, "-m", "ihld"]


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    url: str
    speed: float

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/sim/stats")
        return result

    def loads(self) -> int:
        return sum(self.stats()["loads"].values())


def start_sim_process(profile: str = "laptop-6gb", speed: float = 200.0, *args: str,
                      port: int = 0) -> SimProcess:
    proc = subprocess.Popen(
        [*IHLD, "sim", "--port", str(port), "--profile", profile, "--speed", str(speed), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"simulator did not start: {line!r}")
    return SimProcess(proc, match.group(1), speed)


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def make(profile: str = "laptop-6gb", speed: float = 200.0, *args: str,
             port: int = 0) -> SimProcess:
        sim = start_sim_process(profile, speed, *args, port=port)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.proc.terminate()
        try:
            sim.proc.wait(5)
        except subprocess.TimeoutExpired:
            sim.proc.kill()


@dataclass
class DaemonRig:
    """A spool, its config, and the daemon processes run on it."""

    root: Path
    config: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def inbox(self) -> Path:
        return self.root / "spool" / "inbox"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"daemon-{len(self.procs)}.stderr", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*IHLD, "run", "--config", str(self.config), *args],
            stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Ready = the control socket answers (the daemon finished recovery)."""
        deadline = time.monotonic() + timeout
        sock = self.spool / "run" / "ihld.sock"
        while time.monotonic() < deadline:
            if sock.exists() and self.status() is not None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready; stderr: {self.stderr()[-2000:]}")

    def status(self) -> dict[str, Any] | None:
        import asyncio

        from ihld.client.submit import control_request

        return asyncio.run(control_request(self.spool / "run" / "ihld.sock", "GET", "/status"))

    def stderr(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.root.glob("daemon-*.stderr"))
        )

    def results(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text())
                for p in (self.spool / "outbox").glob("*.json")}

    def failures(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text())
                for p in (self.spool / "failed").glob("*.json")}

    def wait_finished(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = len(list((self.spool / "outbox").glob("*.json")))
            failed = len(list((self.spool / "failed").glob("*.json")))
            if done + failed >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"only {done}+{failed} of {count} finished; {self.stderr()[-3000:]}")

    def events(self) -> list[dict[str, Any]]:
        path = self.spool / "log" / "ihld.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def write_config(path: Path, spool: Path, url: str, *, policy: str = "affinity",
                 slots: int = 1, max_loaded: int = 1, extra: str = "",
                 backend_extra: str = "") -> None:
    path.write_text(
        f'[spool]\ndir = "{spool}"\nsettle_s = 0.2\nrescan_s = 0.3\n\n'
        f'[[backends]]\nname = "sim"\nurl = "{url}"\nslots = {slots}\n'
        f"max_loaded = {max_loaded}\nconnect_timeout_s = 2\nread_timeout_s = 10\n"
        f"{backend_extra}\n"
        f'[scheduler]\npolicy = "{policy}"\n\n'
        f"[limits]\nretry_backoff_s = 0.05\nstage_timeout_s = 30\n\n"
        f'[log]\nstderr = true\nlevel = "info"\n\n[control]\ngrace_s = 5\n\n{extra}'
    )


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonRig]]:
    rigs: list[DaemonRig] = []

    def make(url: str, name: str = "rig", **options: Any) -> DaemonRig:
        root = tmp_path / name
        root.mkdir()
        config = root / "ihld.toml"
        write_config(config, root / "spool", url, **options)
        rig = DaemonRig(root, config)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop_all()


def debate_lines(count: int, prefix: str = "d") -> str:
    return "".join(
        json.dumps({"id": f"{prefix}{n:04d}", "pipeline": "debate",
                    "input": {"topic": f"topic {n}"}}) + "\n"
        for n in range(count)
    )


def drop(inbox: Path, name: str, text: str | bytes) -> Path:
    """Drop a file atomically (write a dotted temp, rename), as `ihld submit` does."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    target = inbox / name
    tmp.rename(target)
    return target
