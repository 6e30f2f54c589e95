"""A pool of pinned host buffers, so moving tenants between GPU and CPU does not pay cudaHostAlloc each time.

Pinning hundreds of MB costs more than copying them. In steady state a switch evicts one tenant
and restores another of the same shape, so the restored tenant's buffers are exactly what the next
eviction needs: they go back to the pool instead of being freed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

Key = tuple[tuple[int, ...], torch.dtype]


class PinnedPool:
    def __init__(self, enabled: bool, max_bytes: int = 8 << 30) -> None:
        self.enabled = enabled
        self.max_bytes = max_bytes
        self._free: dict[Key, list[torch.Tensor]] = defaultdict(list)
        self._bytes = 0

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.enabled:
            return torch.empty(shape, dtype=dtype)
        bucket = self._free.get((tuple(shape), dtype))
        if bucket:
            t = bucket.pop()
            self._bytes -= t.numel() * t.element_size()
            return t
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        """Return buffers nobody reads any more (their copies to the device have completed)."""
        if not self.enabled:
            return
        for t in tensors:
            size = t.numel() * t.element_size()
            if t.is_pinned() and self._bytes + size <= self.max_bytes:
                self._free[(tuple(t.shape), t.dtype)].append(t)
                self._bytes += size
