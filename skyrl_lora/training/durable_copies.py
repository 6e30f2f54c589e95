"""The durable copies of published versions, written after ``save_weights_for_sampler`` has returned.

A version reaches the servers from shared memory (or the trainer's GPU memory); the copy in
``sampler_root`` is what a tinker:// path names and what a restarted server reloads. Writing it was
the longest part of the call: an 8B rank-32 version took 167 ms from save to return on the H200, the
servers having flipped after 48 ms (``bench/results/h200-2026-12-02-s20``). Issue 16 asks that such
files never sit on the sync's path, so they are written here, on a thread, while the caller goes on;
whoever reads a durable path (a snapshot sampler loading it, a deletion) waits for it first
(:meth:`DurableCopies.wait`). One tenant's copies are written in order, so pruning keeps the newest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from skyrl_lora.errors import SkyrlError

logger = logging.getLogger(__name__)


class DurableCopies:
    """Copies being written, by durable path; lives on the trainer actor's event loop."""

    def __init__(self) -> None:
        self._pending: dict[Path, asyncio.Task[Path]] = {}
        self._last_of_tenant: dict[str, asyncio.Task[Path]] = {}
        self._failed: dict[Path, str] = {}

    def start(self, tenant: str, path: Path, write: Callable[[], Path]) -> asyncio.Task[Path]:
        """Write ``path`` with ``write`` on a thread, after the tenant's earlier copies."""
        before = self._last_of_tenant.get(tenant)

        async def run() -> Path:
            if before is not None:
                await asyncio.wait([before])  # its outcome is its own; only the order matters here
            return await asyncio.to_thread(write)

        task = asyncio.get_running_loop().create_task(run(), name=f"durable-copy-{tenant}")
        self._pending[path] = task
        self._last_of_tenant[tenant] = task
        task.add_done_callback(lambda t: self._done(tenant, path, t))
        return task

    def _done(self, tenant: str, path: Path, task: asyncio.Task[Path]) -> None:
        if self._pending.get(path) is task:
            del self._pending[path]
        if self._last_of_tenant.get(tenant) is task:
            del self._last_of_tenant[tenant]
        if task.cancelled():
            self._failed[path] = "cancelled"
        elif task.exception() is not None:
            exc = task.exception()
            self._failed[path] = f"{type(exc).__name__}: {exc}"
            logger.error("the durable copy %s failed: %s", path, self._failed[path])

    async def wait(self, path: str | Path) -> None:
        """Return once ``path``'s copy is written (at once where none is pending); a 500 naming the
        path where writing it failed."""
        key = Path(path)
        task = self._pending.get(key)
        if task is not None:
            await asyncio.wait([task])
        if key in self._failed:
            raise SkyrlError(500, f"path: the durable copy of '{key.name}' could not be written ({self._failed[key]})",
                             "path")

    async def wait_tenant(self, tenant: str) -> None:
        """Return once every copy of ``tenant`` started so far is written or has failed."""
        task = self._last_of_tenant.get(tenant)
        if task is not None:
            await asyncio.wait([task])

    async def drain(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending.values()))

    def forget(self, path: str | Path) -> None:
        """Drop a failure record (the path was deleted)."""
        self._failed.pop(Path(path), None)

    @property
    def pending(self) -> int:
        return len(self._pending)
