"""Tinker's future pattern: work routes answer with a request id at once; results are polled.

A future's result (JSON or protobuf bytes) or its failure is written to the database, so a finished
future survives a restart; one still running at a restart is reported failed (see ``Database``).
Polls long-wait on an event for a while before answering ``try_again``, so clients poll gently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import LRUCache
from sqlalchemy import insert, update

from skyrl_lora.api.db import Database, FutureRow, now
from skyrl_lora.errors import SkyrlError

logger = logging.getLogger(__name__)
_FUTURES = FutureRow.__table__  # Core statements: the ORM's per-statement bookkeeping is not needed here


@dataclass(frozen=True)
class Result:
    content_type: str
    body: bytes


def _try_again(request_id: str) -> dict:
    return {"type": "try_again", "request_id": request_id, "queue_state": "active"}


def json_result(payload: dict) -> Result:
    return Result("application/json", json.dumps(payload).encode())


class Futures:
    def __init__(self, db: Database, *, long_poll_s: float = 10.0) -> None:
        self.db = db
        self.long_poll_s = long_poll_s
        self._done: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()
        # This process's futures, so polls need no database read; the database is the durable copy
        # (it answers for futures of an earlier process, after a restart).
        self._live: LRUCache = LRUCache(maxsize=100_000)  # request_id -> (user, outcome or None)

    async def submit(self, user: str, kind: str, model_id: str | None, work: Callable[[], Awaitable[Result]]) -> str:
        request_id = f"req-{uuid.uuid4().hex}"
        await self.db.write(insert(_FUTURES).values(request_id=request_id, user_id=user, kind=kind, model_id=model_id,
                                                     state="pending", created=now()))
        self._done[request_id] = asyncio.Event()
        self._live[request_id] = (user, None)
        task = asyncio.create_task(self._run(request_id, user, kind, work), name=f"future-{kind}-{request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return request_id

    async def _run(self, request_id: str, user: str, kind: str, work: Callable[[], Awaitable[Result]]) -> None:
        state, result, error, category = "complete", None, None, None
        try:
            result = await work()
        except SkyrlError as exc:
            state, category = "failed", ("user" if exc.status < 500 else "server")
            error = exc.message
        except Exception as exc:  # any other failure is the server's, reported with its cause
            logger.exception("future %s (%s) failed", request_id, kind)
            state, category, error = "failed", "server", f"{type(exc).__name__}: {exc}"

        values: dict = {"state": state, "finished": now()}
        if result is not None:
            values.update(content_type=result.content_type, result=result.body)
        if error is not None:
            values.update(error=error, category=category)
        await self.db.write(update(_FUTURES).where(_FUTURES.c.request_id == request_id).values(**values))
        self._live[request_id] = (user, result if result is not None else {"error": error, "category": category})
        self._done.pop(request_id, asyncio.Event()).set()

    async def retrieve(self, user: str, request_id: str) -> Result | dict:
        """The result, a failure ``{"error", "category"}``, or ``{"type": "try_again"}`` after a long poll."""
        live = self._live.get(request_id)
        if live is not None:
            owner, outcome = live
            if owner != user:
                raise SkyrlError(404, f"request_id: no future '{request_id}'", "request_id")
            if outcome is None:
                if not await self._wait(request_id):
                    return _try_again(request_id)
                outcome = self._live[request_id][1]
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

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
