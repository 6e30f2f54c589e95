"""Bounded soak: tenants sampling continuously while one tenant is synced per second, round-robin.

Every sync swaps a tenant between two copies of the *same* weights in different directories, so each
sync is a real version flip (abort, continuation on the new version) while the greedy completion is
still fully determined. Each finished completion is compared with an uninterrupted twin taken before
the soak: any token lost, repeated or changed shows up as a mismatch. Afterwards: mismatches (target
0), requests still stuck (0), and the growth of every server process's memory after warm-up (< 10 %).

    python -m bench.soak --syncs 500                 # ~9 minutes on 2 cores
    python -m bench.soak --syncs 500 --mode inplace  # the same with armed in-place flips
    (tests/test_soak.py runs a short variant against the session's server)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import add_common_args, machine_name, tiny_setup, today, write_result
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.protocol import SyncMode

logger = logging.getLogger("bench.soak")
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def twin_adapter(base: Path, out: Path, seed: int = 7) -> tuple[str, str]:
    """A random (non-zero) LoRA for the base model, written to two directories with identical weights:
    outputs vary token by token (unlike the phrase LoRAs), and syncing between the copies changes the
    version but never the completion."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    first = out / "twin-a"
    peft_model.save_pretrained(str(first))
    second = out / "twin-b"
    shutil.copytree(first, second, dirs_exist_ok=True)
    return str(first), str(second)


@dataclass
class SoakCounts:
    requests: int = 0
    tokens: int = 0
    aborted_segments: int = 0
    mismatched_requests: int = 0
    mismatched_tokens: int = 0
    errors: list[str] = field(default_factory=list)


