"""Group commit: batches are durable, ordered, never clobber results, and survive ENOSPC."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ihld.common import failpoints
from ihld.core.commit import GroupCommitter
from ihld.core.jobs import StageSpec
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.core.storerows import NewJob
from ihld.core.storeview import read_progress

STAGES = (StageSpec(name="a", model="m", needs=()),)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


@pytest.fixture
def store(spool: Spool) -> JobStore:
    return JobStore(spool.store_path)


def queued(store: JobStore, *ids: str) -> None:
    batch = store.batch("claim.jsonl", "f.jsonl")
    jobs = [NewJob(i, None, 0, STAGES, None, None, None, "{}") for i in ids]
    store.add(batch, jobs, recorded=len(ids), done=True)


async def test_many_writes_share_batches_and_keep_order(spool: Spool, store: JobStore) -> None:
    queued(store, "j", *(f"k{n}" for n in range(50)))
    committer = GroupCommitter(spool, store)
    committer.start()
    writes = [committer.checkpoint("j", {"n": n}) for n in range(50)]
    writes += [committer.checkpoint(f"k{n}", {"n": n}) for n in range(50)]
    await asyncio.gather(*writes)
    await committer.close()
    progress = read_progress(spool.store_path)
    assert progress["j"] == {"n": 49}  # the newest checkpoint wins
    assert len(progress) == 51
    assert committer.batches < committer.writes  # batched, not one flush each


async def test_a_drop_follows_the_final_record(spool: Spool, store: JobStore) -> None:
    queued(store, "j")
    committer = GroupCommitter(spool, store)
    committer.start()
    await committer.checkpoint("j", {"n": 1})
    await committer.final("j", {"id": "j", "job": {"source": {}}}, failed=False)
    committer.drop("j")
    await committer.close()
    assert (spool.outbox / "j.json").exists() and store.ids() == []


async def test_results_never_overwrite_and_failures_get_free_names(
    spool: Spool, store: JobStore
) -> None:
    committer = GroupCommitter(spool, store)
    committer.start()
    assert await committer.result("r", {"v": 1}) == spool.outbox / "r.json"
    assert await committer.result("r", {"v": 2}) is None
    assert json.loads((spool.outbox / "r.json").read_text()) == {"v": 1}
    first = await committer.failure("f", {"v": 1})
    second = await committer.failure("f", {"v": 2})
    assert (first, second) == (spool.failed / "f.json", spool.failed / "f~2.json")
    await committer.close()


async def test_a_full_disk_delays_writes_until_space_returns(
    spool: Spool, store: JobStore
) -> None:
    queued(store, "j")
    committer = GroupCommitter(spool, store)
    committer.start()
    failpoints.configure("checkpoint.before_publish:enospc")
    try:
        write = asyncio.ensure_future(committer.checkpoint("j", {"n": 1}))
        while committer.failures == 0:  # noqa: ASYNC110 - the first attempt fails
            await asyncio.sleep(0.01)
        assert not write.done()
        assert read_progress(spool.store_path) == {}  # rolled back: nothing half-written
    finally:
        failpoints.configure("")
    await asyncio.wait_for(write, 30)  # retried after the backoff, now succeeds
    assert read_progress(spool.store_path) == {"j": {"n": 1}}
    await committer.close()
