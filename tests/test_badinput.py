"""The bad-input corpus: everything a user (or a broken tool) can drop into the inbox.

One running daemon gets the whole corpus at once, and each case is checked
against its expected outcome: a result in ``outbox/``, an error record of
the right kind in ``failed/`` (the bytes kept under ``failed/inputs/``), or
left alone in the inbox (not a job file name). Throughout, the daemon stays
up, and nothing outside the spool is opened, read or changed on a job
file's behalf: an inotify watch on the directory the symlinks and hard
links point to must see no event at all.

``benchmarks/RELIABILITY.md`` has the corpus as a table; regenerate it with
``IHLD_BADINPUT_TABLE=table.md .venv/bin/pytest tests/test_badinput.py -k corpus``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks.torture import Sim, records
from ihld.core.jobs import default_id_for
from tests.conftest import IHLD, REPO, DaemonRig, drop

MAX_JOB_BYTES = 65536


def debate(**fields: Any) -> str:
    return json.dumps({"pipeline": "debate", "input": {"topic": "t"}, **fields})


def prompt_job(**fields: Any) -> str:
    stage = {"name": "only", "model": "qwen2.5:7b", "prompt": "say {input[w]}"}
    return json.dumps({"stages": [stage], "input": {"w": "hi"}, **fields})


def stage_job(**stage: Any) -> str:
    return json.dumps({"stages": [{"name": "s", "model": "qwen2.5:7b", "prompt": "x", **stage}]})


def sid(name: bytes | str) -> str:
    """The id ihld derives from a file name (its stem, made safe)."""
    text = os.fsdecode(name) if isinstance(name, bytes) else name
    return default_id_for(os.path.splitext(text)[0])


# -- the corpus -----------------------------------------------------------------------------


@dataclass
class Case:
    group: str
    label: str
    name: str | bytes  # the inbox entry
    content: str | bytes | None = None  # None: ``make`` builds the entry
    expect: dict[str, str] = field(default_factory=dict)  # "outbox/x" | "failed/x" | "inbox/x"
    make: Callable[[Path, Path], None] | None = None  # (entry path, outside dir)
    message: str = ""  # a word the error message must contain

    @property
    def entry(self) -> str:
        return os.fsdecode(self.name) if isinstance(self.name, bytes) else self.name


def _fail(name: str, kind: str) -> dict[str, str]:
    return {f"failed/{sid(name)}": kind}


def _done(*ids: str) -> dict[str, str]:
    return {f"outbox/{i}": "done" for i in ids}


def _fifo(path: Path, _outside: Path) -> None:
    os.mkfifo(path)


_SOCKETS: list[socket.socket] = []


def _socket(path: Path, _outside: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    _SOCKETS.append(sock)


def _directory(path: Path, _outside: Path) -> None:
    path.mkdir()
    (path / "inner.json").write_text(debate(id="inner"))


def _link_out(path: Path, outside: Path) -> None:
    path.symlink_to(outside / "target.json")


def _link_out_dir(path: Path, outside: Path) -> None:
    path.symlink_to(outside)


def _link_in(path: Path, _outside: Path) -> None:
    (path.parent / ".target-in.json").write_text(debate(id="target_in"))
    path.symlink_to(".target-in.json")


def _link_dangling(path: Path, _outside: Path) -> None:
    path.symlink_to("/nonexistent/nowhere.json")


def _link_loop(path: Path, _outside: Path) -> None:
    path.symlink_to(path.name)


def _hard_link(path: Path, outside: Path) -> None:
    os.link(outside / "hard-src.json", path)


def _sparse(path: Path, _outside: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB, no blocks


def _bytes_name(name: bytes, content: bytes) -> Callable[[Path, Path], None]:
    def make(path: Path, _outside: Path) -> None:
        full = os.fsencode(path.parent) + b"/" + name
        with open(full, "wb") as fh:
            fh.write(content)

    return make


LONG_ID = "i" * 129
CORPUS: list[Case] = [
    # -- broken JSON -----------------------------------------------------------------------
    Case("json", "malformed", "malformed.json", '{"pipeline": "debate", ',
         _fail("malformed", "invalid_json")),
    Case("json", "truncated JSON Lines (last line cut)", "trunc.jsonl",
         debate(id="trunc_ok") + "\n" + '{"id": "trunc_cut", "pipe',
         {**_done("trunc_ok"), "failed/trunc.2": "invalid_json"}),
    Case("json", "trailing garbage", "garbage.json", debate() + " xyz",
         _fail("garbage", "invalid_json")),
    Case("json", "comment", "comment.json", "// a job\n" + debate(),
         _fail("comment", "invalid_json")),
    Case("json", "single quotes", "squote.json", "{'pipeline': 'debate'}",
         _fail("squote", "invalid_json")),
    Case("json", "trailing comma", "tcomma.json", '{"pipeline": "debate",}',
         _fail("tcomma", "invalid_json")),
    Case("json", "NaN", "nan.json", '{"pipeline": "debate", "input": {"x": NaN}}',
         _fail("nan", "invalid_json"), message="NaN"),
    Case("json", "Infinity", "inf.json", '{"pipeline": "debate", "input": {"x": -Infinity}}',
         _fail("inf", "invalid_json")),
    Case("json", "number overflowing to infinity (1e999)", "overflow.json",
         '{"pipeline": "debate", "input": {"x": 1e999}}', _fail("overflow", "invalid_json"),
         message="finite"),
    Case("json", "integer of 5,000 digits", "bigint.json",
         '{"pipeline": "debate", "input": {"x": ' + "9" * 5000 + "}}",
         _fail("bigint", "invalid_json"), message="digits"),
    Case("json", "duplicate keys", "dupkey.json", '{"pipeline": "debate", "pipeline": "x"}',
         _fail("dupkey", "invalid_json"), message="duplicate key"),
    Case("json", "nesting 100 deep", "deep.json",
         '{"pipeline": "debate", "input": ' + "[" * 100 + "]" * 100 + "}",
         _fail("deep", "invalid_json"), message="nesting"),
    Case("json", "nesting 60,000 deep (parser recursion)", "deeper.json", "[" * 60_000,
         _fail("deeper", "invalid_json")),
    Case("json", "lone surrogate escape", "surrogate.json",
         '{"pipeline": "debate", "input": {"x": "\\ud800"}}',
         _fail("surrogate", "invalid_json"), message="surrogate"),
    Case("json", "UTF-8 byte-order mark", "bom.json", b"\xef\xbb\xbf" + debate().encode(),
         _fail("bom", "encoding"), message="byte-order mark"),
    Case("json", "UTF-16", "utf16.json", debate().encode("utf-16"),
         _fail("utf16", "encoding"), message="UTF-16"),
    Case("json", "Latin-1 byte in a string", "latin1.json",
         b'{"pipeline": "debate", "input": {"topic": "caf\xe9"}}',
         _fail("latin1", "encoding"), message="not UTF-8"),
    Case("json", "overlong UTF-8 / encoded surrogate", "overlong.json",
         b'{"pipeline": "debate", "input": {"x": "\xc0\xaf\xed\xa0\x80"}}',
         _fail("overlong", "encoding")),
    Case("json", "binary junk with NUL bytes", "junk.json", bytes(range(256)) * 8,
         _fail("junk", "encoding")),
    Case("json", "empty file", "empty.json", b"", _fail("empty", "empty")),
    Case("json", "empty JSON Lines", "emptyl.jsonl", b"\n  \n\n", _fail("emptyl", "empty")),
    # -- wrong schema ------------------------------------------------------------------------
    Case("schema", "top level is an array", "array.json", "[1, 2]",
         _fail("array", "invalid_schema"), message="JSON object"),
    Case("schema", "top level is a string", "string.json", '"debate"',
         _fail("string", "invalid_schema")),
    Case("schema", "top level is null", "null.json", "null", _fail("null", "invalid_schema")),
    Case("schema", "wrong type (priority a string)", "wtype.json", debate(priority="high"),
         _fail("wtype", "invalid_schema"), message="priority"),
    Case("schema", "wrong type (stages a string)", "wstages.json",
         json.dumps({"stages": "abc"}), _fail("wstages", "invalid_schema"), message="stages"),
    Case("schema", "missing pipeline and stages", "missing.json", json.dumps({"input": {}}),
         _fail("missing", "invalid_schema"), message="pipeline"),
    Case("schema", "both pipeline and stages", "both.json",
         json.dumps({"pipeline": "debate", "stages": []}), _fail("both", "invalid_schema")),
    Case("schema", "unknown field", "ufield.json", debate(colour="red"),
         _fail("ufield", "invalid_schema"), message="colour"),
    Case("schema", "priority out of range", "prio.json", debate(priority=10**9),
         _fail("prio", "invalid_schema"), message="priority"),
    Case("schema", "negative deadline", "deadline.json", debate(deadline_s=-1),
         _fail("deadline", "invalid_schema"), message="deadline_s"),
    Case("schema", "no stages", "nostages.json", json.dumps({"stages": []}),
         _fail("nostages", "invalid_schema")),
    Case("schema", "stage name with a space", "sname.json", stage_job(name="a b"),
         _fail("sname", "invalid_schema"), message="name"),
    Case("schema", "needs a stage that does not exist", "needs.json", stage_job(needs=["zz"]),
         _fail("needs", "invalid_schema"), message="needs"),
    Case("schema", "override of a stage that does not exist", "ovr.json",
         debate(overrides={"nobody": {"model": "x"}}), _fail("ovr", "invalid_schema")),
    Case("schema", "template naming an unknown field", "tmpl.json",
         stage_job(prompt="{secret.__class__}"), _fail("tmpl", "invalid_schema")),
    Case("schema", "unknown pipeline", "upipe.json", json.dumps({"pipeline": "nope"}),
         _fail("upipe", "unknown_pipeline"), message="nope"),
    Case("schema", "unknown actor", "uactor.json", stage_job(actor="ghost"),
         _fail("uactor", "unknown_actor"), message="ghost"),
    Case("schema", "unknown model (the server answers 404)", "umodel.json",
         stage_job(model="nope:1b"), _fail("umodel", "model_not_found"), message="nope:1b"),
    # -- ids ---------------------------------------------------------------------------------------
    Case("ids", "id with a slash", "idslash.json", debate(id="a/b"),
         _fail("idslash", "invalid_schema"), message="id"),
    Case("ids", "id '..'", "iddots.json", debate(id=".."), _fail("iddots", "invalid_schema")),
    Case("ids", "id '../../etc/passwd'", "idtrav.json", debate(id="../../etc/passwd"),
         _fail("idtrav", "invalid_schema")),
    Case("ids", "id with NUL", "idnul.json", debate(id="a\u0000b"),
         _fail("idnul", "invalid_schema")),
    Case("ids", "id of 129 characters", "idlong.json", debate(id=LONG_ID),
         _fail("idlong", "invalid_schema")),
    Case("ids", "id empty", "idempty.json", debate(id=""), _fail("idempty", "invalid_schema")),
    Case("ids", "id a number", "idnum.json", debate(id=5), _fail("idnum", "invalid_schema")),
    Case("ids", "duplicate id in one JSON Lines file", "dupl.jsonl",
         debate(id="dup_in") + "\n" + debate(id="dup_in") + "\n",
         {**_done("dup_in"), "failed/dup_in~2": "duplicate_id"}),
    Case("ids", "duplicate id across files (first)", "dupa.json", debate(id="dup_across"),
         _done("dup_across")),
    Case("ids", "duplicate id across files (second)", "dupb.json", debate(id="dup_across"),
         {"failed/dup_across~2": "duplicate_id"}, message="already submitted"),
    Case("ids", "one bad line among good ones", "mixed.jsonl",
         "\n".join([debate(id="mix1"), debate(id="mix2", priority=[]), debate(id="mix3")]),
         {**_done("mix1", "mix3"), "failed/mixed.2": "invalid_schema"}),
    Case("ids", "JSON Lines with CRLF line ends", "crlf.jsonl",
         debate(id="crlf1") + "\r\n" + debate(id="crlf2") + "\r\n", _done("crlf1", "crlf2")),
    # -- sizes -----------------------------------------------------------------------------------
    Case("size", f"over max_job_bytes ({MAX_JOB_BYTES})", "big.json",
         debate(input={"x": "y" * MAX_JOB_BYTES}), _fail("big", "too_large")),
    Case("size", "1 GiB sparse file", "sparse.json", None, _fail("sparse", "too_large"),
         make=_sparse),
    # -- not regular files -------------------------------------------------------------------------
    Case("kind", "directory", "dir.json", None, _fail("dir", "dir"), make=_directory),
    Case("kind", "FIFO", "fifo.json", None, _fail("fifo", "fifo"), make=_fifo),
    Case("kind", "unix socket", "sock.json", None, _fail("sock", "socket"), make=_socket),
    Case("kind", "symlink to a file outside the spool", "lout.json", None,
         _fail("lout", "symlink"), make=_link_out),
    Case("kind", "symlink to a directory outside", "loutdir.json", None,
         _fail("loutdir", "symlink"), make=_link_out_dir),
    Case("kind", "symlink inside the spool", "lin.json", None,
         {**_fail("lin", "symlink"), "inbox/.target-in.json": "ignored"}, make=_link_in),
    Case("kind", "dangling symlink", "ldang.json", None, _fail("ldang", "symlink"),
         make=_link_dangling),
    Case("kind", "symlink loop", "lloop.json", None, _fail("lloop", "symlink"),
         make=_link_loop),
    Case("kind", "hard link to a file outside", "hard.json", None,
         _fail("hard", "hard_link"), make=_hard_link),
    # -- names -------------------------------------------------------------------------------------
    Case("names", "newline in the name", "new\nline.json", debate(), _done(sid("new\nline"))),
    Case("names", "ANSI escapes in the name", "\x1b[31mred\x1b[0m.json", debate(),
         _done(sid("\x1b[31mred\x1b[0m"))),
    Case("names", "name of 250 bytes", "n" * 245 + ".json", debate(), _done(sid("n" * 245))),
    Case("names", "leading '-'", "-rf.json", debate(), _done("-rf")),
    Case("names", "spaces and UTF-8", "mon café ☕.json", debate(), _done(sid("mon café ☕"))),
    Case("names", "non-UTF-8 bytes (bad\\xff.json)", b"bad\xff.json", None,
         _done(sid(b"bad\xff")), make=_bytes_name(b"bad\xff.json", debate().encode())),
    Case("names", "not *.json / *.jsonl", "notes.txt", debate(), {"inbox/notes.txt": "ignored"}),
    Case("names", "upper-case suffix", "LOUD.JSON", debate(), {"inbox/LOUD.JSON": "ignored"}),
    Case("names", "dotfile", ".hidden.json", debate(), {"inbox/.hidden.json": "ignored"}),
    Case("names", "temp file", "part.json.tmp", debate(), {"inbox/part.json.tmp": "ignored"}),
]


# -- watching the outside of the spool --------------------------------------------------------


class Inotify:
    """Every open, read, write, attribute change, move or delete in one directory."""

    MASK = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        wd = libc.inotify_add_watch(self.fd, os.fsencode(directory), self.MASK)
        if wd < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def events(self) -> list[tuple[int, str]]:
        out = []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return out
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode(errors="replace")
            out.append((mask, name))
            offset += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


# -- running it ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    sim = Sim.start("laptop-6gb", 200.0)
    try:
        yield sim
    finally:
        sim.stop()


def _expected_count(cases: list[Case]) -> int:
    return sum(1 for c in cases for k in c.expect if not k.startswith("inbox/"))


def _outcome(spool: Path, key: str) -> tuple[str, dict[str, Any] | None]:
    where, name = key.split("/", 1)
    if where == "inbox":
        return ("ignored" if (spool / "inbox" / name).exists() else "gone"), None
    path = spool / where / f"{name}.json"
    if not path.exists():
        return "missing", None
    record = json.loads(path.read_text(encoding="utf-8"))
    if where == "outbox":
        return str(record.get("status")), record
    return str(record["error"]["kind"]), record


def _table(cases: list[Case], outcomes: dict[str, list[str]]) -> str:
    rows = ["| # | group | input | expected | outcome |", "|---|---|---|---|---|"]
    for number, case in enumerate(cases, start=1):
        expected = ", ".join(f"`{k}` {v}" for k, v in case.expect.items())
        rows.append(
            f"| {number} | {case.group} | {case.label} | {expected} | "
            f"{'; '.join(outcomes[case.label])} |"
        )
    return "\n".join(rows) + "\n"


def _slow_writer(inbox: Path) -> threading.Thread:
    """A plain, slow ``cp``: the file is visible long before it is whole, with no close event."""
    text = (debate(id="slow1") + "\n" + debate(id="slow2") + "\n").encode()

    def write() -> None:
        with open(inbox / "slow.jsonl", "wb") as fh:
            for offset in range(0, len(text), 40):
                fh.write(text[offset : offset + 40])
                fh.flush()
                time.sleep(0.12)  # well under settle_s between chunks

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_bad_input_corpus(
    sim: Sim, rig_factory: Callable[..., DaemonRig], tmp_path: Path
) -> None:
    assert len(CORPUS) >= 40 and len({c.label for c in CORPUS}) == len(CORPUS)
    rig = rig_factory(sim.url, extra="", backend_extra="")
    rig.config.write_text(
        rig.config.read_text()
        .replace("[limits]\n", f"[limits]\nmax_job_bytes = {MAX_JOB_BYTES}\n")
        .replace("settle_s = 0.2", "settle_s = 0.6")
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.json").write_text(debate(id="secret"))
    (outside / "hard-src.json").write_text(debate(id="hard_secret"))
    rig.inbox.mkdir(parents=True)
    for case in CORPUS:  # the links to the outside are made before the watch starts
        if case.make in (_hard_link,):
            case.make(rig.inbox / case.entry, outside)
    watch = Inotify(outside)
    proc = rig.start()
    rig.wait_ready()
    try:
        for case in CORPUS:
            path = rig.inbox / case.entry
            if case.make is _hard_link:
                continue
            if case.make is not None:
                case.make(path, outside)
            elif isinstance(case.content, bytes):
                drop(rig.inbox, case.entry, case.content)
            else:
                assert case.content is not None
                drop(rig.inbox, case.entry, case.content)
        writer = _slow_writer(rig.inbox)
        expected = _expected_count(CORPUS) + 2
        rig.wait_finished(expected, timeout=120)
        writer.join()
        time.sleep(1.0)  # anything late (a second record, a stray write) shows up now
        assert proc.poll() is None, rig.stderr()[-3000:]
        assert rig.status() is not None  # the control socket still answers

        outcomes: dict[str, list[str]] = {}
        problems = []
        for case in CORPUS:
            got = []
            for key, kind in case.expect.items():
                outcome, record = _outcome(rig.spool, key)
                got.append(outcome)
                if outcome != kind:
                    problems.append(f"{case.label}: {key} is {outcome}, expected {kind}")
                    continue
                message = (record or {}).get("error", {}).get("message", "")
                if key.startswith("failed/") and case.message not in message:
                    problems.append(
                        f"{case.label}: message {message!r} does not mention {case.message!r}"
                    )
                if record is not None and key.startswith("failed/") and kind != "model_not_found":
                    source = record["source"]
                    if record.get("status") != "rejected" or "kept_as" not in source:
                        problems.append(f"{case.label}: not a proper rejection: {record}")
            outcomes[case.label] = got
        assert not problems, "\n".join(problems)
        # exactly the expected records, each whole and written once
        outbox, bad_out = records(rig.spool / "outbox")
        failed, bad_failed = records(rig.spool / "failed")
        assert not bad_out and not bad_failed
        want = {k.split("/", 1)[1] for c in CORPUS for k in c.expect if k.startswith("outbox/")}
        assert set(outbox) == want | {"slow1", "slow2"}
        want_failed = {
            k.split("/", 1)[1] for c in CORPUS for k in c.expect if k.startswith("failed/")
        }
        assert set(failed) == want_failed
        # the kept bytes of rejected files are there, unfollowed
        kept = {p.name for p in (rig.spool / "failed" / "inputs").iterdir()}
        assert any(name.endswith("--malformed.json") for name in kept)
        for name in ("upipe", "mixed.2", "dup_across~2"):  # parsed, then refused: bytes kept too
            assert (rig.spool / failed[name]["source"]["kept_as"]).is_file(), name
        assert os.path.islink(rig.spool / failed["lout"]["source"]["kept_as"])
        assert (rig.spool / failed["sparse"]["source"]["kept_as"]).stat().st_size == 1 << 30
        # the odd names are shown as valid UTF-8
        assert outbox[sid(b"bad\xff")]["job"]["source"]["file"] == "bad\\xff.json"
        # nothing outside the spool was opened, read or changed
        assert watch.events() == []
        assert json.loads((outside / "target.json").read_text())["id"] == "secret"
        assert (outside / "hard-src.json").stat().st_nlink == 2  # its link sits in failed/inputs

        # the inbox deleted and re-created while running, then deleted and left missing
        shutil.rmtree(rig.inbox)
        rig.inbox.mkdir()
        drop(rig.inbox, "after-recreate.json", debate())
        rig.wait_finished(expected + 1, timeout=60)
        shutil.rmtree(rig.inbox)
        deadline = time.monotonic() + 30
        while not rig.inbox.is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rig.inbox.is_dir(), "the daemon re-creates a deleted inbox"
        drop(rig.inbox, "after-delete.json", debate())
        rig.wait_finished(expected + 2, timeout=60)
        assert {"after-recreate", "after-delete"} <= set(rig.results())
        assert proc.poll() is None
        events = [e["event"] for e in rig.events()]
        assert "inbox_file_ignored" in events
        table = os.environ.get("IHLD_BADINPUT_TABLE")
        if table:
            Path(table).write_text(_table(CORPUS, outcomes))
    finally:
        watch.close()
        for sock in _SOCKETS:
            sock.close()
        _SOCKETS.clear()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.parametrize(
    "count", [2000, pytest.param(10_000, marks=pytest.mark.slow)], ids=["2k", "10k"]
)
def test_thousands_of_files_at_once(
    sim_factory: Callable[..., Sim], rig_factory: Callable[..., DaemonRig], count: int
) -> None:
    """Thousands of one-stage jobs dropped at once: all claimed, all finish, the daemon stays up.

    10,000 (slow: about 50 s here, 200 files/s, one claim and one store row each) is the
    figure in RELIABILITY.md; 2,000 runs in ``make test``.
    """
    sim = sim_factory("instant", 1.0)
    rig = rig_factory(sim.url, slots=4)
    rig.inbox.mkdir(parents=True)
    proc = rig.start()
    rig.wait_ready()
    started = time.monotonic()
    tmp = rig.root / "staging"
    tmp.mkdir()
    for n in range(count):
        (tmp / f"f{n:05d}.json").write_text(prompt_job())
    for path in tmp.iterdir():  # a rename each: the inbox fills as fast as the disk allows
        path.rename(rig.inbox / path.name)
    rig.wait_finished(count, timeout=900)
    elapsed = time.monotonic() - started
    assert proc.poll() is None
    assert len(rig.results()) == count and not rig.failures()
    assert not any(rig.inbox.iterdir())
    print(f"{count} files: {elapsed:.1f} s, {count / elapsed:.0f} jobs/s")


def _setpriv() -> list[str]:
    """Run as root *without* CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: file modes apply."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's file-permission override")
    probe = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", "true"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode()[:200]}")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_unreadable_file_and_unwritable_spool(
    sim: Sim, rig_factory: Callable[..., DaemonRig], tmp_path: Path
) -> None:
    """Permissions, honestly: the daemon runs without root's override of file modes.

    Tests run as root here, and root reads anything. ``setpriv`` drops
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    daemon (still uid 0, the owner) is bound by the mode bits like any user.
    """
    prefix = _setpriv()
    rig = rig_factory(sim.url)
    env = {**os.environ}

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*prefix, *IHLD, "run", "--config", str(rig.config), *args],
            capture_output=True, timeout=60, cwd=REPO, env=env,
        )

    # 1. an unreadable job file: rejected as `unreadable`, kept, the daemon carries on
    rig.inbox.mkdir(parents=True)
    drop(rig.inbox, "secret.json", debate())
    (rig.inbox / "secret.json").chmod(0o000)
    drop(rig.inbox, "fine.json", debate())
    proc = subprocess.Popen(
        [*prefix, *IHLD, "run", "--config", str(rig.config)],
        stdout=subprocess.DEVNULL, stderr=open(rig.root / "daemon-0.stderr", "wb"),  # noqa: SIM115
        cwd=REPO,
    )
    rig.procs.append(proc)
    rig.wait_finished(2, timeout=60)
    failure = rig.failures()["secret"]
    assert failure["error"]["kind"] == "unreadable"
    assert "permission denied" in failure["error"]["message"]
    assert rig.results()["fine"]["status"] == "done"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    # 2. an outbox the daemon cannot write: refused at start-up, exit 2, the directory named
    outbox = rig.spool / "outbox"
    outbox.chmod(0o500)
    try:
        result = run()
    finally:
        outbox.chmod(0o750)
    assert result.returncode == 2, result.stderr.decode()[-2000:]
    message = result.stderr.decode()
    assert f"spool directory {outbox} is not readable and writable" in message
    assert "Traceback" not in message

    # 3. a spool root in which nothing can be created
    root = tmp_path / "locked"
    root.mkdir(mode=0o500)
    rig.config.write_text(rig.config.read_text().replace(str(rig.spool), str(root / "spool")))
    try:
        result = run()
    finally:
        root.chmod(0o700)
    assert result.returncode == 2
    message = result.stderr.decode()
    assert f"cannot create spool directory {root / 'spool'}: Permission denied" in message
    assert "Traceback" not in message
    if not prefix:
        print("not root: ran without setpriv", file=sys.stderr)


