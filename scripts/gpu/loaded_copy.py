"""Why a GPU-copy publication's worker side takes 17.5 ms under load and 4 ms idle (8B, H200), with
torch alone.

An "engine" process runs steps back to back (a chain of bf16 matmuls of an 8B layer's sizes, then a
synchronize, as vLLM's step loop does) and, on a thread of its own, does what the worker does with a
published image: open the CUDA IPC handle, copy it on a high-priority side stream, sum it for
NaN/Inf. The "trainer" process casts its flat fp32 weights to bf16 and exports the handle (its
kernels must run before the worker's copy can: the handle carries their event). Timed idle (no
steps) and loaded, and loaded with the trainer's cast synchronised before the handle goes (so the
worker waits for no kernel of another process).

    python3 scripts/gpu/loaded_copy.py > loaded-copy.json     # on the device; needs only torch
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import reduce_tensor

NUMEL = 84_000_000  # an 8B rank-32 adapter on all seven projections
ROUNDS = 8


def _engine(conn: Any) -> None:
    torch.cuda.init()
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    w = [torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.01,
         torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.01]
    side = torch.cuda.Stream(priority=-1)  # type: ignore[no-untyped-call]
    running = threading.Event()
    stop = threading.Event()

    def steps() -> None:
        while not stop.is_set():
            if not running.is_set():
                time.sleep(0.001)
                continue
            y = x
            for _ in range(32):  # ~an 8B decode step's weight reads
                y = (y @ w[0]) @ w[1]
            torch.cuda.synchronize()

    loop = threading.Thread(target=steps, daemon=True)
    loop.start()
    while True:
        msg = conn.recv()
        if msg is None:
            stop.set()
            loop.join()
            return
        if msg in ("load", "idle"):
            (running.set if msg == "load" else running.clear)()
            conn.send("ok")
            continue
        fn, args = msg
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            shared = fn(*args)
            own = torch.empty_like(shared)
            own.copy_(shared)
            finite = bool(torch.isfinite(own.sum(dtype=torch.float32)))
        del shared
        conn.send({"worker_ms": 1e3 * (time.perf_counter() - t0), "finite": finite})


def main() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_engine, args=(child,), daemon=True)
    proc.start()
    weights = torch.randn(NUMEL, device="cuda")
    rows: list[dict[str, Any]] = []
    for mode in ("idle", "loaded", "loaded_trainer_synced", "idle"):
        parent.send("idle" if mode == "idle" else "load")
        parent.recv()
        time.sleep(0.2)
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            image = weights.to(torch.bfloat16)
            if mode == "loaded_trainer_synced":
                torch.cuda.synchronize()
            t_cast = time.perf_counter()
            parent.send(reduce_tensor(image))
            reply = parent.recv()
            rows.append({"mode": mode, "trainer_ms": 1e3 * (t_cast - t0),
                         "round_trip_ms": 1e3 * (time.perf_counter() - t_cast), **reply})
            del image
    parent.send(None)
    proc.join(timeout=60)
    summary = {m: {k: statistics.median(r[k] for r in rows[1:] if r["mode"] == m)
                   for k in ("trainer_ms", "round_trip_ms", "worker_ms")}
               for m in ("idle", "loaded", "loaded_trainer_synced")}
    json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "median": summary,
               "rounds": rows}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
