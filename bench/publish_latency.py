"""``save_weights_for_sampler`` -> first token on the new version, at production size.

An 8B-shaped Llama (``--load-format dummy``, CUDA graphs) serves ``--tenants`` rank-``--rank``
tenants; a trainer on the same GPU whose base is views of the server's weights (the colocated
trainer) trains tenant ``trainee`` and publishes each new version with ``save_weights_for_sampler``
(written to shared memory, staged and flipped on the server). Per publication the parts are timed
where they happen: the export, the sync (stage everywhere, then flip), and a one-token request for
the new version sent when the call returns (what a caller sees), the same request again (the first
token's own cost), and when the durable copy is on disk (written after the call returns). Windows:
``idle`` (no one else sampling) and ``loaded`` (every other tenant keeps ``--streams`` requests in
flight).

    python -m bench.publish_latency --num-gpus 1 --tenants 4 --streams 8 --publishes 8   # H200
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger("bench.publish_latency")
SERVER = "skyrl-bench-publish-latency"
TRAINEE = "trainee"
WINDOWS = ("idle", "loaded")


async def _publishes(client: Any, trainer: Any, server: Any, prompt_ids: list[int], datum: Any,
                     count: int) -> list[dict[str, Any]]:
    """Per publication: its parts where they happen, what a caller that awaits the call sees (the
    call's return, then a one-token request), the same request once more (the first token's own
    cost, no publication in it), and when the durable copy was written (after the call returns)."""
    from skyrl_lora.training.protocol import AdamParams

    one_token = {"max_tokens": 1, "temperature": 0.0}
    out = []
    for i in range(count):
        await trainer.forward_backward.remote(TRAINEE, [datum])
        await trainer.optim_step.remote(TRAINEE, AdamParams(learning_rate=1e-4))
        before = await server.stage_timings.remote()
        t0 = time.perf_counter()
        saved = await trainer.save_weights_for_sampler.remote(TRAINEE, f"v{i}")
        returned = time.perf_counter() - t0
        after = await server.stage_timings.remote()
        t1 = time.perf_counter()
        await client.sample(prompt_ids, one_token, TRAINEE)
        first = time.perf_counter() - t1
        t2 = time.perf_counter()
        await client.sample(prompt_ids, one_token, TRAINEE)
        again = time.perf_counter() - t2
        await trainer.durable.remote(saved.path)
        durable = time.perf_counter() - t0
        out.append({"export_ms": 1e3 * saved.export_s, "sync_ms": 1e3 * saved.sync_s,
                    # inside the sync: the server's check and staging, and the flip's add_lora round trip
                    "staging_ms": 1e3 * (saved.staging_s or 0.0), "flip_ms": 1e3 * (saved.flip_s or 0.0),
                    # the new version serves export + sync after the call began
                    "served_after_ms": 1e3 * (saved.export_s + saved.sync_s),
                    "call_returned_ms": 1e3 * returned, "first_token_ms": 1e3 * first,
                    "save_to_first_token_ms": 1e3 * (returned + first),
                    "token_again_ms": 1e3 * again, "durable_after_ms": 1e3 * durable,
                    # the worker's own time for what it did (gpu_copy, prebuilt, load, flip), ms
                    "worker": {k: sum(v[len(before.get(k, [])):]) for k, v in after.items()
                               if len(v) > len(before.get(k, []))}})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.inference.loadgen import run_streams
    from skyrl_lora.models.tiny import build_fixtures
    from skyrl_lora.training.protocol import LoraSpec

    tenants = [f"t{i}" for i in range(args.tenants)]
    pair = common.start_colocated(args, SERVER, tenants, shape=args.shape, publish=True,
                                  publish_images=args.publish_images, slot_builders=args.slot_builders,
                                  stage_channel=args.stage_channel)
    trainer = pair.trainer
    client = RemoteInferenceClient(pair.url)
    tok = AutoTokenizer.from_pretrained(build_fixtures().base)
    prompt_ids = tok("def handle(request):\n    user = request.user\n")["input_ids"]
    datum = common.training_datum(args.seq_len)
    windows: list[dict[str, Any]] = []
    try:
        await trainer.create_lora.remote(TRAINEE, LoraSpec(rank=args.rank, alpha=float(args.rank)))
        await trainer.forward_backward.remote(TRAINEE, [datum])
        await trainer.save_weights_for_sampler.remote(TRAINEE, "warm")  # the first sync creates the tenant
        for t in tenants + [TRAINEE]:
            await client.sample(prompt_ids, {"max_tokens": 8, "temperature": 0.0}, t)
        for r in range(args.rounds):
            for name in WINDOWS:
                load = [asyncio.create_task(run_streams(client, t, prompt_ids, streams=args.streams,
                                                        max_tokens=args.max_tokens, duration_s=3600))
                        for t in tenants] if name == "loaded" else []
                try:
                    if load:
                        await asyncio.sleep(2.0)  # every stream running
                    pubs = await _publishes(client, trainer, pair.server, prompt_ids, datum, args.publishes)
                finally:
                    for task in load:
                        task.cancel()
                    await asyncio.gather(*load, return_exceptions=True)
                w = {"window": name, "round": r, "publishes": pubs,
                     **{f"{k}_p50": statistics.median(p[k] for p in pubs) for k in pubs[0] if k != "worker"},
                     **{f"{k}_max": max(p[k] for p in pubs) for k in pubs[0] if k != "worker"}}
                logger.info("%s", {k: v for k, v in w.items() if k != "publishes"})
                windows.append(w)
    finally:
        await client.aclose()
        pair.stop()
    return {"machine": common.machine_name(args.machine), "date": common.today(),
            "config": {"model": "llama-8b-shape (dummy weights, bf16)" if args.shape == "8b" else "tiny",
                       "rank": args.rank, "tenants": args.tenants,
                       "streams": args.streams, "publishes": args.publishes, "rounds": args.rounds,
                       "slot_builders": args.slot_builders, "stage_channel": args.stage_channel,
                       "publish_images": args.publish_images,
                       "trainer": "colocated (base on the server's weights)",
                       "cuda_graphs": True},
            "windows": windows,
            "summary": {name: {k: statistics.median(w[k] for w in windows if w["window"] == name)
                               for k in windows[0] if k.endswith(("_p50", "_max"))} for name in WINDOWS}}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    s = result["summary"]
    parts = ("export_ms_p50", "sync_ms_p50", "first_token_ms_p50")
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(s)
    for part in parts:
        values = [s[n][part] for n in s]
        ax.bar(list(s), values, bottom=bottom, label=part.removesuffix("_ms_p50"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(list(s), [s[n]["save_to_first_token_ms_p50"] for n in s], color="k", marker="_", s=600, zorder=3,
               label="call returned + first token")
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_ylabel("save_weights_for_sampler -> first token, ms (p50)")
    ax.legend()
    common.finish_figure(fig, png, f"{result['machine']}: 8B-shape, rank {result['config']['rank']}, colocated trainer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, model=False)
    common.add_colocated_args(parser, seq_len=128)
    parser.add_argument("--shape", choices=("8b", "tiny"), default="8b", help="tiny: a CPU smoke run")
    parser.add_argument("--publishes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slot-builders", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--publish-images", action=argparse.BooleanOptionalAction, default=True,
                        help="the trainer writes the server's slot image (slot_image), or peft files")
    parser.add_argument("--stage-channel", action=argparse.BooleanOptionalAction, default=True,
                        help="staging around the engine's loop (stage_channel), or through collective_rpc")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    result = asyncio.run(run(args))
    logger.info("wrote %s: %s", common.write_result(result, args.out, f"publish-latency-{args.shape}", plot), result["summary"])


if __name__ == "__main__":
    main()
