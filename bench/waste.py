"""Waste of a targeted sync: tokens generated twice after aborts (target 0) and the prefill an abort adds.

Tenant A keeps ``--streams`` greedy requests in flight; in the ``per-lora`` windows it is synced once
a second (abort, in-place flip, continuation from prompt + tokens so far), in ``no-sync`` windows not.
vLLM's own counters (``/metrics``) before and after each window give what the engine did; the client
says what it received. Windows alternate (noisy machines).

* regenerated tokens = engine's generated tokens − tokens delivered in finished completions;
* extra prompt tokens per abort = (engine's prompt tokens − requests × prompt length) ÷ aborts, and how
  many of them the prefix cache served;
* extra prefill seconds per abort = (prefill seconds − requests × a fresh request's prefill) ÷ aborts,
  the fresh request's prefill taken from the no-sync windows.

    python bench/waste.py --windows 4 --window-s 6
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
from pathlib import Path

from bench.common import add_common_args, machine_name, tiny_setup, today, write_result
from skyrl_lora.cluster import inference_servers
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.engine_metrics import EngineCounters, scrape
from skyrl_lora.inference.loadgen import every, run_streams, sync_strategy

logger = logging.getLogger("bench.waste")


async def window(client: RemoteInferenceClient, urls: list[str], prompt: list[int], paths: list[str], *, sync: bool,
                 args: argparse.Namespace) -> dict:
    before = await scrape(urls)
    jobs = [run_streams(client, "tenant-a", prompt, streams=args.streams, max_tokens=args.max_tokens,
                        duration_s=args.window_s)]
    if sync:
        jobs.append(every(1.0, args.window_s, sync_strategy(client, "tenant-a", paths, "per-lora")))
    results = await asyncio.gather(*jobs)
    stats = results[0]
    engine: EngineCounters = (await scrape(urls)) - before
    return {"sync": sync, "syncs": len(results[1]) if sync else 0, "requests": stats.requests,
            "segments": stats.segments, "aborts": stats.segments - stats.requests, "delivered_tokens": stats.tokens,
            "engine_generated_tokens": engine.generation_tokens, "engine_prompt_tokens": engine.prompt_tokens,
            "engine_prompt_tokens_cached": engine.prompt_tokens_cached, "engine_prefill_s": engine.prefill_seconds,
            "engine_requests": engine.prefill_requests, "tokens_per_s": stats.tokens_per_s}


def summarise(windows: list[dict], prompt_len: int) -> dict:
    calm = [w for w in windows if not w["sync"]]
    synced = [w for w in windows if w["sync"]]

    def total(ws: list[dict], key: str) -> float:
        return float(sum(w[key] for w in ws))

    fresh_prefill_s = total(calm, "engine_prefill_s") / max(1.0, total(calm, "engine_requests"))
    aborts = total(synced, "aborts")
    extra_prompt = total(synced, "engine_prompt_tokens") - total(synced, "requests") * prompt_len
    calm_cached = total(calm, "engine_prompt_tokens_cached")
    extra_cached = total(synced, "engine_prompt_tokens_cached") - calm_cached * total(synced, "requests") / max(
        1.0, total(calm, "requests"))
    extra_prefill = total(synced, "engine_prefill_s") - total(synced, "requests") * fresh_prefill_s
    regenerated = total(windows, "engine_generated_tokens") - total(windows, "delivered_tokens")
    return {
        "aborts": int(aborts), "syncs": int(total(synced, "syncs")),
        "regenerated_tokens": regenerated,
        "regenerated_per_abort": regenerated / aborts if aborts else 0.0,
        "delivered_tokens": int(total(windows, "delivered_tokens")),
        "extra_prompt_tokens_per_abort": extra_prompt / aborts if aborts else 0.0,
        "extra_prompt_tokens_cached_per_abort": extra_cached / aborts if aborts else 0.0,
        "fresh_request_prefill_s": fresh_prefill_s,
        "extra_prefill_s_per_abort": extra_prefill / aborts if aborts else 0.0,
        "tokens_per_s_sync_over_calm": (statistics.median(w["tokens_per_s"] for w in synced)
                                        / statistics.median(w["tokens_per_s"] for w in calm)),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(["delivered", "engine generated"], [s["delivered_tokens"], s["delivered_tokens"] + s["regenerated_tokens"]],
            color=["tab:green", "tab:blue"])
    ax1.set_title(f"{s['aborts']} aborts: {s['regenerated_tokens']:.0f} tokens generated twice (target 0)")
    ax1.set_ylabel("tokens")
    ax2.bar(["fresh request prefill", "extra prefill per abort"],
            [s["fresh_request_prefill_s"] * 1000, s["extra_prefill_s_per_abort"] * 1000], color=["tab:gray", "tab:orange"])
    ax2.set_ylabel("ms")
    ax2.set_title(f"extra prompt tokens per abort {s['extra_prompt_tokens_per_abort']:.1f} "
                  f"({s['extra_prompt_tokens_cached_per_abort']:.1f} cached)")
    fig.suptitle(f"{result['machine']} · {result['date']} · waste of a per-LoRA sync")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def bench(urls: list[str], paths: list[str], prompt: list[int], args: argparse.Namespace) -> list[dict]:
    client = RemoteInferenceClient(urls)
    await client.sample(prompt, {"max_tokens": 8, "temperature": 0.0}, "tenant-a")
    out = []
    for i in range(args.windows * 2):
        w = await window(client, urls, prompt, paths, sync=i % 4 in (1, 2), args=args)  # ABBA
        logger.info("window %d sync=%s: %d aborts, delivered %d, engine generated %.0f", i, w["sync"], w["aborts"],
                    w["delivered_tokens"], w["engine_generated_tokens"])
        out.append(w)
    await client.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="windows per condition")
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    add_common_args(parser)
    args = parser.parse_args()
    setup = tiny_setup()
    paths, prompt = setup.paths, setup.prompt
    with inference_servers(args.model or setup.base, {"tenant-a": paths[0]}, num_gpus_per_server=args.num_gpus,
                           max_loras=4, max_lora_rank=16) as cluster:
        windows = asyncio.run(bench(cluster.urls, paths, prompt, args))
    import vllm

    result = {"machine": machine_name(args.machine), "date": today(), "vllm": vllm.__version__,
              "prompt_tokens": len(prompt), "args": {k: str(v) for k, v in vars(args).items()},
              "summary": summarise(windows, len(prompt)), "windows": windows}
    path = write_result(result, args.out, "waste", plot)
    logger.info("summary %s", result["summary"])
    print(path)


if __name__ == "__main__":
    main()
