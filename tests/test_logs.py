"""The event log: JSON lines to stderr and file, journald priorities, reload, reading back."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ihld.observe.logs import (
    close_logging,
    configure_logging,
    log_path,
    log_targets,
    read_events,
    stderr_is_journal,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test configures logging its own way; leave structlog as we found it."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    saved = structlog.get_config()
    structlog.contextvars.clear_contextvars()
    yield
    close_logging()
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def fds_to(path: Path) -> list[int]:
    """This process's descriptors that point at ``path``."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if entry.readlink() == path:
                found.append(int(entry.name))
        except OSError:  # the fd listing itself, closed meanwhile
            continue
    return found


def open_fds_to(path: Path) -> int:
    return len(fds_to(path))


# -- shape of an event --------------------------------------------------------------


def test_json_lines_to_file_and_stderr_with_context(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = log_path(tmp_path)
    configure_logging("info", log_file=path)
    log = structlog.get_logger("test")
    structlog.contextvars.bind_contextvars(job_id="j-1", stage="critic", model="gemma2")
    log.info("stage_finished", backend="local", duration_s=1.25, tokens=42)
    structlog.contextvars.unbind_contextvars("stage")
    log.warning("job_failed", reason="schema")

    err = capfd.readouterr().err
    assert path == tmp_path / "log" / "ihld.jsonl"
    assert path.read_text() == err, "file and stderr carry the same lines (no prefix here)"
    first, second = lines_of(err)
    assert list(first)[:7] == [
        "timestamp",
        "level",
        "event",
        "job_id",
        "stage",
        "model",
        "backend",
    ]
    assert first["event"] == "stage_finished" and first["level"] == "info"
    assert first["duration_s"] == 1.25 and first["tokens"] == 42
    assert second == second | {"event": "job_failed", "level": "warning", "job_id": "j-1"}
    assert "stage" not in second
    stamp = datetime.fromisoformat(first["timestamp"])
    assert first["timestamp"].endswith("Z") and stamp.utcoffset() is not None
    assert abs(stamp.timestamp() - time.time()) < 60


def test_file_is_append_only_and_group_readable(tmp_path: Path) -> None:
    path = tmp_path / "log" / "ihld.jsonl"
    path.parent.mkdir()
    path.write_text('{"event":"earlier"}\n')
    path.chmod(0o600)  # an existing file keeps the admin's mode
    configure_logging(log_file=path, stderr=False)
    structlog.get_logger().info("daemon_started")
    events = [e["event"] for e in read_events(path)]
    assert events == ["earlier", "daemon_started"]

    fresh = tmp_path / "new" / "ihld.jsonl"
    old_umask = os.umask(0o007)  # the unit's UMask=
    try:
        configure_logging(log_file=fresh, stderr=False)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    (fd,) = fds_to(fresh)
    flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split()[3], 8)
    assert flags & os.O_APPEND


