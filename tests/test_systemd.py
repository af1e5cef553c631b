"""sd_notify against real AF_UNIX datagram sockets, and the unit file against systemd's tools."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ihld.core.config import ControlConfig
from ihld.observe.systemd import Notifier, watchdog_loop

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "ihld.service"


# -- a stand-in for systemd's notify socket ------------------------------------


class Receiver:
    """The manager's end: a bound SOCK_DGRAM socket that collects datagrams."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what goes into $NOTIFY_SOCKET

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def drain(self) -> list[bytes]:
        """Everything queued right now, without waiting."""
        out: list[bytes] = []
        self.sock.setblocking(False)
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A filesystem-path notify socket (sun_path is limited to 108 bytes: stay short)."""
    base = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="ihld-"))
    path = base / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()
        if base is not tmp_path:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    """An abstract-namespace notify socket, as systemd itself uses ('@' in the variable)."""
    name = f"ihld-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def notifier_for(receiver: Receiver, **env: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": receiver.address, **env})


# -- datagrams -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("3 queued, 1 in flight"), b"READY=1\nSTATUS=3 queued, 1 in flight"),
        (lambda n: n.status("idle"), b"STATUS=idle"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.stopping("draining 2 stages"), b"STOPPING=1\nSTATUS=draining 2 stages"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.extend_timeout(2.5), b"EXTEND_TIMEOUT_USEC=2500000"),
        (lambda n: n.send(STATUS="bad config", ERRNO=22), b"STATUS=bad config\nERRNO=22"),
    ],
)
def test_exact_datagrams(receiver: Receiver, call: object, expected: bytes) -> None:
    notifier = notifier_for(receiver)
    assert notifier.enabled
    assert call(notifier) is True  # type: ignore[operator]
    assert receiver.recv() == expected


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000
    lines = receiver.recv().decode().split("\n")
    assert lines[0] == "RELOADING=1"
    name, _, value = lines[1].partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_reloading_with_status(receiver: Receiver) -> None:
    notifier_for(receiver).reloading("reloading config")
    fields = dict(line.split("=", 1) for line in receiver.recv().decode().split("\n"))
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC", "STATUS"}
    assert fields["STATUS"] == "reloading config"


def test_status_is_forced_onto_one_line(receiver: Receiver) -> None:
    """A newline in a value would let text forge a second field (e.g. READY=1)."""
    notifier_for(receiver).status("3 queued\nREADY=1\r\nend\0!")
    assert receiver.recv() == b"STATUS=3 queued READY=1  end!"


def test_non_ascii_status(receiver: Receiver) -> None:
    notifier_for(receiver).status("qwen2.5 → gemma2 ✓")
    assert receiver.recv() == "STATUS=qwen2.5 → gemma2 ✓".encode()


def test_abstract_namespace_socket(abstract_receiver: Receiver) -> None:
    notifier = notifier_for(abstract_receiver)
    assert notifier.ready("up")
    assert abstract_receiver.recv() == b"READY=1\nSTATUS=up"
    assert notifier.watchdog()
    assert abstract_receiver.recv() == b"WATCHDOG=1"


def test_field_names_must_be_systemd_style(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    with pytest.raises(ValueError, match="upper-case"):
        notifier.send(status="lower case is ignored by systemd")
    with pytest.raises(ValueError, match="positive"):
        notifier.extend_timeout(0)


# -- no socket, broken socket ----------------------------------------------------


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    with capture_logs() as logs:
        results = [
            notifier.ready("x"),
            notifier.status("x"),
            notifier.reloading(),
            notifier.stopping(),
            notifier.watchdog(),
            notifier.extend_timeout(1),
            notifier.send(STATUS="x"),
        ]
    assert results == [False] * len(results)
    assert logs == []
    assert notifier.watchdog_interval() is None


def test_vanished_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert notifier.ready()
    sock.close()
    path.unlink()
    with capture_logs() as logs:
        assert notifier.watchdog() is False
        assert notifier.status("still running") is False
        assert notifier.stopping() is False
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"
    assert "WATCHDOG=1" in logs[0]["message"]


def test_socket_coming_back_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "flaky"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs() as logs:
        assert notifier.watchdog() is False  # not there yet
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        try:
            assert notifier.watchdog() is True
            assert sock.recv(100) == b"WATCHDOG=1"
        finally:
            sock.close()
    assert [e["event"] for e in logs] == ["sd_notify_failed", "sd_notify_recovered"]


def test_full_receiver_does_not_block(receiver: Receiver) -> None:
    """Nobody reads: sends fail fast with EAGAIN instead of stalling the event loop."""
    notifier = notifier_for(receiver)
    started = time.monotonic()
    with capture_logs():
        results = [notifier.status("x" * 1000) for _ in range(5000)]
    assert time.monotonic() - started < 5
    assert False in results  # the queue filled up at some point
    assert results[0] is True


def test_unsupported_socket_kind_is_a_logged_no_op() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert [e["event"] for e in logs] == ["sd_notify_unsupported"]


# -- watchdog ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "not-a-pid"}, 0.5),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_from_env_defaults_to_os_environ(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval() == 2.0
    assert notifier.ready()
    assert receiver.recv() == b"READY=1"


def _ping_times(receiver: Receiver, duration: float) -> list[float]:
    """Arrival times of WATCHDOG=1 datagrams over ``duration`` seconds (blocking)."""
    times: list[float] = []
    deadline = time.monotonic() + duration
    while (left := deadline - time.monotonic()) > 0:
        try:
            data = receiver.recv(timeout=left)
        except TimeoutError:
            break
        assert data == b"WATCHDOG=1"
        times.append(time.monotonic())
    return times


async def test_watchdog_loop_pings_at_half_the_interval(receiver: Receiver) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="200000")  # 0.2 s -> a ping every 0.1 s
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop))
    times = await asyncio.to_thread(_ping_times, receiver, 0.65)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(task, 1)
    assert time.monotonic() - started < 0.1, "stop must end the loop at once, not after a period"
    assert 5 <= len(times) <= 8, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.07 < gap < 0.2 for gap in gaps), gaps
    await asyncio.sleep(0.15)
    assert receiver.drain() == []  # no pings after stop


async def test_watchdog_loop_withholds_pings_while_unhealthy(receiver: Receiver) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="100000")  # a ping every 50 ms
    healthy = True
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(watchdog_loop(notifier, stop, lambda: healthy))
        await asyncio.sleep(0.18)
        assert len(receiver.drain()) >= 3
        healthy = False
        await asyncio.sleep(0.06)  # let an in-progress period finish
        receiver.drain()
        await asyncio.sleep(0.3)
        assert receiver.drain() == [], "an unhealthy scheduler must not ping"
        healthy = True
        await asyncio.sleep(0.12)
        assert len(receiver.drain()) >= 1, "pings resume once healthy again"
        stop.set()
        await asyncio.wait_for(task, 1)
    events = [e["event"] for e in logs]
    assert events == ["watchdog_withheld", "watchdog_resumed"]


async def test_watchdog_loop_treats_a_raising_health_check_as_unhealthy(
    receiver: Receiver,
) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="100000")

    def broken() -> bool:
        raise RuntimeError("scheduler state unreadable")

    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(watchdog_loop(notifier, stop, broken))
        await asyncio.sleep(0.12)
        stop.set()
        await asyncio.wait_for(task, 1)
    assert receiver.drain() == []
    assert "watchdog_health_check_failed" in [e["event"] for e in logs]


async def test_watchdog_loop_returns_without_a_watchdog(receiver: Receiver) -> None:
    stop = asyncio.Event()
    await asyncio.wait_for(watchdog_loop(notifier_for(receiver), stop), 0.5)
    other_pid = notifier_for(receiver, WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    await asyncio.wait_for(watchdog_loop(other_pid, stop), 0.5)
    assert receiver.drain() == []


async def test_a_stuck_event_loop_stops_pinging(receiver: Receiver) -> None:
    """The point of pinging from the loop: blocking it (time.sleep) starves the watchdog."""
    notifier = notifier_for(receiver, WATCHDOG_USEC="100000")
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop))
    await asyncio.sleep(0.12)
    receiver.drain()
    time.sleep(0.3)  # noqa: ASYNC251 -- deliberately blocking: the loop is "hung"
    assert receiver.drain() == []
    stop.set()
    await asyncio.wait_for(task, 1)


# -- the unit file ----------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> values (repeated keys accumulate), ignoring comments and sections."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_declares_the_contract() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/opt/ihld/.venv/bin/ihld run --config /etc/ihld/ihld.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["StateDirectory"] == ["ihld"]
    assert s["StateDirectoryMode"] == ["0750"]
    assert s["User"] == ["ihld"] and s["Group"] == ["ihld"]
    assert "DynamicUser" not in s
    assert s["UMask"] == ["0007"]
    assert s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"]
    assert s["SyslogLevelPrefix"] == ["true"]
    assert s["WatchdogSec"] == ["30"]


def test_stop_timeout_leaves_room_for_the_drain_grace() -> None:
    """systemd SIGKILLs at TimeoutStopSec; the daemon's own grace must end first."""
    timeout = int(unit_settings(UNIT.read_text())["TimeoutStopSec"][0])
    assert ControlConfig().grace_s + 10 <= timeout


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """``systemd-analyze verify`` passes with no complaint about ihld.service.

    verify insists that ExecStart=/ExecReload= binaries exist and are
    executable. /opt/ihld/.venv/bin/ihld exists only on an installed host, so
    the unit is checked as a copy whose ExecStart points at /bin/true (and
    ExecReload at this host's kill); everything else is verified as shipped.
    """
    tool = _systemd_analyze()
    text = UNIT.read_text()
    text = text.replace("ExecStart=/opt/ihld/.venv/bin/ihld ", "ExecStart=/bin/true ", 1)
    kill = shutil.which("kill", path="/bin:/usr/bin") or "/bin/true"
    text = text.replace("ExecReload=/bin/kill ", f"ExecReload={kill} ", 1)
    copy = tmp_path / "ihld.service"
    copy.write_text(text)
    result = subprocess.run(
        [tool, "verify", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    about_unit = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "ihld.service" in line or str(copy) in line
    ]
    assert result.returncode == 0, result.stderr
    assert about_unit == []


def test_security_exposure_is_safe() -> None:
    """Overall exposure ≤ 2.0 ("OK"/"SAFE"); --threshold is ten times the shown score."""
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=20", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    match = re.search(r"Overall exposure level for ihld\.service: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-500:]
    score, verdict = float(match.group(1)), match.group(2)
    assert score <= 2.0
    assert verdict in {"SAFE", "OK"}
