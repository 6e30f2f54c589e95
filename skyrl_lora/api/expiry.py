"""Checkpoints saved with ``ttl_seconds`` go away when they expire: from listings at once (queries
skip them), from disk and the database within moments, by one task that sleeps until the next
expiry. A save or a TTL change wakes it, so a short TTL is honoured without polling, and a restart
finds every expiry in the database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import delete, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from skyrl_lora.api.db import CheckpointRow, Database, now

logger = logging.getLogger(__name__)


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def has_expired(row: CheckpointRow) -> bool:
    """In Python what ``live()`` says in SQL: the checkpoint's TTL has run out."""
    return row.expires_at is not None and aware(row.expires_at) <= now()


def live(at: datetime | None = None) -> ColumnElement[bool]:
    """The SQL condition of a checkpoint that has not expired."""
    return or_(CheckpointRow.expires_at.is_(None), CheckpointRow.expires_at > (at or now()))


class CheckpointExpiry:
    def __init__(self, db: Database, remove_files: Callable[[CheckpointRow], Awaitable[None]], *,
                 idle_check_s: float = 300.0, retry_s: float = 30.0) -> None:
        self.db = db
        self.remove_files = remove_files
        self.idle_check_s = idle_check_s
        self.retry_s = retry_s
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="checkpoint-expiry")

    def wake(self) -> None:
        """An expiry was set or changed: look again now."""
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sweep(self) -> tuple[int, bool]:
        """Delete every expired checkpoint (files, then row). Returns how many, and whether all went."""
        expired = await self.db.run(lambda s: list(s.scalars(select(CheckpointRow).where(
            CheckpointRow.expires_at.is_not(None), CheckpointRow.expires_at <= now())).all()))
        removed, clean = 0, True
        for row in expired:
            try:
                await self.remove_files(row)
            except Exception:  # kept (hidden from listings); tried again later
                logger.exception("could not remove the files of expired checkpoint %s", row.tinker_path)
                clean = False
                continue
            gone = delete(CheckpointRow).where(CheckpointRow.tinker_path == row.tinker_path,
                                               CheckpointRow.expires_at <= now())  # not if its TTL was extended
            await self.db.execute(gone)
            removed += 1
        if removed:
            logger.info("removed %d expired checkpoints", removed)
        return removed, clean

    async def _next_expiry(self) -> datetime | None:
        found = await self.db.run(lambda s: s.scalar(select(func.min(CheckpointRow.expires_at))))
        return None if found is None else aware(found)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            delay = self.idle_check_s
            try:
                _, clean = await self.sweep()
                upcoming = await self._next_expiry()
                if not clean:
                    delay = self.retry_s
                elif upcoming is not None:
                    delay = min(self.idle_check_s, max(0.05, (upcoming - now()).total_seconds()))
            except Exception:  # the database may be briefly unavailable; serving must not stop for this
                logger.exception("checkpoint expiry sweep failed")
                delay = self.retry_s
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