def test_level_filter_and_stderr_off(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ihld.jsonl"
    configure_logging("warning", log_file=path, stderr=False)
    log = structlog.get_logger()
    log.debug("a_debugged")
    log.info("a_infoed")
    log.warning("a_warned")
    log.error("an_errored")
    log.critical("a_crashed")
    assert capfd.readouterr().err == ""
    assert [(e["level"], e["event"]) for e in read_events(path)] == [
        ("warning", "a_warned"),
        ("error", "an_errored"),
        ("critical", "a_crashed"),
    ]


def test_reconfiguring_changes_level_of_already_cached_loggers(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """SIGHUP may lower the level: loggers cached on first use must follow."""
    configure_logging("info")
    log = structlog.get_logger()
    log.debug("hidden")
    log.info("shown")
    configure_logging("debug")
    log.debug("now_shown")
    configure_logging("error")
    log.warning("hidden_again")
    assert [e["event"] for e in lines_of(capfd.readouterr().err)] == ["shown", "now_shown"]


def test_exception_is_rendered_with_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    try:
        raise ZeroDivisionError("no tokens")
    except ZeroDivisionError:
        structlog.get_logger().exception("stage_crashed")
    (event,) = lines_of(capfd.readouterr().err)
    assert event["level"] == "error"
    assert "ZeroDivisionError: no tokens" in event["exception"]
    assert "Traceback" in event["exception"]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("verbose")


# -- odd data never crashes ---------------------------------------------------------


def test_lone_surrogates_are_escaped_not_raised(tmp_path: Path) -> None:
    """A file name decoded with surrogateescape must not crash the logging call."""
    path = tmp_path / "ihld.jsonl"
    configure_logging(log_file=path, stderr=False)
    bad_name = b"job-\xff.json".decode("utf-8", "surrogateescape")
    structlog.get_logger().info("file_rejected", name=bad_name, note="café ✓", **{"k\udc80": 1})
    raw = path.read_bytes()
    raw.decode("utf-8")  # valid UTF-8 on disk
    assert "café ✓".encode() in raw, "non-ASCII text stays readable (ensure_ascii=False)"
    assert b"\\udcff" in raw
    (event,) = read_events(path)
    assert event["name"] == bad_name
    assert event["k\udc80"] == 1


def test_unserialisable_values_degrade_instead_of_failing(tmp_path: Path) -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    loop: list[Any] = []
    loop.append(loop)
    path = tmp_path / "ihld.jsonl"
    configure_logging(log_file=path, stderr=False)
    log = structlog.get_logger()
    log.info("odd_values", nan=float("nan"), loop=loop, hostile=Hostile(), ok=1, where=tmp_path)
    log.info("tuple_keys", mapping={(1, 2): "x"})
    log.info("after_all_that")
    first, second, third = read_events(path)
    assert first["event"] == "odd_values"
    assert first["ok"] == 1 and first["where"] == str(tmp_path), "good values are kept"
    assert first["nan"] == "nan"
    assert first["hostile"].startswith("<unrepresentable")
    assert "log_render_error" in first
    assert second["event"] == "tuple_keys" and "log_render_error" in second
    assert third["event"] == "after_all_that"


def test_paths_and_exceptions_render_readably(tmp_path: Path) -> None:
    path = tmp_path / "ihld.jsonl"
    configure_logging(log_file=path, stderr=False)
    structlog.get_logger().info("job_claimed", path=tmp_path / "x", error=OSError(2, "gone"))
    (event,) = read_events(path)
    assert event["path"] == str(tmp_path / "x")
    assert event["error"] == "FileNotFoundError: [Errno 2] gone"
    assert "log_render_error" not in event


# -- reconfigure, close -------------------------------------------------------------


def test_reconfigure_closes_the_old_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    log = structlog.get_logger()
    configure_logging(log_file=a, stderr=False)
    log.info("into_a")
    assert open_fds_to(a) == 1
    configure_logging(log_file=b, stderr=False)
    log.info("into_b")
    assert open_fds_to(a) == 0
    assert open_fds_to(b) == 1
    assert [e["event"] for e in read_events(a)] == ["into_a"]
    assert [e["event"] for e in read_events(b)] == ["into_b"]
    assert log_targets() == {"stderr": False, "journal": False, "file": b}


def test_reopening_the_same_path_follows_rotation(tmp_path: Path) -> None:
    """logrotate moves the file away; a reload (same settings) starts a new one."""
    path = tmp_path / "ihld.jsonl"
    log = structlog.get_logger()
    configure_logging(log_file=path, stderr=False)
    log.info("before_rotation")
    path.rename(tmp_path / "ihld.jsonl.1")
    configure_logging(log_file=path, stderr=False)
    log.info("after_rotation")
    assert [e["event"] for e in read_events(path)] == ["after_rotation"]
    assert open_fds_to(tmp_path / "ihld.jsonl.1") == 0


def test_failed_reconfigure_keeps_the_old_setup(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    (tmp_path / "not-a-dir").write_text("")
    configure_logging("info", log_file=good, stderr=False)
    with pytest.raises(OSError):
        configure_logging("debug", log_file=tmp_path / "not-a-dir" / "x.jsonl", stderr=False)
    log = structlog.get_logger()
    log.debug("still_filtered")
    log.info("still_logged")
    assert [e["event"] for e in read_events(good)] == ["still_logged"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_full_disk_is_reported_once_and_never_raises(capfd: pytest.CaptureFixture[str]) -> None:
    """/dev/full fails every write with ENOSPC, like a full spool file system."""
    configure_logging(log_file=Path("/dev/full"))
    log = structlog.get_logger()
    log.info("first")
    log.info("second")
    events = [(e["event"], e["level"]) for e in lines_of(capfd.readouterr().err)]
    assert events == [("log_file_write_failed", "error"), ("first", "info"), ("second", "info")]


def test_symlinked_log_file_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    link = tmp_path / "ihld.jsonl"
    link.symlink_to(elsewhere)
    with pytest.raises(OSError):
        configure_logging(log_file=link, stderr=False)


def test_close_logging_closes_the_file_and_keeps_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ihld.jsonl"
    configure_logging(log_file=path)
    log = structlog.get_logger()
    close_logging()
    assert open_fds_to(path) == 0
    log.info("late_event")  # e.g. from a finally block after shutdown
    assert [e["event"] for e in lines_of(capfd.readouterr().err)] == ["late_event"]
    assert path.read_text() == ""
    close_logging()  # idempotent


def test_capture_logs_still_works_after_configure() -> None:
    """Other modules' tests assert events with capture_logs on cached loggers."""
    configure_logging("info", stderr=False)
    log = structlog.get_logger()
    log.info("warm_the_cache")
    with capture_logs() as logs:
        log.info("job_claimed", job_id="j1")
    assert logs == [{"event": "job_claimed", "job_id": "j1", "log_level": "info"}]


def test_fast_enough(tmp_path: Path) -> None:
    """Several events per stage at >1,000 stages/s: one event must cost far below 100 µs."""
    configure_logging("info", log_file=tmp_path / "ihld.jsonl", stderr=False)
    log = structlog.get_logger()
    structlog.contextvars.bind_contextvars(job_id="j1", stage="s1", model="m", backend="b")
    n = 5000
    started = time.perf_counter()
    for i in range(n):
        log.info("stage_finished", attempt=1, duration_s=0.25, eval_count=i)
        log.debug("stage_detail", i=i)  # filtered: must be cheaper still
    per_event = (time.perf_counter() - started) / n
    assert per_event < 100e-6, f"{per_event * 1e6:.1f} µs per event"
    assert sum(1 for _ in read_events(tmp_path / "ihld.jsonl")) == n


# -- journald priority prefixes (real stderr of a child process) -----------------------


CHILD = """
import sys
from pathlib import Path
import structlog
from ihld.observe.logs import configure_logging, stderr_is_journal
log_file = Path(sys.argv[1]) if sys.argv[1] else None
configure_logging("debug", log_file=log_file)
print(stderr_is_journal())
log = structlog.get_logger()
log.debug("a_debugged")
log.info("an_infoed", job_id="j1")
log.warning("a_warned")
log.error("an_errored")
log.critical("a_crashed")
"""


def run_child(tmp_path: Path, journal_stream: str | None, log_file: Path | None) -> tuple[str, str]:
    """Run CHILD with stderr on a file; ``journal_stream`` "match" uses that file's dev:ino."""
    err_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO)
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        if journal_stream == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(log_file or "")],
            stderr=err,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    return out, err_path.read_text()


def test_journal_gets_syslog_priority_prefixes(tmp_path: Path) -> None:
    log_file = tmp_path / "log" / "ihld.jsonl"
    out, err = run_child(tmp_path, "match", log_file)
    assert out.strip() == "True"
    prefixes = [line[:3] for line in err.splitlines()]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    bodies = [json.loads(line[3:]) for line in err.splitlines()]
    assert [b["level"] for b in bodies] == ["debug", "info", "warning", "error", "critical"]
    assert bodies[1]["job_id"] == "j1"
    file_text = log_file.read_text()
    assert not file_text.startswith("<"), "the file gets bare JSON"
    assert lines_of(file_text) == bodies


@pytest.mark.parametrize("journal_stream", [None, "1:2", "garbage", ""])
def test_no_prefix_unless_stderr_is_the_journal(tmp_path: Path, journal_stream: str | None) -> None:
    out, err = run_child(tmp_path, journal_stream, None)
    assert out.strip() == "False"
    assert [e["level"] for e in lines_of(err)] == ["debug", "info", "warning", "error", "critical"]


def test_stderr_is_journal_compares_device_and_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not stderr_is_journal()


# -- reading the log back -----------------------------------------------------------


def test_read_events_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "ihld.jsonl"
    path.write_bytes(
        b'{"timestamp":"2026-01-01T00:00:00.000000Z","level":"info","event":"one"}\n'
        b'{"timestamp":"2026-01-01T00:00:01.000000Z","level":"info","event":"two"}\n'
        b'{"timestamp":"2026-01-01T00:00:02.000000Z","level":"info","ev'
    )
    assert [e["event"] for e in read_events(path)] == ["one", "two"]


def test_read_events_skips_garbage_left_by_a_crash(tmp_path: Path) -> None:
    """After a crash the torn line gets the restarted daemon's first line glued on."""
    path = tmp_path / "ihld.jsonl"
    path.write_bytes(
        b'{"event":"before"}\n'
        b'{"event":"torn{"event":"after_restart_glued"}\n'
        b"[1, 2]\n"
        b'{"event":"after"}\n'
    )
    assert [e["event"] for e in read_events(path)] == ["before", "after"]


def test_read_events_since(tmp_path: Path) -> None:
    path = tmp_path / "ihld.jsonl"
    path.write_text(
        '{"timestamp":"2026-01-01T00:00:00.000000Z","event":"old"}\n'
        '{"timestamp":"2026-01-01T00:01:00.000000Z","event":"new"}\n'
        '{"event":"no_timestamp"}\n'
    )
    since = datetime.fromisoformat("2026-01-01T00:00:30Z").timestamp()
    assert [e["event"] for e in read_events(path, since=since)] == ["new"]
    assert len(list(read_events(path))) == 3


def test_read_events_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ihld.jsonl"
    configure_logging(log_file=path, stderr=False)
    before = time.time() - 1
    structlog.get_logger().info("job_done", job_id="j9", outputs={"judge": "A ✓"})
    (event,) = read_events(path, since=before)
    assert event["job_id"] == "j9" and event["outputs"] == {"judge": "A ✓"}
    assert list(read_events(path, since=time.time() + 60)) == []


def test_read_events_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_events(tmp_path / "none.jsonl"))
