"""A new version as peft files against the same version as the server's ready slot image, side by side.

The trainer's part and the server's, without a trainer: one set of float32 weights (what a trainer
holds) is published again and again, alternately as ``adapter_model.safetensors`` in the servers'
dtype (what ``save_weights_for_sampler`` wrote before) and as a slot image laid out by the server's
plan (``inference/slot_image.py``), each into shared memory. Per publication: the export (writing
the directory), the sync (``update_lora``: check, stage, flip) and a one-token request on the new
version; and the workers' own timings of what they did (vLLM's loader, a builder, or mapping the
ready image). A Llama of production shape (``--shape 8b``) on a GPU, a mid-size one on a CPU.

    python -m bench.image_publish --shape mid-cpu --rank 128 --rounds 6             # CPU
    python -m bench.image_publish --shape 8b --rank 32 --num-gpus 1 --rounds 8      # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import add_common_args, finish_figure, machine_name, today, write_result

logger = logging.getLogger("bench.image_publish")
TENANT = "publisher"
WAYS = ("files", "image")


def _weights(model: Path, rank: int, work: Path) -> dict[str, Any]:
    """Random float32 weights of every projection of ``model``, as a trainer holds them."""
    from safetensors.torch import load_file

    from skyrl_lora.models.synthetic import write_random_adapter

    return load_file(str(write_random_adapter(work / "weights", model, rank, seed=7, dtype="float32")
                         / "adapter_model.safetensors"))


def _export(way: str, out: Path, config: Path, weights: dict[str, Any], plan: Any, scaling: float) -> None:
    import torch
    from safetensors.torch import save_file

    from skyrl_lora.inference.slot_image import write_image

    out.mkdir(parents=True)
    shutil.copyfile(config, out / "adapter_config.json")
    if way == "files":
        save_file({k: t.to(torch.bfloat16) for k, t in weights.items()}, str(out / "adapter_model.safetensors"))
    else:
        write_image(out, plan, weights, scaling)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from bench.sync_stall import SHAPES
    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.inference.server import ServerConfig
    from skyrl_lora.models.synthetic import write_dummy_model, write_random_adapter
    from skyrl_lora.models.tiny import build_fixtures

    fixtures = build_fixtures()
    work = Path(tempfile.mkdtemp(prefix="image-publish-"))
    shm = Path(tempfile.mkdtemp(prefix="image-publish-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    model = write_dummy_model(work / "model", SHAPES[args.shape], fixtures.base)
    first = write_random_adapter(work / "v0", model, args.rank, seed=1)
    weights = _weights(model, args.rank, work)
    config_file = first / "adapter_config.json"
    alpha = json.loads(config_file.read_text())["lora_alpha"]
    nbytes = sum(t.numel() * 2 for t in weights.values())
    server_config = ServerConfig(model=str(model), loras={TENANT: str(first)}, max_loras=4, max_lora_rank=args.rank,
                                 max_model_len=512, enforce_eager=args.num_gpus == 0, gpu_memory_utilization=0.85,
                                 slot_builders=args.slot_builders, extra_args=("--load-format", "dummy"))
    actor, url = start_server_actor(server_config, num_gpus=args.num_gpus, num_cpus=1)
    client = RemoteInferenceClient(url)
    publications: list[dict[str, Any]] = []
    try:
        (layout,) = await client.slot_plans()
        if layout.plan is None:
            raise SystemExit("the server has no slot plan: nothing to compare")
        await client.sample([1, 2, 3], {"max_tokens": 2, "temperature": 0.0}, TENANT)
        for r in range(args.rounds):
            for way in (WAYS if r % 2 == 0 else WAYS[::-1]):  # alternate which goes first
                out = shm / f"{way}-{r}"
                before = ray.get(actor.stage_timings.remote(), timeout=60)
                t0 = time.perf_counter()
                await asyncio.to_thread(_export, way, out, config_file, weights, layout.plan, alpha / args.rank)
                t1 = time.perf_counter()
                (reply,) = await client.update_lora(TENANT, str(out), mode="abort")
                t2 = time.perf_counter()
                await client.sample([1, 2, 3], {"max_tokens": 1, "temperature": 0.0}, TENANT)
                t3 = time.perf_counter()
                after = ray.get(actor.stage_timings.remote(), timeout=60)
                worker = {k: sum(after[k][len(before.get(k, [])):]) for k in after if len(after[k]) > len(before.get(k, []))}
                publications.append({"way": way, "round": r, "export_ms": 1000 * (t1 - t0), "sync_ms": 1000 * (t2 - t1),
                                     # inside the sync: the server's check and staging; the flip's add_lora
                                     "staging_ms": 1000 * reply.staging_s, "flip_ms": 1000 * reply.load_s,
                                     "first_token_ms": 1000 * (t3 - t2), "save_to_first_token_ms": 1000 * (t3 - t0),
                                     "worker_ms": worker})
                logger.info("%s", publications[-1])
    finally:
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    for way in WAYS:
        mine = [p for p in publications if p["way"] == way]
        summary[way] = {f"{k}_p50": statistics.median(p[k] for p in mine)
                        for k in ("export_ms", "sync_ms", "staging_ms", "flip_ms", "first_token_ms",
                                  "save_to_first_token_ms")}
    summary["image_over_files"] = {k: summary["image"][k] / summary["files"][k] for k in summary["files"]}
    return {"machine": machine_name(args.machine), "date": today(),
            "config": {"shape": args.shape, "rank": args.rank, "rounds": args.rounds, "num_gpus": args.num_gpus,
                       "slot_builders": args.slot_builders, "adapter_bytes_bf16": nbytes},
            "publications": publications, "summary": summary}


def _plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    parts = ("export_ms", "sync_ms", "first_token_ms")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, way in enumerate(WAYS):
        left = 0.0
        for part, colour in zip(parts, ("#4c72b0", "#dd8452", "#55a868")):
            width = result["summary"][way][f"{part}_p50"]
            ax.barh(i, width, left=left, color=colour, label=part.removesuffix("_ms") if i == 0 else None)
            left += width
    ax.set_yticks(range(len(WAYS)), WAYS)
    ax.set_xlabel("ms, p50 of each publication's parts")
    ax.legend(fontsize=7)
    cfg = result["config"]
    finish_figure(fig, png, f"{result['machine']}: {cfg['shape']} rank {cfg['rank']} "
                            f"({cfg['adapter_bytes_bf16'] / 1e6:.0f} MB bf16), files vs ready slot image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, model=False)
    parser.add_argument("--shape", choices=("8b", "mid-cpu"), default="mid-cpu")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--slot-builders", action=argparse.BooleanOptionalAction, default=False,
                        help="the server builds files' images in builder processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(_run(args))
    path = write_result(result, args.out, f"image-publish-{args.shape}-r{args.rank}", _plot)
    logger.info("wrote %s: %s", path, result["summary"])


if __name__ == "__main__":
    main()
