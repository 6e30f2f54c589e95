"""Isolation and sync-latency benchmark on one server (issue 4), side by side in one run.

Measures tenant B's tokens/s (a) alone, (b) with tenant A generating and not syncing, and with A
generating and syncing once a second through (c) our per-LoRA flip, (d) an in-place load without
pause, (e) vLLM's engine-wide pause. Conditions run in rounds of alternating order (noisy machines). Then:
sync latency (update_lora) / raw adapter load, and B's tokens/s alone before and after many syncs of
LoRAs whose requests are in flight (the sticky ``load_inplace`` trap must not bite).

    python -m bench.isolation --phase-s 5 --rounds 6 --out bench/results
Writes ``<out>/<machine>-<date>-isolation.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
from pathlib import Path

from bench.common import add_common_args, machine_name, tiny_setup, today, write_result
from skyrl_lora.cluster import inference_servers
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.loadgen import measure_phase, median, run_streams, sync_strategy, timed

logger = logging.getLogger("bench.isolation")

CONDITIONS = [("alone", False, None), ("a-no-sync", True, None), ("per-lora", True, "per-lora"),
              ("inplace-no-pause", True, "inplace"), ("engine-wide", True, "engine-wide")]


async def bench(urls: list[str], paths: list[str], prompt: list[int], args: argparse.Namespace) -> dict:
    client = RemoteInferenceClient(urls)
    for tenant in ("tenant-a", "tenant-b", "probe"):
        await client.sample(prompt, {"max_tokens": 8, "temperature": 0.0}, tenant)
    tps: dict[str, list[float]] = {name: [] for name, _, _ in CONDITIONS}
    a_tps: dict[str, list[float]] = {name: [] for name, _, _ in CONDITIONS}
    latencies: dict[str, list[float]] = {name: [] for name, _, _ in CONDITIONS}
    for rnd in range(args.rounds):
        # Alternate the order each round so slow drift of a noisy machine does not favour any condition.
        for name, a_gen, kind in (CONDITIONS if rnd % 2 == 0 else CONDITIONS[::-1]):
            sync = None if kind is None else sync_strategy(client, "tenant-a", paths, kind)
            m = await measure_phase(client, prompt, name=name, tenant_b="tenant-b",
                                    tenant_a="tenant-a" if a_gen else None, sync=sync, duration_s=args.phase_s,
                                    streams_b=args.streams, streams_a=args.streams_a, max_tokens=args.max_tokens)
            tps[name].append(m.b.tokens_per_s)
            a_tps[name].append(m.a.tokens_per_s if m.a else 0.0)
            latencies[name].extend(m.sync_latencies_s)
            logger.info("round %d %-17s B %.1f tok/s  syncs %d", rnd, name, m.b.tokens_per_s, len(m.sync_latencies_s))

    # Sync latency vs raw adapter load: a fresh name loaded then unloaded, same HTTP path and servers.
    raw: list[float] = []
    for i in range(args.latency_samples):
        raw.append(await timed(client.load_lora_adapter(f"raw-{i}", paths[i % 2], load_inplace=False)))
        await client.unload_lora_adapter(f"raw-{i}")
    sync_lat: list[float] = []
    for i in range(args.latency_samples):
        sync_lat.append(await timed(client.update_lora("probe", paths[i % 2], mode="abort")))

    # No lasting damage: B alone before and after many syncs of A (both modes) with A's requests in flight.
    async def b_alone() -> float:
        windows = [(await run_streams(client, "tenant-b", prompt, streams=args.streams, max_tokens=args.max_tokens,
                                      duration_s=args.phase_s)).tokens_per_s for _ in range(3)]
        return statistics.median(windows)

    before = await b_alone()
    stop = asyncio.Event()

    async def a_load() -> None:
        while not stop.is_set():
            await client.sample_with_retry(prompt, {"max_tokens": 64, "temperature": 0.0, "ignore_eos": True}, "tenant-a")

    loaders = [asyncio.create_task(a_load()) for _ in range(2)]
    for i in range(args.damage_syncs):
        await client.update_lora("tenant-a", paths[i % 2], mode="inplace" if i % 2 else "abort")
    stop.set()
    await asyncio.gather(*loaders)
    after = await b_alone()

    def ratio(name: str) -> float:  # medians over rounds: robust to the odd disturbed window
        return statistics.median(tps[name]) / statistics.median(tps["a-no-sync"])

    return {
        "b_tokens_per_s": {k: [round(x, 2) for x in v] for k, v in tps.items()},
        "a_tokens_per_s": {k: [round(x, 2) for x in v] for k, v in a_tps.items()},
        "b_ratio_vs_a_no_sync": {name: round(ratio(name), 4) for name, _, _ in CONDITIONS},
        "b_ratio_vs_alone": {name: round(statistics.median(tps[name]) / statistics.median(tps["alone"]), 4)
                             for name, _, _ in CONDITIONS},
        "median_sync_s_during_load": {k: round(median(v), 4) for k, v in latencies.items() if v},
        "sync_latency_idle_median_s": round(median(sync_lat), 4),
        "raw_load_idle_median_s": round(median(raw), 4),
        "sync_over_raw_load": round(median(sync_lat) / median(raw), 3),
        "damage": {"syncs": args.damage_syncs, "b_alone_before": round(before, 2), "b_alone_after": round(after, 2),
                   "after_over_before": round(after / before, 4)},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["b_ratio_vs_a_no_sync"])
    ax1.bar(names, [result["b_ratio_vs_a_no_sync"][n] for n in names], color="tab:blue")
    ax1.axhline(0.97, color="red", ls="--", lw=1, label="target 0.97")
    ax1.set_ylim(0, 1.15)
    ax1.set_ylabel("tenant B tok/s ÷ (A generating, no sync)")
    ax1.set_title("Isolation: A syncs once a second")
    ax1.tick_params(axis="x", rotation=20)
    ax1.legend()
    d = result["damage"]
    ax2.bar(["raw load", "update_lora"], [result["raw_load_idle_median_s"] * 1000, result["sync_latency_idle_median_s"] * 1000])
    ax2.set_ylabel("ms (median)")
    ax2.set_title(f"sync/raw = {result['sync_over_raw_load']}; after {d['syncs']} syncs B = {d['after_over_before']}× before")
    fig.suptitle(f"{result['machine']} · {result['date']} · vLLM {result['vllm']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--streams-a", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--damage-syncs", type=int, default=200)
    parser.add_argument("--stage-channel", action=argparse.BooleanOptionalAction, default=True,
                        help="staging around the engine's loop (stage_channel), or through collective_rpc")
    add_common_args(parser)
    args = parser.parse_args()
    setup = tiny_setup()
    paths, prompt = setup.paths, setup.prompt
    loras = {"tenant-a": paths[1], "tenant-b": paths[0], "probe": paths[1]}
    import vllm

    with inference_servers(args.model or setup.base, loras, num_gpus_per_server=args.num_gpus,
                           max_loras=6, max_lora_rank=16, stage_channel=args.stage_channel) as cluster:
        result = asyncio.run(bench(cluster.urls, paths, prompt, args))
    result.update({"machine": machine_name(args.machine), "date": today(), "vllm": vllm.__version__,
                   "args": {k: str(v) for k, v in vars(args).items()}})
    path = write_result(result, args.out, "isolation", plot)
    print(json.dumps({k: result[k] for k in ("b_ratio_vs_a_no_sync", "sync_over_raw_load", "damage")}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