async def soak(urls: list[str], tenants: list[str], paths: tuple[str, str], prompts: list[list[int]], *,
               syncs: int, period_s: float, max_tokens: int, streams: int, token: str | None = None,
               memory_probe: Any = None, mode: SyncMode = "abort") -> dict[str, Any]:
    """Runs against servers where ``tenants`` are loaded with ``paths[0]``; returns the figures.
    ``mode``: how each sync flips (``inplace``: on a one-worker server an armed flip, and no request
    is cut). ``left_staged``: versions the servers still hold staged at the end (target 0)."""
    client = RemoteInferenceClient(urls, token=token)
    params = {"max_tokens": max_tokens, **GREEDY}
    twins = {(t, i): (await client.sample(p, params, t))[0].token_ids for t in tenants for i, p in enumerate(prompts)}
    counts = SoakCounts()
    stop = asyncio.Event()

    async def stream(tenant: str, k: int) -> None:
        i = k
        while not stop.is_set():
            i = (i + 1) % len(prompts)
            try:
                (s,) = await asyncio.wait_for(client.sample_with_retry(prompts[i], params, tenant), 120)
            except Exception as exc:  # a stuck or failed request is a finding, not a crash of the soak
                counts.errors.append(f"{tenant}: {exc!r}")
                continue
            want = twins[(tenant, i)]
            counts.requests += 1
            counts.tokens += len(s.token_ids)
            counts.aborted_segments += s.continuations
            if s.token_ids != want:
                counts.mismatched_requests += 1
                counts.mismatched_tokens += sum(a != b for a, b in zip(s.token_ids, want)) + abs(len(s.token_ids)
                                                                                                 - len(want))

    workers = [asyncio.create_task(stream(t, k)) for t in tenants for k in range(streams)]
    memory: list[dict[str, float]] = []
    sync_s: list[float] = []
    t0 = time.perf_counter()
    for n in range(syncs):
        tenant = tenants[n % len(tenants)]
        next_at = t0 + (n + 1) * period_s
        t = time.perf_counter()
        await client.update_lora(tenant, paths[(n // len(tenants) + 1) % 2], mode=mode)
        sync_s.append(time.perf_counter() - t)
        if memory_probe is not None and (n == min(syncs - 1, max(10, syncs // 10)) or n == syncs - 1):
            sample = await memory_probe()  # after warm-up, and at the end: the servers' processes and this one
            sample["client"] = float(psutil.Process().memory_info().rss)
            memory.append(sample)
        if n % 50 == 49:
            logger.info("%d syncs, %d requests, %d mismatches, %d errors", n + 1, counts.requests,
                        counts.mismatched_requests, len(counts.errors))
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    stop.set()
    try:
        await asyncio.wait_for(asyncio.gather(*workers), 180)
        stuck = 0
    except TimeoutError:
        stuck = sum(not w.done() for w in workers)
    wall = time.perf_counter() - t0
    left_staged = sum(st.staged + st.staged_on_workers for st in await client.state())
    growth = {}
    if len(memory) == 2:
        growth = {k: memory[1][k] / memory[0][k] - 1 for k in memory[0] if memory[0][k] > 0 and k in memory[1]}
    await client.aclose()
    return {"syncs": syncs, "mode": mode, "left_staged": left_staged, "wall_s": round(wall, 1),
            "requests": counts.requests, "tokens": counts.tokens,
            "aborted_segments": counts.aborted_segments, "mismatched_requests": counts.mismatched_requests,
            "mismatched_tokens": counts.mismatched_tokens, "errors": counts.errors[:20], "error_count": len(counts.errors),
            "stuck_requests": stuck, "sync_s_median": statistics.median(sync_s), "sync_s_max": max(sync_s),
            "memory_bytes": memory, "memory_growth_after_warmup": growth,
            "memory_growth_max": max(growth.values()) if growth else None}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    s = result["soak"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = ["requests", "aborted segments", "mismatched tokens", "errors", "stuck"]
    vals = [s["requests"], s["aborted_segments"], s["mismatched_tokens"], s["error_count"], s["stuck_requests"]]
    ax.bar(names, vals, color=["tab:blue", "tab:gray", "tab:red", "tab:red", "tab:red"])
    growth = ", ".join(f"{k} {v:+.1%}" for k, v in s["memory_growth_after_warmup"].items())
    ax.set_title(f"{s['syncs']} syncs in {s['wall_s']:.0f} s · memory after warm-up: {growth}", fontsize=9)
    fig.suptitle(f"{result['machine']} · {result['date']} · soak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--syncs", type=int, default=500)
    parser.add_argument("--period-s", type=float, default=1.0)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--streams", type=int, default=2, help="streams per tenant")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--mode", choices=("abort", "inplace"), default="abort",
                        help="how each sync flips (inplace: armed flips, no request cut)")
    add_common_args(parser, model=False)
    args = parser.parse_args()
    import tempfile

    import ray

    from skyrl_lora.cluster import inference_servers

    setup = tiny_setup()
    paths = twin_adapter(Path(setup.base), Path(tempfile.mkdtemp(prefix="soak-")))
    texts = ("def main():\n    for item in", "class Node:\n    def __init__(self", "import os\n\ndef walk(path",
             "    return sorted(")
    prompts = [setup.tokenizer(text)["input_ids"] for text in texts]
    tenants = [f"soak-{i}" for i in range(args.tenants)]
    with inference_servers(setup.base, dict.fromkeys(tenants, paths[0]), num_gpus_per_server=args.num_gpus,
                           max_loras=2 * args.tenants + 2, max_lora_rank=16, dtype="float32") as cluster:
        actor = cluster.actors[0]

        async def memory_probe() -> dict[str, float]:
            return await asyncio.to_thread(ray.get, actor.memory.remote(), timeout=30)

        result = asyncio.run(soak(cluster.urls, tenants, paths, prompts, syncs=args.syncs, period_s=args.period_s,
                                  max_tokens=args.max_tokens, streams=args.streams, memory_probe=memory_probe,
                                  mode=args.mode))
    full = {"machine": machine_name(args.machine), "date": today(), "args": {k: str(v) for k, v in vars(args).items()},
            "soak": result}
    path = write_result(full, args.out, "soak", plot)
    logger.info("soak: %s", {k: v for k, v in result.items() if k != "errors"})
    print(path)


if __name__ == "__main__":
    main()
