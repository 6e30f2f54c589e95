"""Per-LoRA pause gates with owners and leases, living in the server's event loop.

The gate sits in the server, not in a client: any number of clients in any number of processes see
the same pause. Each pause is held by an owner under a lease, so a trainer that dies mid-sync cannot
leave a tenant frozen: when its lease runs out the owner is dropped and, once no owner is left, the
gate reopens by itself. The key ``None`` stands for the whole engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_LEASE_S = 3600.0


@dataclass
class _Gate:
    owners: dict[str, float] = field(default_factory=dict)  # owner -> monotonic expiry
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    # Bumped at every close; a request admitted under an older epoch has been told to stop.
    epoch: int = 0

    def __post_init__(self) -> None:
        self.opened.set()


class PauseGates:
    """Gates keyed by LoRA name (``None`` = engine-wide). Must be used from a single event loop."""

    def __init__(self, on_reopen: Callable[[str | None], None] | None = None) -> None:
        self._gates: dict[str | None, _Gate] = {}
        self._on_reopen = on_reopen

    def _gate(self, key: str | None) -> _Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        return gate

    def is_paused(self, key: str | None) -> bool:
        gate = self._gates.get(key)
        return gate is not None and bool(gate.owners)

    def owners(self, key: str | None) -> dict[str, float]:
        """Owner -> seconds left on its lease."""
        gate = self._gates.get(key)
        now = time.monotonic()
        return {} if gate is None else {o: round(exp - now, 3) for o, exp in gate.owners.items()}

    def paused_keys(self) -> list[str | None]:
        return [k for k, g in self._gates.items() if g.owners]

    def epoch(self, key: str | None) -> int:
        gate = self._gates.get(key)
        return 0 if gate is None else gate.epoch

    def close(self, key: str | None, owner: str, lease_s: float) -> bool:
        """Add (or renew) an owner's hold. Returns True when this call closed an open gate."""
        if not (0 < lease_s <= MAX_LEASE_S):
            raise ValueError(f"lease_s must be in (0, {MAX_LEASE_S}], got {lease_s}")
        gate = self._gate(key)
        was_open = not gate.owners
        gate.owners[owner] = time.monotonic() + lease_s
        if was_open:
            gate.epoch += 1
            gate.opened.clear()
        self._schedule_expiry(key, gate)
        return was_open

    def open(self, key: str | None, owner: str | None) -> bool:
        """Drop an owner's hold (None drops every owner). Returns True when the gate is now open.

        Dropping a hold that is not there is harmless: resume without pause is a no-op.
        """
        gate = self._gates.get(key)
        if gate is None or not gate.owners:
            return True
        if owner is None:
            gate.owners.clear()
        else:
            gate.owners.pop(owner, None)
        if gate.owners:
            self._schedule_expiry(key, gate)
            return False
        self._reopen(key, gate)
        return True

    async def wait_open(self, key: str | None) -> None:
        gate = self._gates.get(key)
        while gate is not None and gate.owners:
            await gate.opened.wait()

    def _reopen(self, key: str | None, gate: _Gate) -> None:
        if gate.timer is not None:
            gate.timer.cancel()
            gate.timer = None
        gate.opened.set()
        if self._on_reopen is not None:
            self._on_reopen(key)

    def _schedule_expiry(self, key: str | None, gate: _Gate) -> None:
        if gate.timer is not None:
            gate.timer.cancel()
        delay = max(0.0, min(gate.owners.values()) - time.monotonic())
        gate.timer = asyncio.get_running_loop().call_later(delay, self._expire, key)

    def _expire(self, key: str | None) -> None:
        gate = self._gates.get(key)
        if gate is None:
            return
        gate.timer = None
        now = time.monotonic()
        expired = [o for o, exp in gate.owners.items() if exp <= now + 1e-3]
        for owner in expired:
            logger.warning("pause lease of owner %r on %r expired; dropping its hold", owner, key)
            del gate.owners[owner]
        if gate.owners:
            self._schedule_expiry(key, gate)
        else:
            self._reopen(key, gate)

    def forget(self, key: str | None) -> None:
        """Drop a gate entirely (its LoRA was unloaded); waiters are released."""
        gate = self._gates.pop(key, None)
        if gate is not None:
            gate.owners.clear()
            self._reopen(key, gate)
