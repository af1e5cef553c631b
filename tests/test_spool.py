"""Spool: atomic no-clobber publishing, safe reads, the lock, fail points."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ihld.common import failpoints
from ihld.common.errors import JobError, SpoolError
from ihld.core.spool import Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


def test_prepare_creates_layout_with_group_writable_inbox(spool: Spool) -> None:
    for d in (spool.inbox, spool.claimed, spool.outbox, spool.failed, spool.run_dir):
        assert d.is_dir()
    assert spool.inbox.stat().st_mode & 0o7777 == 0o2770


def test_prepare_tolerates_another_node_making_the_same_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: two nodes sharing a spool start at once; one made ``shared/`` between the
    other's look and its mkdir, which failed the second daemon's start."""
    real_mkdir = Path.mkdir

    def other_node_first(self: Path, mode: int = 0o777, *args: object, **kwargs: object) -> None:
        if not self.exists():
            real_mkdir(self, mode)  # the other node wins the race
        real_mkdir(self, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", other_node_first)
    spool = Spool(tmp_path / "shared", node="b")
    spool.prepare()
    monkeypatch.undo()
    assert spool.inbox.is_dir() and spool.run_dir.is_dir()


def test_publish_never_overwrites(spool: Spool) -> None:
    assert spool.publish(spool.outbox, "a", {"v": 1}) == spool.outbox / "a.json"
    assert spool.publish(spool.outbox, "a", {"v": 2}) is None
    assert json.loads((spool.outbox / "a.json").read_text()) == {"v": 1}
    assert not [p for p in spool.outbox.iterdir() if p.name.startswith(".")]


def test_publish_failure_picks_a_free_name(spool: Spool) -> None:
    assert spool.publish_failure("x", {"n": 1}).name == "x.json"
    assert spool.publish_failure("x", {"n": 2}).name == "x~2.json"


def test_read_claimed_refuses_symlink_fifo_hardlink_and_big(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    link = spool.claimed / "1--l.json"
    link.symlink_to(outside)
    with pytest.raises(JobError, match="symlink"):
        spool.read_claimed(link, 1000)
    fifo = spool.claimed / "2--f.json"
    os.mkfifo(fifo)
    with pytest.raises(JobError, match="not a regular file"):
        spool.read_claimed(fifo, 1000)  # must not block
    hard = spool.claimed / "3--h.json"
    os.link(outside, hard)
    with pytest.raises(JobError, match="hard links"):
        spool.read_claimed(hard, 1000)
    big = spool.claimed / "4--b.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(JobError, match="over the limit"):
        spool.read_claimed(big, 1000)


def test_second_daemon_on_the_same_spool_is_refused(spool: Spool) -> None:
    spool.lock()
    code = (
        "import sys; from pathlib import Path; from ihld.core.spool import Spool\n"
        f"s = Spool(Path({str(spool.root)!r}))\n"
        "try:\n    s.lock()\nexcept Exception as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3
    assert f"pid {os.getpid()}" in proc.stdout
    spool.unlock()


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory the test process cannot write: read-only mode, or immutable as root."""
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o555)
        yield parent
        parent.chmod(0o755)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0
    ):
        pytest.skip("running as root and chattr +i is not available here")
    try:
        yield parent
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_unwritable_spool_is_reported_clearly(unwritable_dir: Path) -> None:
    with pytest.raises(SpoolError) as info:
        Spool(unwritable_dir / "spool").prepare()
    message = str(info.value)
    assert "cannot create spool directory" in message
    assert str(unwritable_dir / "spool") in message


def test_inflight_log_finds_jobs_running_at_a_crash(spool: Spool) -> None:
    from ihld.core.inflight import InflightLog

    log = InflightLog(spool.inflight_log)
    log.started("a", "s1")
    log.finished("a", "s1")
    log.started("b", "s1")
    log.close()
    assert spool.read_inflight() == {"b": 1}


def test_scan_inbox_reports_kinds_and_skips_dotfiles(spool: Spool) -> None:
    (spool.inbox / "a.json").write_text("{}")
    (spool.inbox / ".hidden.json").write_text("{}")
    (spool.inbox / "b.json.tmp").write_text("{}")
    (spool.inbox / "d.json").mkdir()
    (spool.inbox / "l.json").symlink_to("/etc/passwd")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(spool.inbox / "s.json"))
    kinds = {e.name: e.kind for e in spool.scan_inbox()}
    sock.close()
    assert kinds == {"a.json": "file", "d.json": "dir", "l.json": "symlink", "s.json": "socket"}


def test_failpoint_raise(spool: Spool) -> None:
    failpoints.configure("result.before_publish:enospc")
    try:
        with pytest.raises(OSError, match="No space left"):
            spool.publish(spool.outbox, "z", {})
    finally:
        failpoints.configure("")
    assert not (spool.outbox / "z.json").exists()
    assert not list(spool.outbox.iterdir())  # the temp file is gone too
