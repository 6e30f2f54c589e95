"""Does a trainer on the same GPU stop anyone? Colocated training against pause-train-resume.

An 8B-shaped Llama (``--load-format dummy``, CUDA graphs) serves ``--tenants`` rank-``--rank``
tenants, each keeping ``--streams`` greedy requests in flight, plus one watching stream whose gaps
between tokens show any stall. A colocated trainer (its base on views of the server's weights) trains
one tenant in a loop (forward/backward + AdamW on ``--seq-len`` tokens). Windows, interleaved
``--rounds`` times:

- ``idle``: no training (the ceiling);
- ``colocated``: the trainer trains while everyone samples (this project's way);
- ``pause-train-resume``: every training step pauses the whole engine, trains, resumes (the
  sleep/wake way, minus its weight offload, so the baseline is a generous one).

    python -m bench.colocated_sampling --num-gpus 1 --tenants 4 --streams 8 --window-s 20   # H200
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from bench.common import (
    add_colocated_args,
    add_common_args,
    finish_figure,
    machine_name,
    start_colocated,
    today,
    training_datum,
    write_result,
)

logger = logging.getLogger("bench.colocated_sampling")
SERVER = "skyrl-bench-colocated-sampling"
WATCHER = "watch"
WINDOWS = ("idle", "colocated", "pause-train-resume")


async def _window(name: str, client: Any, url: str, trainer: Any, prompt_ids: list[int], prompt_text: str,
                  tenants: list[str], datum: Any, args: argparse.Namespace) -> dict[str, Any]:
    from skyrl_lora.inference.loadgen import run_streams, watch_gaps
    from skyrl_lora.training.protocol import AdamParams

    watch = asyncio.create_task(watch_gaps(url, WATCHER, prompt_text, duration_s=args.window_s, max_tokens=128))
    streams = [asyncio.create_task(run_streams(client, t, prompt_ids, streams=args.streams, max_tokens=args.max_tokens,
                                               duration_s=args.window_s)) for t in tenants]
    steps, step_s = 0, []
    deadline = time.perf_counter() + args.window_s
    while name != "idle" and time.perf_counter() < deadline:
        t = time.perf_counter()
        if name == "pause-train-resume":
            await client.pause_generation(None, lease_s=60)
        try:
            await trainer.forward_backward.remote("trainee", [datum])
            await trainer.optim_step.remote("trainee", AdamParams(learning_rate=1e-4))
        finally:
            if name == "pause-train-resume":
                await client.resume_generation(None)
        steps += 1
        step_s.append(time.perf_counter() - t)
    stats = await asyncio.gather(*streams)
    gaps = await watch
    seconds = max(s.seconds for s in stats)
    return {"window": name, "tokens_per_s": sum(s.tokens for s in stats) / seconds,
            "per_tenant_tokens_per_s": {s.tenant: s.tokens_per_s for s in stats},
            "watch_gap_p50_s": gaps.quantile(0.5), "watch_gap_p99_s": gaps.quantile(0.99), "watch_gap_max_s": gaps.max_s,
            "gaps_over_100ms": sum(g > 0.1 for g in gaps.gaps_s), "train_steps": steps,
            "train_step_s_median": sorted(step_s)[len(step_s) // 2] if step_s else None}


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(name: str, key: str) -> float:
        values = [w[key] for w in windows if w["window"] == name]
        return sum(values) / len(values)

    idle = mean("idle", "tokens_per_s")
    return {name: {"tokens_per_s": mean(name, "tokens_per_s"), "of_idle": mean(name, "tokens_per_s") / idle,
                   "train_steps": mean(name, "train_steps"),
                   "watch_gap_max_s": max(w["watch_gap_max_s"] for w in windows if w["window"] == name),
                   "gaps_over_100ms": sum(w["gaps_over_100ms"] for w in windows if w["window"] == name)}
            for name in WINDOWS}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.models.tiny import build_fixtures
    from skyrl_lora.training.protocol import LoraSpec

    tenants = [f"t{i}" for i in range(args.tenants)]
    pair = start_colocated(args, SERVER, tenants + [WATCHER])
    url, trainer = pair.url, pair.trainer
    client = RemoteInferenceClient(url)
    tok = AutoTokenizer.from_pretrained(build_fixtures().base)
    prompt_text = "def handle(request):\n    user = request.user\n    if not user.is_authenticated:\n"
    prompt_ids = tok(prompt_text)["input_ids"]
    datum = training_datum(args.seq_len)
    try:
        await trainer.create_lora.remote("trainee", LoraSpec(rank=args.rank, alpha=float(args.rank)))
        await trainer.forward_backward.remote("trainee", [datum])  # warm the trainer
        for t in tenants + [WATCHER]:
            await client.sample(prompt_ids, {"max_tokens": 8, "temperature": 0.0}, t)
        windows = []
        for r in range(args.rounds):
            for name in WINDOWS:
                w = await _window(name, client, url, trainer, prompt_ids, prompt_text, tenants, datum, args)
                w["round"] = r
                logger.info("%s", w)
                windows.append(w)
    finally:
        await client.aclose()
        pair.stop()
    return {"machine": machine_name(args.machine), "date": today(),
            "config": {"model": "llama-8b-shape (dummy weights, bf16)", "rank": args.rank, "tenants": args.tenants,
                       "streams": args.streams, "max_tokens": args.max_tokens, "seq_len": args.seq_len,
                       "window_s": args.window_s, "rounds": args.rounds, "cuda_graphs": True},
            "windows": windows, "summary": summarize(windows)}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(list(s), [s[n]["tokens_per_s"] for n in s], color=["tab:gray", "tab:green", "tab:red"])
    a.set_ylabel("sampled tokens/s, all tenants")
    for i, n in enumerate(s):
        a.text(i, s[n]["tokens_per_s"], f"{s[n]['of_idle']:.2f}× idle\n{s[n]['train_steps']:.0f} steps", ha="center",
               va="bottom", fontsize=8)
    b.bar(list(s), [1000 * s[n]["watch_gap_max_s"] for n in s], color=["tab:gray", "tab:green", "tab:red"])
    b.axhline(100, color="k", lw=0.8, ls="--")
    b.set_ylabel("watching stream: longest gap between tokens, ms")
    finish_figure(fig, png, f"8B-shape on one GPU, {result['config']['tenants']} tenants sampling, one training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, model=False)
    add_colocated_args(parser, seq_len=512)
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    result = asyncio.run(run(args))
    print(write_result(result, args.out, "colocated-sampling", plot))
    print(result["summary"])


if __name__ == "__main__":
    main()
