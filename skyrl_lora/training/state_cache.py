"""The host and disk tiers of tenant state: LRU with a byte budget each; what falls out of CPU goes to disk.

The resident tier (adapters living in the model on the training device) is the trainer's own slots;
it hands evicted tenants to :meth:`HostAndDiskTiers.put`. Disk is the last tier: its budget is checked
before a tenant is admitted (:meth:`can_admit`), because dropping state to make room would lose data.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from cachetools import Cache, LRUCache

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.metrics import CacheMetrics
from skyrl_lora.training.snapshot import TenantSnapshot, read_snapshot, write_snapshot

logger = logging.getLogger(__name__)


# a tenant on the CPU tier: its snapshot and size in bytes
_CpuEntry = tuple[TenantSnapshot, int]


class _SpillingLRU(LRUCache[str, _CpuEntry]):
    """cachetools' byte-budgeted LRU whose evictions go to the next tier instead of vanishing."""

    def __init__(self, maxsize: float, spill: Callable[[str, _CpuEntry], None]) -> None:
        super().__init__(maxsize=maxsize, getsizeof=lambda item: item[1])
        self._spill = spill

    def popitem(self) -> tuple[str, _CpuEntry]:
        key, value = super().popitem()
        self._spill(key, value)
        return key, value


class HostAndDiskTiers:
    def __init__(self, cpu_budget_bytes: int, disk_budget_bytes: int | None, disk_dir: Path, metrics: CacheMetrics) -> None:
        self.cpu_budget = cpu_budget_bytes
        self.disk_budget = disk_budget_bytes
        self.disk_dir = Path(disk_dir)
        self.metrics = metrics
        # values: (snapshot, nbytes) on CPU, (file path, nbytes) on disk
        self._cpu = _SpillingLRU(max(cpu_budget_bytes, 0), self._spill_to_disk)
        self._disk: dict[str, tuple[Path, int]] = {}
        self._pin = torch.cuda.is_available()
        if self.disk_dir.exists():  # files of a previous process belong to tenants it knew, not to us
            shutil.rmtree(self.disk_dir)
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._publish()

    # ------------------------------------------------------------------ queries
    def tier_of(self, tenant: str) -> str | None:
        if tenant in self._cpu:
            return "cpu"
        if tenant in self._disk:
            return "disk"
        return None

    def nbytes(self, tier: str) -> int:
        if tier == "cpu":
            return int(self._cpu.currsize)
        return sum(n for _, n in self._disk.values())

    def count(self, tier: str) -> int:
        return len(self._cpu) if tier == "cpu" else len(self._disk)

    def size_of(self, tenant: str) -> int:
        if tenant in self._cpu:
            return self._cpu[tenant][1]
        return self._disk[tenant][1]

    def can_admit(self, nbytes: int, resident_free: int) -> bool:
        """Would one more tenant of ``nbytes`` fit somewhere without dropping anyone's state?"""
        if self.disk_budget is None:
            return True
        free = resident_free + (self.cpu_budget - self.nbytes("cpu")) + (self.disk_budget - self.nbytes("disk"))
        return nbytes <= free

    # ------------------------------------------------------------------ moves
    def put(self, tenant: str, snap: TenantSnapshot) -> str:
        """Store an evicted tenant: CPU if it fits, else disk. Returns the tier it landed in."""
        nbytes = snap.nbytes
        if self._pin and not all(v.is_pinned() for v in snap.tensors.values()):
            snap = TenantSnapshot(snap.spec, snap.step, snap.layout, {k: v.pin_memory() for k, v in snap.tensors.items()})
        if nbytes <= self.cpu_budget:
            self._cpu[tenant] = (snap, nbytes)  # may spill the least recently used tenants to disk
            tier = "cpu"
        else:
            self._write_disk(tenant, snap, nbytes)
            tier = "disk"
        self._publish()
        return tier

    def take(self, tenant: str) -> tuple[TenantSnapshot, str] | None:
        """Remove a tenant from whichever tier holds it; records a hit or miss per tier looked in."""
        item = self._cpu.pop(tenant, None)
        if item is not None:
            self.metrics.hits.labels(tier="cpu").inc()
            self._publish()
            return item[0], "cpu"
        self.metrics.misses.labels(tier="cpu").inc()
        entry = self._disk.pop(tenant, None)
        if entry is None:
            self.metrics.misses.labels(tier="disk").inc()
            return None
        self.metrics.hits.labels(tier="disk").inc()
        path, _ = entry
        snap = read_snapshot(path, pin=self._pin)
        path.unlink(missing_ok=True)
        self._publish()
        return snap, "disk"

    def peek(self, tenant: str) -> TenantSnapshot | None:
        """A tenant's state without moving it or refreshing its recency (inspection, tests)."""
        if tenant in self._cpu:
            return Cache.__getitem__(self._cpu, tenant)[0]
        if tenant in self._disk:
            return read_snapshot(self._disk[tenant][0])
        return None

    def drop(self, tenant: str) -> None:
        self._cpu.pop(tenant, None)
        entry = self._disk.pop(tenant, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)
        self._publish()

    # ------------------------------------------------------------------ internals
    def _spill_to_disk(self, tenant: str, item: tuple[TenantSnapshot, int]) -> None:
        self.metrics.evictions.labels(tier="cpu").inc()
        self._write_disk(tenant, item[0], item[1])

    def _write_disk(self, tenant: str, snap: TenantSnapshot, nbytes: int) -> None:
        if self.disk_budget is not None and self.nbytes("disk") + nbytes > self.disk_budget:
            # can_admit() keeps this from happening; refusing beats silently losing a tenant's state
            raise SkyrlError(507, f"tenant-state disk tier is full ({self.disk_budget} bytes)", None)
        path = self.disk_dir / f"{tenant}.safetensors"
        write_snapshot(snap, path)
        self._disk[tenant] = (path, nbytes)
        logger.debug("tenant %s spilled to disk (%d bytes)", tenant, nbytes)

    def _publish(self) -> None:
        for tier in ("cpu", "disk"):
            self.metrics.bytes.labels(tier=tier).set(self.nbytes(tier))
            self.metrics.tenants.labels(tier=tier).set(self.count(tier))
