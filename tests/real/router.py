"""llama.cpp's server in router mode as a real subprocess, for the real-server suite.

The binary and the two GGUF files come from ``realserver/build.sh`` (a cache outside the
checkout). :func:`write_preset` writes the router's INI preset: two model names for two
byte-identical files, so a switch between them is a real unload and reload.
:class:`Router` starts ``llama-server --models-preset FILE --models-max 1`` on a loopback
port with its log captured to a file, waits for ``GET /health``, can be killed and started
again on the same port, and reads the router's own account of what happened: loads
(``spawning server instance with name=…``, once per load), proxied requests, ``GET /models``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "realserver" / "gemma-turns.jinja"
# Preset section -> file under the cache's models/. The router lists them as gemma3:270M and
# gemma3-b:270M (it upper-cases the size tag).
MODELS = {"gemma3:270m": "gemma3-270m.gguf", "gemma3-b:270m": "gemma3-270m-b.gguf"}
_SPAWN_RE = re.compile(r"spawning server instance with name=(\S+)")
_PROXY_RE = re.compile(r"proxying request to model (\S+)")


def cache_dir() -> Path:
    explicit = os.environ.get("IHLD_REAL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ihld-real-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_preset(path: Path, cache: Path, *, ctx: int = 4096, slots: int = 4,
                 threads: int = 2) -> Path:
    lines = [
        "version = 1", "",
        "[*]", f"c = {ctx}", f"np = {slots}", f"t = {threads}", "stop-timeout = 5",
        f"chat-template-file = {TEMPLATE}", "",
    ]
    for name, filename in MODELS.items():
        lines += [f"[{name}]", f"model = {cache / 'models' / filename}", ""]
    path.write_text("\n".join(lines))
    return path


class RouterError(RuntimeError):
    pass


@dataclass
class Router:
    binary: Path
    preset: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    models_max: int = 1
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) on the same port; return once ``GET /health`` answers 200."""
        if self.proc is not None and self.proc.poll() is None:
            raise RouterError("router already running")
        with open(self.log_path, "ab") as log:
            log.write(f"==== ihld test: router start #{self.starts + 1}\n".encode())
            log.flush()
            # Its own session: kill() signals the group, so the model children go with it.
            self.proc = subprocess.Popen(
                [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port),
                 "--models-preset", str(self.preset), "--models-max", str(self.models_max)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RouterError(f"router exited with {self.proc.returncode}: {self.tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.kill()
        raise RouterError(f"router not healthy after {timeout}s: {self.tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the router's process group (router and model children); wait for it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
        # the children follow when their stdin (a pipe from the router) closes
        self._wait_children_gone(proc.pid)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def _wait_children_gone(self, pgid: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    # -- HTTP --------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def models(self) -> dict[str, str]:
        """``GET /models``: the router's model ids and their ``status.value``."""
        data = self.get("/models")["data"]
        return {entry["id"]: entry["status"]["value"] for entry in data}

    def wait_status(self, model: str, status: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.models()
            if seen.get(model) == status:
                return
            time.sleep(0.1)
        raise RouterError(f"{model} not {status} after {timeout}s: {seen}")

    # -- the router's log --------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def loads(self) -> Counter[str]:
        """Model loads by name, counted from the router's own log (all starts included)."""
        return Counter(match.group(1) for match in _SPAWN_RE.finditer(self.log()))

    def requests(self) -> Counter[str]:
        """Requests the router proxied to a model child, by model."""
        return Counter(match.group(1) for match in _PROXY_RE.finditer(self.log()))
