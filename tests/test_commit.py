"""Group commit: batches are durable, ordered, never clobber results, and survive ENOSPC."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ihld.common import failpoints
from ihld.core.commit import GroupCommitter
from ihld.core.spool import Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


async def test_many_writes_share_batches_and_keep_order(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    committer.start()
    writes = [committer.checkpoint("j", {"n": n}) for n in range(50)]
    writes += [committer.checkpoint(f"k{n}", {"n": n}) for n in range(50)]
    await asyncio.gather(*writes)
    await committer.close()
    assert spool.load_checkpoint("j") == {"n": 49}  # the newest checkpoint wins
    assert len(spool.checkpoint_ids()) == 51
    assert committer.batches < committer.writes  # batched, not one flush each
    assert not [p for p in spool.jobs.iterdir() if p.name.startswith(".")]


async def test_results_never_overwrite_and_failures_get_free_names(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    committer.start()
    assert await committer.result("r", {"v": 1}) == spool.outbox / "r.json"
    assert await committer.result("r", {"v": 2}) is None
    assert json.loads((spool.outbox / "r.json").read_text()) == {"v": 1}
    first = await committer.failure("f", {"v": 1})
    second = await committer.failure("f", {"v": 2})
    assert (first, second) == (spool.failed / "f.json", spool.failed / "f~2.json")
    await committer.close()


async def test_a_full_disk_delays_writes_until_space_returns(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    committer.start()
    failpoints.configure("checkpoint.before_publish:enospc")
    try:
        write = asyncio.ensure_future(committer.checkpoint("j", {"n": 1}))
        await asyncio.sleep(0.2)
        assert not write.done() and committer.failures == 1
        assert not (spool.jobs / "j.json").exists()
        assert not list(spool.jobs.iterdir())  # nothing half-written is visible
    finally:
        failpoints.configure("")
    await asyncio.wait_for(write, 5)  # retried after the backoff, now succeeds
    assert spool.load_checkpoint("j") == {"n": 1}
    await committer.close()
