"""Does copying a durable copy off the GPU on one thread hold up another thread's CUDA calls?

After stop 21's change the trainer actor answered ``save_weights_for_sampler`` 116 ms after the
servers had flipped (H200, 8B rank 32): its durable copy now left the GPU as one 168 MB copy into
pageable memory on a thread, where before it went as 448 small copies. This measures, with torch
alone, the largest gap of a loop of tiny CUDA calls on the main thread (what the actor's thread does
when it frees the shared image and answers) while another thread copies 168 MB of bf16 to the host:
in one copy, in 8 MB chunks, per tensor (448), and into pinned memory asynchronously.

    python3 scripts/gpu/persist_lock.py > persist-lock.json      # on the device; needs only torch
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from typing import Any

import torch

NUMEL = 84_000_000  # bf16: an 8B rank-32 adapter on all seven projections, ~168 MB
PIECES = 448
CHUNK = 4 << 20  # elements: 8 MB of bf16


def _copy(flat: torch.Tensor, way: str) -> None:
    if way == "one_copy":
        flat.to("cpu")
    elif way == "chunked_8mb":
        host = torch.empty(flat.numel(), dtype=flat.dtype)
        for start in range(0, flat.numel(), CHUNK):
            host[start:start + CHUNK].copy_(flat[start:start + CHUNK])
    elif way == "per_tensor":
        for piece in flat.chunk(PIECES):
            piece.to("cpu", copy=True)
    elif way == "pinned_async":
        host = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record()
        done.synchronize()


def _round(flat: torch.Tensor, way: str) -> dict[str, Any]:
    gaps: list[float] = []
    copying = threading.Thread(target=_copy, args=(flat, way))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    copying.start()
    last = time.perf_counter()
    while copying.is_alive():
        scratch = torch.empty(1024, device="cuda")  # what freeing and answering touch: the allocator, events
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        del scratch, event
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    copying.join()
    return {"way": way, "copy_ms": 1e3 * (time.perf_counter() - t0), "largest_gap_ms": 1e3 * max(gaps or [0.0]),
            "calls": len(gaps)}


def main() -> None:
    flat = torch.randn(NUMEL, device="cuda").to(torch.bfloat16)
    ways = ["one_copy", "chunked_8mb", "per_tensor", "pinned_async"]
    rows = [_round(flat, way) for _ in range(5) for way in ways]
    summary = {way: {k: statistics.median(r[k] for r in rows[len(ways):] if r["way"] == way)
                     for k in ("copy_ms", "largest_gap_ms")} for way in ways}
    json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "bytes": 2 * NUMEL,
               "median_after_first": summary, "rounds": rows}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
