"""Two daemons sharing one spool (as over NFS): each file is claimed once, each job ends once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DaemonRig, SimProcess, drop


def node_rig(root: Path, spool: Path, url: str, node: str) -> DaemonRig:
    root.mkdir()
    config = root / "ihld.toml"
    config.write_text(
        f'[spool]\ndir = "{spool}"\nnode = "{node}"\nsettle_s = 0.05\nrescan_s = 0.2\n\n'
        f'[[backends]]\nname = "sim"\nurl = "{url}"\nslots = 2\nmax_loaded = 2\n\n'
        "[log]\nstderr = true\n\n[control]\ngrace_s = 5\n"
    )
    return DaemonRig(root, config)


def test_two_nodes_share_a_spool(sim_factory: Callable[..., SimProcess], tmp_path: Path) -> None:
    sim = sim_factory("laptop-6gb-4slot", 400.0)
    spool = tmp_path / "shared"
    rigs = [node_rig(tmp_path / n, spool, sim.url, n) for n in ("a", "b")]
    try:
        for rig in rigs:
            rig.start()
        for rig in rigs:
            deadline = time.monotonic() + 20
            while not (spool / "run" / rig.root.name / "ihld.sock").exists():
                assert time.monotonic() < deadline, rig.stderr()
                time.sleep(0.05)
        inbox = spool / "inbox"
        for n in range(80):
            job = {"id": f"j{n:03d}", "pipeline": "debate", "input": {"topic": str(n)}}
            drop(inbox, f"j{n:03d}.json", json.dumps(job))
        # the same id from two files at once: one result, one duplicate record
        drop(
            inbox,
            "dup1.json",
            json.dumps({"id": "dup", "pipeline": "debate", "input": {"topic": "d"}}),
        )
        drop(
            inbox,
            "dup2.json",
            json.dumps({"id": "dup", "pipeline": "debate", "input": {"topic": "d"}}),
        )
        deadline = time.monotonic() + 90
        outbox, failed = spool / "outbox", spool / "failed"
        while time.monotonic() < deadline:
            done = {p.stem for p in outbox.glob("*.json")}
            bad = [p.stem for p in failed.glob("*.json")]
            if len(done) + len(bad) >= 82:
                break
            time.sleep(0.1)
    finally:
        for rig in rigs:
            rig.stop_all()
    done = {p.stem for p in outbox.glob("*.json")}
    assert done == {f"j{n:03d}" for n in range(80)} | {"dup"}
    (dup_record,) = [json.loads(p.read_text()) for p in failed.glob("dup*.json")]
    assert dup_record["error"]["kind"] == "duplicate_id"
    # every file was claimed by exactly one node: a job_claimed, or (the second "dup" on
    # the same node) a job_rejected at intake
    claimed_by = {
        rig.root.name: sum(
            1
            for e in (spool / "log" / f"ihld-{rig.root.name}.jsonl").read_text().splitlines()
            if '"job_claimed"' in e or '"job_rejected"' in e
        )
        for rig in rigs
    }
    assert all(count > 0 for count in claimed_by.values()), claimed_by
    assert sum(claimed_by.values()) == 82
