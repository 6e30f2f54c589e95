"""Prometheus metrics of the tenant-state cache, one registry per trainer so several can live in a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIERS = ("resident", "cpu", "disk")


class CacheMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter("skyrl_trainer_cache_hits", "tenant state found in this tier", ["tier"], registry=r)
        self.misses = Counter("skyrl_trainer_cache_misses", "tenant state looked for and not in this tier", ["tier"], registry=r)
        self.evictions = Counter("skyrl_trainer_cache_evictions", "tenant states moved out of this tier by its budget",
                                 ["tier"], registry=r)
        self.bytes = Gauge("skyrl_trainer_cache_bytes", "bytes of tenant state held in this tier", ["tier"], registry=r)
        self.tenants = Gauge("skyrl_trainer_cache_tenants", "tenants held in this tier", ["tier"], registry=r)
        self.switch = Histogram("skyrl_trainer_switch_seconds", "time to make a tenant resident, by the tier it came from",
                                ["tier"], registry=r,
                                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
        for tier in TIERS:  # export zeros from the start, so dashboards see every series
            for metric in (self.hits, self.misses, self.evictions, self.bytes, self.tenants):
                metric.labels(tier=tier)
            self.switch.labels(tier=tier)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
