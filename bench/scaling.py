"""Scaling with tenants: 1, 8 and 32 tenants on one server, each generating and each syncing once a second.

For each tenant count, three conditions run side by side in alternating rounds: nobody syncs; every
tenant syncs through our per-LoRA flip; every tenant syncs behind an engine-wide pause (pause the
engine, load in place, resume). Each tenant's tokens/s in a condition ÷ its own tokens/s with no syncs
is the figure. An engine-wide pause freezes everybody for every tenant's sync, so its cost grows with
the number of tenants; the per-LoRA flip only touches the tenant that syncs. Targets: ≥ 0.97 with one
syncing tenant, ≥ 0.9 with 32 (median over tenants).

Syncs are staggered (tenant i at i/N of each second) and each tenant syncs through its own client, so
engine-wide pauses of different tenants overlap as they would with independent trainers.

    python bench/scaling.py --tenants 1 8 32 --window-s 8 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path

from bench.common import add_common_args, machine_name, tiny_setup, today, write_result
from skyrl_lora.cluster import inference_servers
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.loadgen import every, run_streams, sync_strategy

logger = logging.getLogger("bench.scaling")
CONDITIONS = ("no-sync", "per-lora", "engine-wide", "inplace")  # inplace: load over the live adapter, no pause


async def measure(clients: list[RemoteInferenceClient], tenants: list[str], prompt: list[int], paths: list[str],
                  condition: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Every tenant's tokens/s over one window, and each sync's wall time."""
    n = len(tenants)

    async def syncer(i: int) -> list[float]:
        if condition == "no-sync":
            return []
        await asyncio.sleep(i / n)  # staggered: tenant i syncs at i/N of each second
        action = sync_strategy(clients[i], tenants[i], paths, condition)
        return await every(1.0, args.window_s - i / n, action)

    gens = [run_streams(clients[i], t, prompt, streams=args.streams, max_tokens=args.max_tokens,
                        duration_s=args.window_s) for i, t in enumerate(tenants)]
    results = await asyncio.gather(*gens, *(syncer(i) for i in range(n)))
    return [s.tokens_per_s for s in results[:n]], [x for lat in results[n:] for x in lat]


async def bench(url: str, prompt: list[int], paths: list[str], args: argparse.Namespace) -> dict:
    out: dict = {}
    for n in args.tenants:
        tenants = [f"t{n}-{i}" for i in range(n)]
        clients = [RemoteInferenceClient(url) for _ in tenants]
        for i, t in enumerate(tenants):
            await clients[0].load_lora_adapter(t, paths[i % 2], load_inplace=False)
            await clients[0].sample(prompt, {"max_tokens": 4, "temperature": 0.0}, t)
        conditions = ("no-sync", *args.conditions)
        per: dict[str, list[list[float]]] = {c: [] for c in conditions}
        sync_s: dict[str, list[float]] = {c: [] for c in conditions}
        for rnd in range(args.rounds):
            for cond in (conditions if rnd % 2 == 0 else conditions[::-1]):
                tps, lat = await measure(clients, tenants, prompt, paths, cond, args)
                per[cond].append(tps)
                sync_s[cond] += lat
                logger.info("%d tenants, round %d, %-11s: median %.1f tok/s, %d syncs (median %.0f ms)", n, rnd, cond,
                            statistics.median(tps), len(lat), 1000 * statistics.median(lat) if lat else 0)
        # per tenant: median over rounds of its tokens/s; ratio to its own no-sync figure
        own = {c: [statistics.median(r[i] for r in per[c]) for i in range(n)] for c in conditions}
        ratios = {c: [own[c][i] / own["no-sync"][i] if own["no-sync"][i] else 0.0 for i in range(n)]
                  for c in conditions[1:]}
        out[str(n)] = {
            "tokens_per_s_per_tenant": {c: [round(x, 2) for x in own[c]] for c in conditions},
            "ratio_median": {c: round(statistics.median(v), 4) for c, v in ratios.items()},
            "ratio_min": {c: round(min(v), 4) for c, v in ratios.items()},
            "aggregate_ratio": {c: round(sum(own[c]) / sum(own["no-sync"]), 4) for c in conditions[1:]},
            "syncs": {c: len(v) for c, v in sync_s.items()},
            "sync_s_median": {c: round(statistics.median(v), 4) for c, v in sync_s.items() if v},
        }
        for t in tenants:
            await clients[0].unload_lora_adapter(t)
        for c in clients:
            await c.aclose()
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    counts = [int(n) for n in result["by_tenants"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    present = set(next(iter(result["by_tenants"].values()))["ratio_median"])
    for cond, color in (("per-lora", "tab:blue"), ("engine-wide", "tab:red"), ("inplace", "tab:gray")):
        if cond not in present:
            continue
        ax.plot(counts, [result["by_tenants"][str(n)]["ratio_median"][cond] for n in counts], "o-", color=color,
                label=f"{cond} (median tenant)")
        ax.plot(counts, [result["by_tenants"][str(n)]["ratio_min"][cond] for n in counts], "x:", color=color,
                label=f"{cond} (worst tenant)")
    ax.axhline(0.9, color="gray", ls="--", lw=1, label="target 0.9 (32 tenants)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("tenants, each syncing once a second")
    ax.set_ylabel("tenant tok/s ÷ its tok/s without syncs")
    ax.legend(fontsize=8)
    ax.set_title(f"{result['machine']} · {result['date']} · vLLM {result['vllm']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS[1:], default=["per-lora", "engine-wide"])
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--max-loras", type=int, default=None,
                        help="adapter slots (default: 2 × most tenants + 4: a flip loads the new version beside the old)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=1, help="streams per tenant")
    parser.add_argument("--max-tokens", type=int, default=32)
    add_common_args(parser)
    args = parser.parse_args()
    setup = tiny_setup()
    paths, prompt = setup.paths, setup.prompt
    most = max(args.tenants)
    t0 = time.perf_counter()
    with inference_servers(args.model or setup.base, {}, num_gpus_per_server=args.num_gpus,
                           max_loras=args.max_loras or 2 * most + 4, max_lora_rank=16, max_model_len=512) as cluster:
        by_tenants = asyncio.run(bench(cluster.urls[0], prompt, paths, args))
    import vllm

    result = {"machine": machine_name(args.machine), "date": today(), "vllm": vllm.__version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "by_tenants": by_tenants,
              "targets": {"per-lora, 1 tenant": ">= 0.97", "per-lora, 32 tenants": ">= 0.9"},
              "wall_s": round(time.perf_counter() - t0, 1)}
    path = write_result(result, args.out, "scaling", plot)
    for n, r in by_tenants.items():
        logger.info("%s tenants: median ratio %s, worst %s", n, r["ratio_median"], r["ratio_min"])
    print(path)


if __name__ == "__main__":
    main()
