"""The daemon against an OpenAI-compatible server (the simulator's /v1 endpoints)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, debate_lines, drop


def test_debates_through_an_openai_compatible_backend(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory(speed=300.0)
    rig = rig_factory(sim.url, backend_extra='kind = "openai"\n')
    drop(rig.inbox, "batch.jsonl", debate_lines(12))
    proc = subprocess.run([*IHLD, "run", "--once", "--config", str(rig.config)],
                          capture_output=True, timeout=90, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = rig.results()
    assert len(results) == 12 and not rig.failures()
    for result in results.values():
        for stage in result["stages"]:
            assert stage["eval_count"] > 0 and stage["prompt_eval_count"] > 0
        assert result["stages"][2]["output"]["winner"] in ("proposer", "critic")
    # grouped by model even without load control: few model switches on the server
    assert sim.loads() <= 4
