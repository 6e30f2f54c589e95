"""Futures on a real SQLite database: group-committed rows, answers after a restart, retention, owners.

Pure asyncio + SQLAlchemy (no Ray, no vLLM): the service's future store on its own.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from skyrl_lora.api.db import Database, FutureRow, now
from skyrl_lora.api.futures import Futures, Result, json_result
from skyrl_lora.errors import SkyrlError


async def _settled(futures: Futures) -> None:
    await asyncio.wait_for(asyncio.gather(*futures._tasks), timeout=30)


def test_concurrent_futures_are_durable_and_answer_after_a_restart(db_url: str) -> None:
    async def scenario() -> None:
        db = Database(db_url)
        futures = Futures(db)

        async def ok(i: int) -> Result:
            await asyncio.sleep(0)
            return json_result({"i": i})

        async def broken() -> Result:
            raise SkyrlError(400, "prompt: no tokens", "prompt")

        ids = await asyncio.gather(*(futures.submit("alice", "Sample", None, lambda i=i: ok(i)) for i in range(200)))
        bad = await futures.submit("alice", "Sample", None, broken)
        await _settled(futures)
        assert len(set(ids)) == 200
        states = db.run_sync(lambda s: {r.request_id: r.state for r in s.query(FutureRow)})
        assert all(states[i] == "complete" for i in ids) and states[bad] == "failed"

        restarted = Futures(db)  # a new process: nothing in memory, the database answers
        out = await restarted.retrieve("alice", ids[17])
        assert isinstance(out, Result) and out.body == b'{"i": 17}'
        assert await restarted.retrieve("alice", bad) == {"error": "prompt: no tokens", "category": "user"}
        with pytest.raises(SkyrlError) as err:
            await restarted.retrieve("bob", ids[17])  # another tenant's future does not exist for bob
        assert err.value.status == 404 and err.value.field == "request_id"
        await futures.close()
        db.close()

    asyncio.run(scenario())


def test_retention_forgets_finished_futures_and_keeps_running_ones(db_url: str) -> None:
    async def scenario() -> None:
        db = Database(db_url)
        futures = Futures(db, long_poll_s=0.05)
        release = asyncio.Event()

        async def slow() -> Result:
            await release.wait()
            return json_result({"slow": True})

        done = await futures.submit("alice", "Sample", None, lambda: asyncio.sleep(0, json_result({})))
        running = await futures.submit("alice", "ForwardBackward", "m", slow)
        deadline = asyncio.get_running_loop().time() + 30
        while db.run_sync(lambda s: s.get(FutureRow, done).state) == "pending":
            assert asyncio.get_running_loop().time() < deadline, "the finished future's row was never written"
            await asyncio.sleep(0.01)

        assert await futures.prune(now() - timedelta(hours=1)) == 0  # finished just now: kept
        assert await futures.prune(now() + timedelta(seconds=1)) == 1  # only the finished one goes
        fresh = Futures(db, long_poll_s=0.05)
        with pytest.raises(SkyrlError) as err:
            await fresh.retrieve("alice", done)
        assert err.value.status == 404
        assert (await fresh.retrieve("alice", running))["type"] == "try_again"
        release.set()
        await _settled(futures)
        out = await futures.retrieve("alice", running)
        assert isinstance(out, Result) and out.body == b'{"slow": true}'
        await futures.close()
        db.close()

    asyncio.run(scenario())


def test_close_writes_answered_outcomes_and_leaves_running_work_to_fail(db_url: str) -> None:
    async def scenario() -> None:
        db = Database(db_url)
        futures = Futures(db)
        never = asyncio.Event()

        async def stuck() -> Result:
            await never.wait()
            return json_result({})

        quick = await futures.submit("alice", "Sample", None, lambda: asyncio.sleep(0, json_result({"ok": 1})))
        running = await futures.submit("alice", "ForwardBackward", "m", stuck)
        answered = await asyncio.wait_for(futures.retrieve("alice", quick), timeout=10)  # from memory
        assert isinstance(answered, Result)
        await futures.close()  # at once: the quick outcome may not be committed yet
        assert db.fail_unfinished_futures() == 1  # what a restart does: only the running one was unfinished
        restarted = Futures(db)
        assert (await restarted.retrieve("alice", quick)).body == b'{"ok": 1}'
        failed = await restarted.retrieve("alice", running)
        assert failed["category"] == "server" and "restarted" in failed["error"]
        db.close()

    asyncio.run(scenario())