def test_spool_too_deep_for_the_control_socket_is_reported(
    sim: Sim, rig_factory: Callable[..., DaemonRig], tmp_path: Path
) -> None:
    """A unix socket path has 107 bytes at most: a clear start-up error, not a traceback."""
    rig = rig_factory(sim.url)
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "spool"
    deep.parent.mkdir(parents=True)
    rig.config.write_text(rig.config.read_text().replace(str(rig.spool), str(deep)))
    result = subprocess.run([*IHLD, "run", "--config", str(rig.config)],
                            capture_output=True, timeout=60, cwd=REPO)
    message = result.stderr.decode()
    assert result.returncode == 2, message[-2000:]
    assert "control socket path" in message and "shorter [spool] dir" in message
    assert "Traceback" not in message


# -- the fixes behind the corpus, one unit test each ------------------------------------------


def _intake(tmp_path: Path, resolver: Any = None) -> Any:

    from ihld.core.intake import Intake
    from ihld.core.jobs import StageSpec, resolve
    from ihld.core.spool import Spool
    from ihld.core.store import JobStore

    pipes = {"p": (StageSpec(name="a", model="m", prompt="x"),)}

    def default(spec: Any, job_id: str, source: dict[str, Any]) -> Any:
        return resolve(spec, job_id, pipelines=pipes, actor_models={"prompt": None},
                       source=source)

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return Intake(spool, JobStore(spool.store_path), resolver or default, max_bytes=100_000)


