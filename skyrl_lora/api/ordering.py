"""Per-model ordering of training requests by ``seq_id``, as the Tinker SDK assumes.

The SDK sends a forward_backward's chunks in parallel (first chunk last) and expects the server to
run one model's requests in seq_id order. A request waits for its turn, bounded: if an earlier
seq_id never arrives (its client died), the wait times out and the request runs anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

logger = logging.getLogger(__name__)


class ModelSequencer:
    def __init__(self, *, turn_timeout_s: float = 120.0,
                 persist: Callable[[str, int], Awaitable[None]] | None = None) -> None:
        self.turn_timeout_s = turn_timeout_s
        self._next: dict[str, int] = {}
        self._cond: dict[str, asyncio.Condition] = {}
        self._persist = persist

    def start(self, model_id: str, next_seq: int) -> None:
        """Where a model's sequence stands (1 after creation, or as saved before a restart)."""
        self._next[model_id] = next_seq
        self._cond.setdefault(model_id, asyncio.Condition())

    def known(self, model_id: str) -> bool:
        return model_id in self._next

    @contextlib.asynccontextmanager
    async def turn(self, model_id: str, seq_id: int | None) -> AsyncIterator[None]:
        if seq_id is None or model_id not in self._next:
            yield
            return
        cond = self._cond[model_id]
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self._next[model_id] >= seq_id), self.turn_timeout_s)
            except TimeoutError:
                logger.warning("model %s: seq_id %d waited %.0f s for seq_id %d; running it anyway",
                               model_id, seq_id, self.turn_timeout_s, self._next[model_id])
        try:
            yield
        finally:
            async with cond:
                self._next[model_id] = max(self._next[model_id], seq_id + 1)
                cond.notify_all()
            if self._persist is not None:
                await self._persist(model_id, self._next[model_id])
