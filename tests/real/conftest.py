"""Fixtures of the real-server suite: llama.cpp's router, a recording proxy, ihld daemons.

Assets come from ``realserver/build.sh`` (``make test-real`` runs it first). Where that build
is impossible (it exits 77 and leaves ``UNAVAILABLE`` in the cache) every test here skips
with the reason and a banner on stderr; assets that are simply missing are an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IHLD, REPO, DaemonRig
from tests.real.router import MODELS, Router, cache_dir, write_preset

BACKEND = "real"
# Where the daemon runs from (``python -m ihld`` in that directory): this checkout, unless
# IHLD_REAL_DAEMON_SRC points at another tree (to try the suite on another version of ihld).
DAEMON_SRC = Path(os.environ.get("IHLD_REAL_DAEMON_SRC") or REPO)
_unavailable: list[str] = []


def _banner(text: str) -> str:
    bar = "=" * 88
    return f"\n{bar}\n REAL-SERVER SUITE SKIPPED: {text}\n{bar}\n"


@dataclass(frozen=True)
class Assets:
    cache: Path
    binary: Path
    models: dict[str, Path]


@pytest.fixture(scope="session")
def real_assets() -> Assets:
    cache = cache_dir()
    binary = cache / "bin" / "llama-server"
    models = {name: cache / "models" / filename for name, filename in MODELS.items()}
    if binary.is_file() and all(path.is_file() for path in models.values()):
        return Assets(cache, binary, models)
    marker = cache / "UNAVAILABLE"
    if marker.is_file():
        reason = (f"llama.cpp's server cannot be built on this machine: "
                  f"{marker.read_text().strip()} (see realserver/build.sh)")
        if not _unavailable:
            _unavailable.append(reason)
            sys.__stderr__.write(_banner(reason))
            sys.__stderr__.flush()
        pytest.skip(reason)
    pytest.fail(
        f"no llama-server/models in {cache}: run `make test-real` (or realserver/build.sh) first",
        pytrace=False,
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in _unavailable:
        terminalreporter.write(_banner(reason), red=True, bold=True)


KIND = "llamacpp"
# The llamacpp backend resolves names case-insensitively against the router's list
# (gemma3:270M).
MODEL_A = "gemma3:270m"
MODEL_B = "gemma3-b:270m"
ROUTER_ID = {"gemma3:270m": "gemma3:270M", "gemma3-b:270m": "gemma3-b:270M"}


@pytest.fixture(scope="session")
def preset(real_assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preset(tmp_path_factory.mktemp("preset") / "models.ini", real_assets.cache)


@pytest.fixture
def router(real_assets: Assets, preset: Path, tmp_path: Path) -> Iterator[Router]:
    server = Router(real_assets.binary, preset, tmp_path / "router.log")
    server.start()
    yield server
    server.kill()


@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    url: str
    log_path: Path

    def entries(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()
                if line.strip()]

    def chats(self) -> list[dict[str, Any]]:
        """Chat requests as they arrived, each with its end (``status``, ``completed``)."""
        starts: dict[int, dict[str, Any]] = {}
        for entry in self.entries():
            if "method" in entry:
                starts[entry["n"]] = dict(entry)
            elif entry["n"] in starts and "status" in entry:
                starts[entry["n"]].update(entry)
        return [e for e in starts.values() if "chat/completions" in e["path"]]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[[str], Proxy]]:
    started: list[Proxy] = []

    def make(upstream: str) -> Proxy:
        log = tmp_path / f"proxy-{len(started)}.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.real.proxy", "--upstream", upstream, "--log", str(log)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            proc.kill()
            raise RuntimeError(f"proxy did not start: {line!r}")
        proxy = Proxy(proc, match.group(1), log)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.proc.kill()
        proxy.proc.wait()


def write_real_config(path: Path, spool: Path, url: str, *, policy: str = "affinity",
                      kind: str = KIND, extra: str = "") -> None:
    path.write_text(
        f'[spool]\ndir = "{spool}"\nsettle_s = 0.2\nrescan_s = 0.3\n\n'
        f'[[backends]]\nname = "{BACKEND}"\nkind = "{kind}"\nurl = "{url}"\n'
        f"slots = 4\nmax_loaded = 1\nconnect_timeout_s = 2\nread_timeout_s = 60\n\n"
        f'[scheduler]\npolicy = "{policy}"\n\n'
        f"[limits]\nretry_backoff_s = 0.2\nstage_timeout_s = 120\n\n"
        f'[log]\nstderr = true\nlevel = "info"\n\n[control]\ngrace_s = 5\n\n{extra}'
    )


@dataclass
class RealRig(DaemonRig):
    """A spool and config aimed at the real router (or a proxy in front of it)."""

    runs: list[subprocess.CompletedProcess[bytes]] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"daemon-{len(self.procs)}.stderr", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*IHLD, "run", "--config", str(self.config), *args],
            stdout=subprocess.DEVNULL, stderr=log, cwd=DAEMON_SRC,
            env={**os.environ, **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def run_once(self, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """``ihld run --once``; the timeout is only a safety net against a hang."""
        proc = subprocess.run([*IHLD, "run", "--once", "--config", str(self.config)],
                              capture_output=True, timeout=timeout, cwd=DAEMON_SRC)
        (self.root / f"once-{len(self.runs)}.stderr").write_bytes(proc.stderr)
        self.runs.append(proc)
        return proc


@pytest.fixture
def real_rig(tmp_path: Path) -> Iterator[Callable[..., RealRig]]:
    rigs: list[RealRig] = []

    def make(url: str, name: str = "rig", **options: Any) -> RealRig:
        root = tmp_path / name
        root.mkdir()
        config = root / "ihld.toml"
        write_real_config(config, root / "spool", url, **options)
        rig = RealRig(root, config)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop_all()
