"""What each part of a GPU-copy publication costs at 8B rank 32, with torch alone (no vLLM, no Ray).

A diagnostic for issue 17's save -> first token: the trainer's side (cast the fp32 LoRA weights to
bf16, lay them out as one flat image, export a CUDA IPC handle) and the server worker's side, in a
process of its own (open the handle, copy into a buffer of its own, sum it for NaN/Inf, start a
pinned host copy), each timed with the device synchronised. Twice: a new image per publication (what
``slot_image.share_image`` does today) and one image buffer reused (its handle opened once).

    python3 scripts/gpu/ipc_parts.py > parts.json      # on the device; needs only torch
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import reduce_tensor

HIDDEN, INTER, KV, LAYERS, RANK = 4096, 14336, 1024, 32, 32
PROJ = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
        "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}
ROUNDS = 10


def _ms(t0: float) -> float:
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def _worker(conn: Any) -> None:
    torch.cuda.init()
    pinned: torch.Tensor | None = None
    held: list[torch.Tensor] = []  # the last image stays open, as a cached handle would
    while True:
        msg = conn.recv()
        if msg is None:
            return
        fn, args = msg
        t0 = time.perf_counter()
        shared = fn(*args)
        torch.cuda.synchronize()
        t_open = 1e3 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        own = torch.empty_like(shared)
        own.copy_(shared)
        ok = bool(torch.isfinite(own.sum(dtype=torch.float32)))
        t_copy = _ms(t1)
        t2 = time.perf_counter()
        if pinned is None or pinned.numel() != own.numel():
            pinned = torch.empty(own.numel(), dtype=own.dtype, pin_memory=True)
        pinned.copy_(own, non_blocking=True)
        t_host = _ms(t2)
        held[:] = [shared]
        conn.send({"open_ms": t_open, "copy_and_check_ms": t_copy, "host_copy_ms": t_host, "finite": ok})


def main() -> None:
    dev = torch.device("cuda", 0)
    params = {}
    for layer in range(LAYERS):
        for name, (fan_in, fan_out) in PROJ.items():
            params[f"{layer}.{name}.A"] = torch.randn(RANK, fan_in, device=dev) * 0.01
            params[f"{layer}.{name}.B"] = torch.randn(fan_out, RANK, device=dev) * 0.01
    numel = sum(p.numel() for p in params.values())
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child,), daemon=True)
    proc.start()
    results: dict[str, list[dict[str, float]]] = {"new_image_each_time": [], "one_image_reused": [],
                                                  "foreach": []}
    reused = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    reused_handle = reduce_tensor(reused)
    for way in results:
        for _ in range(ROUNDS):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if way == "foreach":  # one flat bf16 copy of every weight, by multi-tensor kernels
                flat = torch.empty(numel, dtype=torch.bfloat16, device=dev)
                views, offset = [], 0
                for p in params.values():
                    views.append(flat[offset:offset + p.numel()].view(p.shape))
                    offset += p.numel()
                torch._foreach_copy_(views, list(params.values()))
                cast = dict(zip(params, views))
            else:
                cast = {k: p.detach().to(torch.bfloat16, copy=True) for k, p in params.items()}
            t_cast = _ms(t0)
            t1 = time.perf_counter()
            image = reused if way == "one_image_reused" else torch.empty(numel, dtype=torch.bfloat16, device=dev)
            offset = 0
            if way == "foreach":
                slots, bs = [], []
                for k, t in cast.items():
                    slots.append(image[offset:offset + t.numel()].view(t.shape))
                    if k.endswith(".B"):
                        bs.append(slots[-1])
                    offset += t.numel()
                torch._foreach_copy_(slots, list(cast.values()))
                torch._foreach_mul_(bs, 2.0)
            for k, t in (cast.items() if way != "foreach" else ()):
                view = image[offset:offset + t.numel()].view(t.shape)
                view.copy_(t)
                if k.endswith(".B"):
                    view.mul_(2.0)
                offset += t.numel()
            t_assemble = _ms(t1)
            t2 = time.perf_counter()
            handle = reused_handle if way == "one_image_reused" else reduce_tensor(image)
            t_export = _ms(t2)
            t3 = time.perf_counter()
            parent.send(handle)
            reply = parent.recv()
            t_round = 1e3 * (time.perf_counter() - t3)
            results[way].append({"cast_ms": t_cast, "assemble_ms": t_assemble, "ipc_handle_ms": t_export,
                                 "worker_round_trip_ms": t_round, **reply})
            del image
    parent.send(None)
    proc.join(timeout=30)
    summary = {way: {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0] if k != "finite"}
               for way, rows in results.items()}
    json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "numel": numel,
               "bytes_bf16": 2 * numel, "median_after_first": summary, "rounds": results}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
