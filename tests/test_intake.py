"""Intake: every entry of a claimed file becomes a job in the store or a failed/ record, once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ihld.core.intake import Intake
from ihld.core.jobs import Job, JobSpec, StageSpec, resolve
from ihld.core.spool import Spool
from ihld.core.store import JobStore

PIPE = {"p": (StageSpec(name="a", model="m", prompt="x"),)}


def resolver(spec: JobSpec, job_id: str, source: dict[str, Any]) -> Job:
    return resolve(spec, job_id, pipelines=PIPE, actor_models={"prompt": None}, source=source)


@pytest.fixture
def intake(tmp_path: Path) -> Intake:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return Intake(spool, JobStore(spool.store_path), resolver, max_bytes=10_000)


def drop(intake: Intake, name: str, data: bytes) -> Any:
    (intake.spool.inbox / name).write_bytes(data)
    entry = next(e for e in intake.spool.scan_inbox() if e.name == name)
    return intake.claim_and_read(entry)


def failed(intake: Intake) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in intake.spool.failed.glob("*.json")}


def test_jsonl_with_one_bad_line(intake: Intake) -> None:
    result = drop(intake, "b.jsonl", b'{"pipeline":"p"}\n{"pipeline":"zz"}\n{"pipeline":"p"}\n')
    assert result.accepted == ["b.1", "b.3"]
    record = failed(intake)["b.2.json"]
    assert record["error"]["kind"] == "unknown_pipeline"
    assert record["source"]["line"] == 2 and record["source"]["file"] == "b.jsonl"
    assert intake.store.ids() == ["b.1", "b.3"]
    assert not intake.spool.claimed_files()


def test_malformed_file_is_kept_with_its_bytes(intake: Intake) -> None:
    result = drop(intake, "bad.json", b'{"pipeline": ')
    assert not result.accepted
    record = failed(intake)["bad.json"]
    assert record["error"]["kind"] == "invalid_json"
    kept = intake.spool.root / record["source"]["kept_as"]
    assert kept.read_bytes() == b'{"pipeline": '


def test_duplicate_ids_in_file_and_across_files(intake: Intake) -> None:
    drop(intake, "one.jsonl", b'{"id":"x","pipeline":"p"}\n{"id":"x","pipeline":"p"}\n')
    drop(intake, "two.json", b'{"id":"x","pipeline":"p"}')
    records = failed(intake)
    kinds = sorted(r["error"]["kind"] for r in records.values())
    assert kinds == ["duplicate_id", "duplicate_id"]
    assert intake.store.ids() == ["x"]


def test_replaying_a_claim_after_a_crash_is_idempotent(intake: Intake) -> None:
    path = intake.spool.claimed / "00000000000000000001.1.0--r.jsonl"
    path.write_bytes(b'{"pipeline":"p"}\n{"pipeline":"nope"}\n')
    # simulate a crash after the first job was stored: copy the claim and replay it
    saved = path.read_bytes()
    first = intake.process(path)
    path.write_bytes(saved)
    second = intake.process(path)
    assert first.accepted == ["r.1"]
    assert second.accepted == [] and second.rejected == []
    assert list(failed(intake)) == ["r.2.json"]


def test_oversized_file(intake: Intake) -> None:
    drop(intake, "big.json", b" " * 20_000)
    assert failed(intake)["big.json"]["error"]["kind"] == "too_large"


def test_symlink_in_inbox_is_moved_aside_unfollowed(intake: Intake, tmp_path: Path) -> None:
    target = tmp_path / "outside.json"
    target.write_text('{"pipeline":"p"}')
    (intake.spool.inbox / "ln.json").symlink_to(target)
    entry = intake.spool.scan_inbox()[0]
    record = intake.reject_entry(entry)
    assert record is not None and record["error"]["kind"] == "symlink"
    assert target.read_text() == '{"pipeline":"p"}'  # untouched
    assert not (intake.spool.inbox / "ln.json").exists()
