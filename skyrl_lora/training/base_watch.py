"""A colocated trainer follows its server across restarts.

The trainer's frozen base is a set of views into the server's GPU memory (``shared_base``). When
the server's process dies, Ray starts another one that loads the weights anew into other memory;
the old mapping then holds a dead process's copy (or nothing). So the trainer asks its server, once
a poll period, which run of the actor it is: on any sign that the run it mapped is gone it lets go
of the old memory at once (the new run needs the room), holds training calls, and builds the base
on the new run's weights as soon as that run's engine is up. Tenants' slots and optimizer states
are never touched, so training goes on where it stopped.

Only positive evidence counts: a probe that merely times out (a busy server) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.protocol import ServerIncarnation

logger = logging.getLogger(__name__)


class ServerDown(Exception):
    """Ray says the server's process is dead (it may be restarting)."""


class SharedBaseWatch:
    """State of one colocated trainer's base: which server run it maps (``incarnation``; None while
    released), and an event training calls wait on while there is none."""

    def __init__(self, server: str, incarnation: str | None, *, probe: Callable[[], Awaitable[ServerIncarnation]],
                 release: Callable[[], Awaitable[None]], reshare: Callable[[], Awaitable[str | None]],
                 poll_s: float, probe_timeout_s: float = 30.0) -> None:
        self.server = server
        self.incarnation = incarnation
        self.reshares = 0  # how often the base was built on a new run's weights
        self._probe, self._release, self._reshare = probe, release, reshare
        self.poll_s, self.probe_timeout_s = poll_s, probe_timeout_s
        self._ready = asyncio.Event()
        if incarnation is not None:
            self._ready.set()
        self._down_since: float | None = None
        self._last_failure: str | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout_s: float) -> None:
        """Return at once while the base is mapped; else wait for the restarted server, up to ``timeout_s``."""
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            raise SkyrlError(503, f"base_weights: the inference server '{self.server}' whose weights this trainer "
                                  f"builds on is restarting and was not back within {timeout_s:.0f} s; try again",
                             "base_weights") from None

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.poll_s)

    async def check(self) -> None:
        """One look at the server: release the base if the run it maps is gone, map the new run's weights
        once that run is up."""
        try:
            now: ServerIncarnation | None = await asyncio.wait_for(self._probe(), self.probe_timeout_s)
        except ServerDown as exc:
            now = None
            if self.incarnation is not None:
                logger.warning("the inference server '%s' is down (%s)", self.server, exc)
        except TimeoutError:
            return  # a busy server is not a restarted one
        if now is not None and now.incarnation == self.incarnation:
            return
        if self.incarnation is not None:
            logger.warning("the inference server '%s' restarted: releasing its old weights; training waits for the "
                           "new run's", self.server)
            self._ready.clear()
            self._down_since = time.monotonic()
            await self._release()
            self.incarnation = None
        if now is None or not now.started:
            return
        try:
            mapped = await self._reshare()
        except Exception as exc:  # said once per distinct reason; the next poll tries again
            if str(exc) != self._last_failure:
                logger.warning("sharing the restarted server '%s' weights failed (%s); trying again", self.server, exc)
                self._last_failure = str(exc)
            return
        self.incarnation, self._last_failure = mapped, None
        self.reshares += 1
        self._ready.set()
        down = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        logger.info("the base is on the restarted server '%s' weights (run %s), %.1f s after it went down",
                    self.server, mapped, down)