def _claim(intake: Any, name: str, data: bytes) -> Any:
    (intake.spool.inbox / name).write_bytes(data)
    entry = next(e for e in intake.spool.scan_inbox() if e.name == name)
    return intake.claim_and_read(entry)


def test_a_duplicate_never_takes_the_running_jobs_name(tmp_path: Path) -> None:
    """The bug: failed/<id>.json for the duplicate made recovery drop the original job."""
    intake = _intake(tmp_path)
    spool = intake.spool
    assert _claim(intake, "a.json", b'{"id":"x","pipeline":"p"}').accepted == ["x"]
    _claim(intake, "b.json", b'{"id":"x","pipeline":"p"}')
    assert not (spool.failed / "x.json").exists()
    assert json.loads((spool.failed / "x~2.json").read_text())["error"]["kind"] == "duplicate_id"
    assert intake.store.ids() == ["x"] and not spool.is_finished("x")
    # and a bare rejection record (an older spool, another path) is never taken for the job's end
    (spool.failed / "y.json").write_text(json.dumps({"id": "y", "status": "rejected"}))
    assert not spool.is_finished("y")
    (spool.failed / "z.json").write_text(json.dumps({"id": "z", "status": "failed"}))
    assert spool.is_finished("z")


def test_replaying_a_duplicate_writes_its_record_once(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    _claim(intake, "a.json", b'{"id":"x","pipeline":"p"}')
    path = intake.spool.claimed / "00000000000000000009.1.0--d.jsonl"
    data = b'{"id":"x","pipeline":"p"}\n{"id":"w","pipeline":"p"}\n{"id":"w","pipeline":"p"}\n'
    path.write_bytes(data)
    intake.process(path)
    path.write_bytes(data)  # a crash before the claim was released: the same file again
    replay = intake.process(path)
    assert replay.accepted == [] and replay.rejected == []
    names = sorted(p.name for p in intake.spool.failed.glob("*.json"))
    assert names == ["w~2.json", "x~2.json"]


def test_a_full_disk_during_intake_does_not_turn_jobs_into_duplicates(tmp_path: Path) -> None:
    from ihld.common import failpoints

    intake = _intake(tmp_path)
    failpoints.configure("store.intake_before_commit:enospc")
    try:
        with pytest.raises(OSError, match="No space left"):
            _claim(intake, "full.jsonl", b'{"id":"f1","pipeline":"p"}\n')
    finally:
        failpoints.configure("")
    [claimed] = intake.spool.claimed_files()
    result = intake.process(claimed)  # the retry once space is back
    assert result.accepted == ["f1"] and not result.rejected


def test_an_unforeseen_error_rejects_the_file_whole_instead_of_wedging_it(
    tmp_path: Path,
) -> None:
    def broken(spec: Any, job_id: str, source: dict[str, Any]) -> Any:
        raise RuntimeError("a plugin's pipeline table is broken")

    intake = _intake(tmp_path, broken)
    result = _claim(intake, "odd.jsonl", b'{"pipeline":"p"}\n')
    assert not intake.spool.claimed_files()
    record = json.loads((intake.spool.failed / "odd.json").read_text())
    assert record["error"]["kind"] == "intake_error"
    assert "RuntimeError" in record["error"]["message"]
    kept = intake.spool.root / record["source"]["kept_as"]
    assert kept.read_bytes() == b'{"pipeline":"p"}\n'
    assert result.accepted == []


def test_rejected_lines_keep_the_whole_file(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    big = json.dumps({"pipeline": "nope", "input": {"x": "y" * 10_000}})
    _claim(intake, "keep.jsonl", ('{"pipeline":"p"}\n' + big + "\n").encode())
    record = json.loads((intake.spool.failed / "keep.2.json").read_text())
    kept = intake.spool.root / record["source"]["kept_as"]
    assert big in kept.read_text()  # the error record's `raw` holds only 4 KiB of it


def test_non_utf8_names_are_recorded_as_valid_utf8(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    raw = os.fsencode(intake.spool.inbox) + b"/bad\xff.json"
    with open(raw, "wb") as fh:
        fh.write(b'{"pipeline":"p"}')
    entry = intake.spool.scan_inbox()[0]
    result = intake.claim_and_read(entry)
    [stored] = intake.store.load(result.accepted)
    assert stored.batch.file == "bad\\xff.json"
    (intake.spool.inbox / "x.json").symlink_to("/etc/passwd")
    os.symlink("/etc/passwd", os.fsencode(intake.spool.inbox) + b"/l\xfe.json")
    for entry in intake.spool.scan_inbox():
        intake.reject_entry(entry)
    files = sorted(json.loads(p.read_text())["source"]["file"]
                   for p in intake.spool.failed.glob("*.json"))
    assert files == ["l\\xfe.json", "x.json"]


def test_strict_json_refuses_overflow_and_huge_integers() -> None:
    from ihld.common import jsonsafe

    for text in ('{"a": 1e999}', '{"a": -1e400}', '{"a": ' + "7" * 4301 + "}"):
        with pytest.raises(jsonsafe.StrictJSONError):
            jsonsafe.loads(text)
    assert jsonsafe.loads('{"a": 1e308, "b": ' + "7" * 4300 + "}")["a"] == 1e308


def test_the_inflight_log_never_raises(tmp_path: Path) -> None:
    from ihld.core.inflight import InflightLog

    log = InflightLog(Path("/dev/full"))  # every write: ENOSPC
    log.started("j", "s")
    log.finished("j", "s")
    assert log.write_errors == 2
    log.close()
