"""``X-Idempotency-Key``: a POST the SDK sends again is applied once.

The SDK resends a POST with the same key after a timeout, a dropped connection or a 408/409/429/5xx.
Without this, the retry of a ``forward_backward`` whose first answer was lost ran a second time on
the tenant's weights. Now the first request's reply (the future it started) is kept per user and
key: the retry gets that reply, the same key with another route or body gets a 409. Replies are
committed before they are sent, so a retry after an API restart finds them too; they are kept as
long as futures are (a retry is pointless once its future is gone).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from sqlalchemy import CursorResult, Table, delete, insert

from skyrl_lora.api.db import Database, IdempotencyRow, now
from skyrl_lora.errors import SkyrlError

logger = logging.getLogger(__name__)
HEADER = "x-idempotency-key"
MAX_KEY_LENGTH = 256
_INSERT = insert(cast(Table, IdempotencyRow.__table__))
Reply = TypeVar("Reply", bound=BaseModel)


def fingerprint(route: str, body: bytes) -> str:
    return hashlib.sha256(route.encode() + b"\0" + body).hexdigest()


class IdempotencyKeys:
    def __init__(self, db: Database) -> None:
        self.db = db
        # requests whose first copy is still being submitted: a concurrent retry waits for its reply
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Future[dict[str, Any]]]] = {}

    async def once(self, user: str, key: str | None, route: str, body: bytes,
                   submit: Callable[[], Awaitable[Reply]], reply_type: type[Reply]) -> Reply:
        """``submit()``'s reply, or the reply the first request under ``key`` got."""
        if not key:
            return await submit()
        if len(key) > MAX_KEY_LENGTH:
            raise SkyrlError(400, f"X-Idempotency-Key: over {MAX_KEY_LENGTH} characters", "X-Idempotency-Key")
        print_ = fingerprint(route, body)
        slot = (user, key)
        running = self._inflight.get(slot)
        if running is not None:
            self._same_request(key, running[0], print_)
            return reply_type.model_validate(await asyncio.shield(running[1]))
        # claimed before the first await, so a copy arriving meanwhile waits for this one
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = (print_, done)
        try:
            row = await self.db.run(lambda s: s.get(IdempotencyRow, slot))
            if row is not None:
                self._same_request(key, row.fingerprint, print_)
                done.set_result(row.response)
                return reply_type.model_validate(row.response)
            reply = await submit()
            payload = reply.model_dump(mode="json")
            await self.db.write(_INSERT, {"user_id": user, "key": key, "fingerprint": print_, "response": payload,
                                          "created": now()})
            done.set_result(payload)
            return reply
        except BaseException as exc:  # a failed submit is not remembered: its retry runs afresh
            if not done.done():
                done.set_exception(exc)
                done.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[slot]

    @staticmethod
    def _same_request(key: str, first: str, this: str) -> None:
        if first != this:
            raise SkyrlError(409, f"X-Idempotency-Key: '{key}' was used for another request (another route or "
                                  "body); use a new key", "X-Idempotency-Key")

    async def prune(self, before: datetime) -> int:
        stmt = delete(IdempotencyRow).where(IdempotencyRow.created < before)
        return await self.db.run(lambda s: int(cast(CursorResult[Any], s.execute(stmt)).rowcount or 0))
