"""Tinker's future pattern: work routes answer with a request id at once; results are polled.

A future's result (JSON or protobuf bytes) or its failure is written to the database, so a finished
future survives a restart; one still running at a restart is reported failed (see ``Database``).
Polls long-wait on an event for a while before answering ``try_again``, so clients poll gently.
Finished futures are kept for ``retention_s`` (every sample's result is a row; without a bound the
database would grow with the sampling traffic forever), then forgotten: a poll for one is a 404.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from cachetools import TTLCache
from sqlalchemy import CursorResult, Table, bindparam, delete, insert, update

from skyrl_lora.api.db import Database, FutureRow, now
from skyrl_lora.errors import SkyrlError

logger = logging.getLogger(__name__)
_FUTURES = cast(Table, FutureRow.__table__)
# Prepared once: the database batches rows of the same statement into one executemany.
_INSERT = insert(_FUTURES)
_FINISH = update(_FUTURES).where(_FUTURES.c.request_id == bindparam("rid"))  # SET: the parameters' column names


@dataclass(frozen=True)
class Result:
    content_type: str
    body: bytes


Outcome = Result | dict[str, Any]  # a result, or a failure {"error", "category"}


def _try_again(request_id: str) -> dict[str, Any]:
    return {"type": "try_again", "request_id": request_id, "queue_state": "active"}


def json_result(payload: dict[str, Any]) -> Result:
    return Result("application/json", json.dumps(payload).encode())


class Futures:
    def __init__(self, db: Database, *, long_poll_s: float = 10.0, retention_s: float = 3600.0,
                 also_prune: Sequence[Callable[[datetime], Awaitable[int]]] = ()) -> None:
        self.db = db
        self._also_prune = list(also_prune)  # records kept exactly as long as futures (idempotency keys)
        self.long_poll_s = long_poll_s
        self.retention_s = retention_s
        self._done: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._working: set[asyncio.Task[Any]] = set()  # still running their work (not yet writing the outcome)
        self._pruner: asyncio.Task[None] | None = None
        # Recent futures of this process, so polls need no database read (a result is nearly always
        # fetched right after it finishes). The database is the durable copy: it answers for anything
        # evicted here and for futures of an earlier process, after a restart.
        # id -> (user, outcome or None while running)
        self._live: TTLCache[str, tuple[str, Outcome | None]] = TTLCache(maxsize=10_000, ttl=min(retention_s, 600.0))
        # Ids need to be unique, not secret (a future is only served to its owner): a random process
        # prefix and a counter cost nothing per request, unlike a uuid4's system call.
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count()

    def new_id(self, kind: str) -> str:
        return f"{kind}-{self._prefix}-{next(self._counter):x}"

    async def submit(self, user: str, kind: str, model_id: str | None, work: Callable[[], Awaitable[Result]]) -> str:
        """Start ``work`` and return its future's id once the future's row is committed.

        The work starts while the row is being written, so a sample's inference does not wait for a commit.
        """
        if self._pruner is None:
            self._pruner = asyncio.create_task(self._prune_forever(), name="futures-retention")
        request_id = self.new_id("req")
        self._done[request_id] = asyncio.Event()
        self._live[request_id] = (user, None)
        inserted = asyncio.ensure_future(self.db.write(_INSERT, {
            "request_id": request_id, "user_id": user, "kind": kind, "model_id": model_id, "state": "pending",
            "created": now()}))
        task = asyncio.create_task(self._run(request_id, user, kind, work, inserted), name=f"future-{kind}-{request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await inserted
        except BaseException:  # no durable row, no future: the caller gets the error, the work stops
            task.cancel()
            self._live.pop(request_id, None)
            self._done.pop(request_id, None)
            raise
        return request_id

    async def _run(self, request_id: str, user: str, kind: str, work: Callable[[], Awaitable[Result]],
                   inserted: asyncio.Future[None]) -> None:
        state, error, category = "complete", None, None
        result: Result | None = None
        me = asyncio.current_task()
        assert me is not None  # this runs as a task
        self._working.add(me)
        try:
            result = await work()
        except SkyrlError as exc:
            state, category = "failed", ("user" if exc.status < 500 else "server")
            error = exc.message
        except Exception as exc:  # any other failure is the server's, reported with its cause
            logger.exception("future %s (%s) failed", request_id, kind)
            state, category, error = "failed", "server", f"{type(exc).__name__}: {exc}"
        finally:
            self._working.discard(me)

        # Answer the waiting poll first, then write the durable copy: the result does not wait for a
        # commit (under load that wait was a commit or two per sample). A crash in between leaves the
        # row pending, so after a restart a poll is told "failed" for a result the client may already hold.
        self._live[request_id] = (user, result if result is not None else {"error": error, "category": category})
        event = self._done.pop(request_id, None)
        if event is not None:
            event.set()
        await inserted  # the outcome's UPDATE must follow the row's INSERT
        await self.db.write(_FINISH, {
            "rid": request_id, "state": state, "finished": now(), "error": error, "category": category,
            "content_type": None if result is None else result.content_type, "result": None if result is None else result.body})

    async def retrieve(self, user: str, request_id: str) -> Outcome:
        """The result, a failure ``{"error", "category"}``, or ``{"type": "try_again"}`` after a long poll."""
        live = self._live.get(request_id)
        if live is not None:
            owner, outcome = live
            if owner != user:
                raise SkyrlError(404, f"request_id: no future '{request_id}'", "request_id")
            if outcome is None:
                if not await self._wait(request_id):
                    return _try_again(request_id)
                entry = self._live.get(request_id)  # None if evicted meanwhile: the database answers
                outcome = entry[1] if entry is not None else None
            if outcome is not None:
                return outcome
        row = await self._get(user, request_id)
        if row.state == "pending":
            if not await self._wait(request_id):
                return _try_again(request_id)
            row = await self._get(user, request_id)
            if row.state == "pending":
                return _try_again(request_id)
        if row.state == "failed":
            message = row.error or "failed"
            try:
                message = json.loads(message)["error"]
            except (ValueError, TypeError, KeyError):
                pass
            return {"error": message, "category": row.category or "unknown"}
        return Result(row.content_type or "application/json", row.result or b"{}")

    async def _wait(self, request_id: str) -> bool:
        """Long poll: False if the future is still running after ``long_poll_s``."""
        event = self._done.get(request_id)
        if event is None:
            return True
        try:
            await asyncio.wait_for(event.wait(), self.long_poll_s)
        except TimeoutError:
            return False
        return True

    async def _get(self, user: str, request_id: str) -> FutureRow:
        row = await self.db.run(lambda s: s.get(FutureRow, request_id))
        if row is None or row.user_id != user:  # another tenant's future does not exist for you
            raise SkyrlError(404, f"request_id: no future '{request_id}'", "request_id")
        return row

    async def prune(self, finished_before: datetime) -> int:
        """Forget futures that finished before ``finished_before``; running ones are kept. Returns how many."""
        stmt = delete(_FUTURES).where(_FUTURES.c.state != "pending", _FUTURES.c.finished < finished_before)
        return await self.db.run(lambda s: int(cast(CursorResult[Any], s.execute(stmt)).rowcount or 0))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.retention_s / 4, 300.0))
            try:
                cutoff = now() - timedelta(seconds=self.retention_s)
                removed = await self.prune(cutoff)
                for prune in self._also_prune:
                    await prune(cutoff)
                if removed:
                    logger.info("forgot %d futures finished over %.0f s ago", removed, self.retention_s)
            except Exception:  # the next round tries again; serving must not stop for this
                logger.exception("pruning old futures failed")

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop running work (its rows stay pending: failed at the next start); finished outcomes are written."""
        if self._pruner is not None:
            self._pruner.cancel()
        for task in list(self._working):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
