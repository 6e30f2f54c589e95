"""``save_weights_for_sampler`` -> first token on the new version, at production size.

An 8B-shaped Llama (``--load-format dummy``, CUDA graphs) serves ``--tenants`` rank-``--rank``
tenants; a trainer on the same GPU whose base is views of the server's weights (the colocated
trainer) trains tenant ``trainee`` and publishes each new version with ``save_weights_for_sampler``
(written to shared memory, staged and flipped on the server). Per publication the parts are timed
where they happen: the export, the sync (stage everywhere, then flip), and a one-token request for
the new version sent right after the sync. Windows: ``idle`` (no one else sampling) and ``loaded``
(every other tenant keeps ``--streams`` requests in flight).

    python -m bench.publish_latency --num-gpus 1 --tenants 4 --streams 8 --publishes 8   # H200
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import add_common_args, machine_name, today, write_result

logger = logging.getLogger("bench.publish_latency")
SERVER = "skyrl-bench-publish-latency"
TRAINEE = "trainee"
WINDOWS = ("idle", "loaded")


async def _publishes(client: Any, trainer: Any, prompt_ids: list[int], datum: Any, count: int) -> list[dict[str, float]]:
    from skyrl_lora.training.protocol import AdamParams

    out = []
    for i in range(count):
        await trainer.forward_backward.remote(TRAINEE, [datum])
        await trainer.optim_step.remote(TRAINEE, AdamParams(learning_rate=1e-4))
        t0 = time.perf_counter()
        saved = await trainer.save_weights_for_sampler.remote(TRAINEE, f"v{i}")
        returned = time.perf_counter() - t0
        t1 = time.perf_counter()
        await client.sample(prompt_ids, {"max_tokens": 1, "temperature": 0.0}, TRAINEE)
        first = time.perf_counter() - t1
        out.append({"export_ms": 1e3 * saved.export_s, "sync_ms": 1e3 * saved.sync_s, "first_token_ms": 1e3 * first,
                    # the flip is done export + sync after the call; a request then has its token `first` later
                    "save_to_first_token_ms": 1e3 * (saved.export_s + saved.sync_s + first),
                    "call_returned_ms": 1e3 * returned})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from transformers import AutoTokenizer

    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.inference.loadgen import run_streams
    from skyrl_lora.inference.server import ServerConfig
    from skyrl_lora.models.synthetic import LLAMA_8B, write_dummy_model, write_random_adapter
    from skyrl_lora.models.tiny import build_fixtures
    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig
    from skyrl_lora.training.protocol import Datum, LoraSpec

    fixtures = build_fixtures()
    work = Path(tempfile.mkdtemp(prefix="publish-latency-"))
    # --shape tiny: the CPU smoke run (the packaged tiny model, with weights, so the trainer falls back to its own copy)
    model = write_dummy_model(work / "model", LLAMA_8B, fixtures.base) if args.shape == "8b" else fixtures.base
    dummy = ("--load-format", "dummy") if args.shape == "8b" else ()
    tenants = [f"t{i}" for i in range(args.tenants)]
    loras = {t: str(write_random_adapter(work / t, model, args.rank, seed=i)) for i, t in enumerate(tenants)}
    config = ServerConfig(model=str(model), loras=loras, max_loras=len(loras) + 4, max_cpu_loras=len(loras) + 8,
                          max_lora_rank=args.rank, max_model_len=1024, enforce_eager=args.num_gpus == 0,
                          gpu_memory_utilization=args.server_memory, slot_builders=args.slot_builders,
                          extra_args=dummy)
    server, url = start_server_actor(config, num_gpus=args.num_gpus * 0.6, name=SERVER)
    shm = Path(tempfile.mkdtemp(prefix="publish-latency-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    trainer = start_trainer_actor(TrainerConfig(base_model=str(model), state_dir=work / "trainer",
                                                sampler_root=work / "adapters", publish_root=shm,
                                                max_lora_rank=args.rank, resident_budget_bytes=64 << 30,
                                                base_weights="shared" if args.shape == "8b" else "shared_or_own",
                                                share_from=SERVER, inference_urls=(url,)),
                                  num_gpus=args.num_gpus * 0.4)
    client = RemoteInferenceClient(url)
    tok = AutoTokenizer.from_pretrained(fixtures.base)
    prompt_ids = tok("def handle(request):\n    user = request.user\n")["input_ids"]
    datum = Datum(model_input=list(range(3, 3 + args.seq_len)),
                  loss_fn_inputs={"target_tokens": list(range(4, 4 + args.seq_len))})
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
                    pubs = await _publishes(client, trainer, prompt_ids, datum, args.publishes)
                finally:
                    for task in load:
                        task.cancel()
                    await asyncio.gather(*load, return_exceptions=True)
                w = {"window": name, "round": r, "publishes": pubs,
                     **{f"{k}_p50": statistics.median(p[k] for p in pubs) for k in pubs[0]},
                     **{f"{k}_max": max(p[k] for p in pubs) for k in pubs[0]}}
                logger.info("%s", {k: v for k, v in w.items() if k != "publishes"})
                windows.append(w)
    finally:
        await client.aclose()
        ray.kill(trainer)
        ray.kill(server)
    return {"machine": machine_name(args.machine), "date": today(),
            "config": {"model": "llama-8b-shape (dummy weights, bf16)" if args.shape == "8b" else "tiny",
                       "rank": args.rank, "tenants": args.tenants,
                       "streams": args.streams, "publishes": args.publishes, "rounds": args.rounds,
                       "slot_builders": args.slot_builders, "trainer": "colocated (base on the server's weights)",
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
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_ylabel("save_weights_for_sampler -> first token, ms (p50)")
    ax.legend()
    fig.suptitle(f"{result['machine']}: 8B-shape, rank {result['config']['rank']}, colocated trainer", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, model=False)
    parser.add_argument("--shape", choices=("8b", "tiny"), default="8b", help="tiny: a CPU smoke run")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--publishes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--server-memory", type=float, default=0.45)
    parser.add_argument("--slot-builders", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    result = asyncio.run(run(args))
    logger.info("wrote %s: %s", write_result(result, args.out, f"publish-latency-{args.shape}", plot), result["summary"])


if __name__ == "__main__":
    main()
