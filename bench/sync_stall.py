"""Does one tenant's sync stall everyone else? Side by side, at a size where adapter loads cost.

A Llama of production shape (``--shape 8b``: hidden 4096, 32 layers; ``mid-cpu`` for a CPU) served
with ``--load-format dummy``, random adapters of rank ``--rank`` on every projection, tenants
``t0..`` each keeping ``--streams`` greedy ``sample_with_retry`` requests in flight, and one watching
tenant streaming through ``/v1/completions`` whose gaps between tokens show any engine stall.

Windows (interleaved, ``--rounds`` times): ``nosync``; ``one``: t0 syncs once a second; ``all``:
every tenant syncs once every ``--all-period`` seconds (staggered); ``engine-wide``: t0 syncs once a
second under an engine-wide pause (vLLM's stock way); ``legacy``: like ``one``, but the engine reads
the adapter inside ``add_lora`` on its step loop (this project's path before staging);
``all-inplace`` and ``one-inplace``: like ``all`` and ``one`` in ``inplace`` mode (running requests
take the new weights, no abort, so no re-prefill: what a sync costs the others without the syncing
tenant's own re-prefills).

``--sources images`` publishes every version as a ready slot image in shared memory, laid out by the
server's plan (what ``save_weights_for_sampler`` publishes when the trainer is on the servers' node),
instead of peft files the server must read and lay out itself.

    python -m bench.sync_stall --shape 8b --num-gpus 1 --rank 32 --tenants 8   # GPU, production size
    python -m bench.sync_stall --shape mid-cpu --rank 64 --tenants 2 --window-s 8    # CPU
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

from bench import pyspy
from bench.common import add_common_args, machine_name, today, write_result
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.loadgen import GapStats, run_streams, watch_gaps
from skyrl_lora.models.synthetic import LLAMA_8B, MID_CPU, write_dummy_model, write_random_adapter

logger = logging.getLogger("bench.sync_stall")
SHAPES = {"8b": LLAMA_8B, "mid-cpu": MID_CPU}
WATCHER = "watch"
# the "all" windows sync every tenant, the others but nosync the first one
WINDOWS = ("nosync", "one", "one-inplace", "legacy", "all", "all-inplace", "engine-wide")


def _tenant(i: int) -> str:
    return f"t{i}"


async def _syncs(client: RemoteInferenceClient, tenants: list[str], paths: dict[str, list[str]], period_s: float,
                 duration_s: float, *, off_loop: bool = True, engine_wide: bool = False, mode: str = "abort",
                 parts: list[tuple[float, float]] | None = None) -> list[float]:
    """Each tenant syncs once per ``period_s`` (staggered over the period); returns sync latencies.
    ``parts`` collects (staging_s, load_s at the flip) of each sync."""
    latencies: list[float] = []

    async def one(k: int, tenant: str) -> None:
        await asyncio.sleep(period_s * k / len(tenants))
        deadline = time.perf_counter() + duration_s
        i = 0
        while time.perf_counter() + period_s <= deadline:
            t = time.perf_counter()
            path = paths[tenant][i % 2]
            if engine_wide:
                await client.pause_generation(None, lease_s=30)
                try:
                    await client.load_lora_adapter(tenant, path, load_inplace=True, mode="inplace")
                finally:
                    await client.resume_generation(None)
            else:
                replies = await client.update_lora(tenant, path, mode=mode, off_loop=off_loop)  # type: ignore[arg-type]
                if parts is not None:
                    parts.append((max(r.staging_s for r in replies), max(r.load_s for r in replies)))
            latencies.append(time.perf_counter() - t)
            i += 1
            await asyncio.sleep(max(0.0, period_s - (time.perf_counter() - t)))

    await asyncio.gather(*(one(k, t) for k, t in enumerate(tenants)))
    return latencies


async def _as_images(client: RemoteInferenceClient, paths: dict[str, list[str]], shm: Path) -> dict[str, list[str]]:
    """Each version's peft directory published again as the server's ready slot image."""
    import json
    import shutil

    from safetensors.torch import load_file

    from skyrl_lora.inference.slot_image import write_image

    (layout,) = await client.slot_plans()
    if layout.plan is None:
        raise SystemExit("the server has no slot plan: --sources images cannot apply")
    out: dict[str, list[str]] = {}
    for tenant, dirs in paths.items():
        out[tenant] = []
        for d in dirs:
            config = json.loads((Path(d) / "adapter_config.json").read_text())
            image_dir = shm / Path(d).name
            image_dir.mkdir(parents=True)
            shutil.copyfile(Path(d) / "adapter_config.json", image_dir / "adapter_config.json")
            weights = load_file(str(Path(d) / "adapter_model.safetensors"))
            await asyncio.to_thread(write_image, image_dir, layout.plan, weights, config["lora_alpha"] / config["r"])
            out[tenant].append(str(image_dir))
    return out


async def _stage_timings(actor: Any) -> dict[str, list[float]]:
    return dict(await actor.stage_timings.remote())


async def _window(name: str, client: RemoteInferenceClient, url: str, prompt_ids: list[int], prompt_text: str,
                  tenants: list[str], paths: dict[str, list[str]], args: argparse.Namespace,
                  actor: Any, rnd: int) -> dict[str, Any]:
    assert name in WINDOWS, name
    syncing = [] if name == "nosync" else tenants if name.startswith("all") else tenants[:1]
    period = args.all_period if name.startswith("all") else 1.0
    parts: list[tuple[float, float]] = []
    before = {k: len(v) for k, v in (await _stage_timings(actor)).items()}
    jobs: list[Any] = [run_streams(client, t, prompt_ids, streams=args.streams, max_tokens=args.max_tokens,
                                   duration_s=args.window_s) for t in tenants]
    jobs.append(watch_gaps(url, WATCHER, prompt_text, duration_s=args.window_s, max_tokens=args.max_tokens))
    if syncing:
        jobs.append(_syncs(client, syncing, paths, period, args.window_s, off_loop=name != "legacy",
                           engine_wide=name == "engine-wide", mode="inplace" if name.endswith("-inplace") else "abort",
                           parts=parts))
    recordings = []
    if name in args.profile_windows and args.py_spy:
        pids = pyspy.server_processes(await actor.engine_pids.remote())
        recordings = pyspy.start(args.py_spy, pids, args.window_s, Path(args.out) / "profiles",
                                 f"{args.label}-{name}-r{rnd}")
    (state_before,) = await client.state()
    results = await asyncio.gather(*jobs)
    (state_after,) = await client.state()
    profile = pyspy.finish(recordings) if recordings else None
    streams = results[: len(tenants)]
    gaps: GapStats = results[len(tenants)]
    latencies = results[len(tenants) + 1] if syncing else []
    others = [s for s in streams if s.tenant not in syncing] or streams
    # the worker's own time per flip from a slot image, and per load and slot image off the loop
    timings = {k: v[before.get(k, 0):] for k, v in (await _stage_timings(actor)).items()}
    return {
        "window": name, "round": rnd, "tokens_per_s": sum(s.tokens for s in streams) / max(s.seconds for s in streams),
        # per tenant, so windows with different numbers of non-syncing tenants compare
        "others_tokens_per_s_per_tenant": sum(s.tokens for s in others) / max(s.seconds for s in others) / len(others),
        "requests": sum(s.requests for s in streams), "segments": sum(s.segments for s in streams),
        "reprefill_tokens": sum(s.reprefill_tokens for s in streams),
        "reprefill_tokens_per_sync": sum(s.reprefill_tokens for s in streams) / len(latencies) if latencies else None,
        # of every token the engine took in (prompts, continuations' re-prefills, generated tokens),
        # the share that was re-prefilled: work an abort sync adds (none is generated twice)
        "reprefill_token_share": sum(s.reprefill_tokens for s in streams) / max(1, sum(
            s.reprefill_tokens + s.tokens + s.requests * len(prompt_ids) for s in streams)),
        "watch_p50_ms": 1e3 * gaps.quantile(0.5), "watch_p99_ms": 1e3 * gaps.quantile(0.99),
        "watch_max_ms": 1e3 * gaps.max_s, "watch_tokens": gaps.tokens, "syncs": len(latencies),
        "sync_p50_ms": 1e3 * statistics.median(latencies) if latencies else None,
        "sync_max_ms": 1e3 * max(latencies) if latencies else None,
        "staging_p50_ms": 1e3 * statistics.median(p[0] for p in parts) if parts else None,
        "flip_load_p50_ms": 1e3 * statistics.median(p[1] for p in parts) if parts else None,
        "flip_load_max_ms": 1e3 * max(p[1] for p in parts) if parts else None,
        **{f"engine_{k[:-3]}_p50_ms": statistics.median(v) if v else None for k, v in timings.items()},
        "engine_flip_max_ms": max(timings.get("flip_ms") or [float("nan")]),
        # status calls the engine core answered while staging (0 while the stage channel carries it all)
        "stage_asks": state_after.stage_asks - state_before.stage_asks,
        "stage_notices": (state_after.stage_notices or 0) - (state_before.stage_notices or 0),
        **({"profile": profile} if profile is not None else {}),
    }


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for w in windows:
        by.setdefault(w["window"], []).append(w)
    med = {k: {m: statistics.median([w[m] for w in ws if w[m] is not None] or [float("nan")])
               for m in ws[0] if m not in ("window", "profile")} for k, ws in by.items()}
    base = med["nosync"]
    out: dict[str, Any] = {"median": med}
    for k, m in med.items():
        out[f"{k}_tokens_ratio"] = m["tokens_per_s"] / base["tokens_per_s"]
        out[f"{k}_others_ratio"] = m["others_tokens_per_s_per_tenant"] / base["others_tokens_per_s_per_tenant"]
        out[f"{k}_p99_gap_ratio"] = m["watch_p99_ms"] / base["watch_p99_ms"]
        out[f"{k}_max_gap_over_nosync_p99"] = m["watch_max_ms"] / base["watch_p99_ms"]
    if "all" in med and "all-inplace" in med:  # what aborting costs beside flipping in place, side by side
        out["abort_cost_vs_inplace"] = 1 - med["all"]["tokens_per_s"] / med["all-inplace"]["tokens_per_s"]
    return out


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    med = result["summary"]["median"]
    names = list(med)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [med[n]["tokens_per_s"] for n in names], color="tab:blue")
    axes[0].set_ylabel("delivered tokens/s (all tenants)")
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [med[n]["watch_p99_ms"] for n in names], width=0.4, label="p99 gap")
    axes[1].bar([i + 0.2 for i in x], [med[n]["watch_max_ms"] for n in names], width=0.4, label="max gap")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("watching tenant's gap between tokens (ms)")
    axes[1].legend()
    fig.suptitle(f"{result['machine']}: {result['config']['shape']} rank {result['config']['rank']}, "
                 f"{result['config']['tenants']} tenants")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.server import ServerConfig
    from skyrl_lora.models.tiny import build_fixtures

    fixtures = build_fixtures()
    work = Path(tempfile.mkdtemp(prefix="sync-stall-"))
    model = write_dummy_model(work / "model", SHAPES[args.shape], fixtures.base)
    tenants = [_tenant(i) for i in range(args.tenants)]
    paths = {t: [str(write_random_adapter(work / f"{t}-v{v}", model, args.rank, seed=10 * i + v))
                 for v in range(2)] for i, t in enumerate(tenants)}
    watch_path = str(write_random_adapter(work / "watch", model, args.rank, seed=999))
    config = ServerConfig(model=str(model), loras={WATCHER: watch_path, **{t: p[0] for t, p in paths.items()}},
                          # a flip briefly has a tenant's old and new version in one batch
                          max_loras=2 * args.tenants + 2, max_cpu_loras=2 * args.tenants + 4, max_lora_rank=args.rank,
                          max_model_len=1024, enforce_eager=args.num_gpus == 0, gpu_memory_utilization=0.85,
                          stage_threads=args.stage_threads, slot_builders=args.slot_builders,
                          stage_channel=args.stage_channel, check_processes=args.check_processes,
                          extra_args=("--load-format", "dummy"))
    actor, url = start_server_actor(config, num_gpus=args.num_gpus, num_cpus=1)
    client = RemoteInferenceClient(url)
    tok = AutoTokenizer.from_pretrained(fixtures.base)
    prompt_text = "def handle(request):\n    user = request.user\n    if not user.is_authenticated:\n"
    prompt_ids = tok(prompt_text)["input_ids"]
    shm = Path(tempfile.mkdtemp(prefix="sync-stall-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        images = None
        if args.sources == "images":
            images = await _as_images(client, paths, shm)
        for t in tenants + [WATCHER]:  # warm every adapter and the graphs once
            await client.sample(prompt_ids, {"max_tokens": 8, "temperature": 0.0}, t)
        windows: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for name in args.windows:
                # the old in-loop load (legacy) reads peft files: it has no way to take a slot image
                sources = images if images is not None and name != "legacy" else paths
                w = await _window(name, client, url, prompt_ids, prompt_text, tenants, sources, args, actor, r)
                logger.info("%s", w)
                windows.append(w)
    finally:
        import shutil

        import ray

        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)
        shutil.rmtree(shm, ignore_errors=True)
    return {"machine": machine_name(args.machine), "date": today(), "config": {
        "shape": args.shape, "rank": args.rank, "tenants": args.tenants, "streams": args.streams,
        "max_tokens": args.max_tokens, "window_s": args.window_s, "rounds": args.rounds, "all_period_s": args.all_period,
        "num_gpus": args.num_gpus, "cuda_graphs": args.num_gpus > 0,
        "stage_threads": args.stage_threads, "slot_builders": args.slot_builders, "stage_channel": args.stage_channel,
        "check_processes": args.check_processes, "sources": args.sources},
        "windows": windows, "summary": summarize(windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, model=False)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid-cpu")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--streams", type=int, default=2, help="requests in flight per tenant")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stage-threads", type=int, default=1, help="the server's staging threads")
    parser.add_argument("--slot-builders", action=argparse.BooleanOptionalAction, default=False,
                        help="slot images built in builder processes, or on the staging threads (the default)")
    parser.add_argument("--stage-channel", action=argparse.BooleanOptionalAction, default=True,
                        help="staging around the engine's loop (stage_channel), or through collective_rpc")
    parser.add_argument("--check-processes", type=int, default=1,
                        help="processes checking adapters before staging (0: a thread of the server's process)")
    parser.add_argument("--sources", choices=("files", "images"), default="files",
                        help="versions as peft files, or as ready slot images laid out by the server's plan")
    parser.add_argument("--all-period", type=float, default=1.0, help="each tenant's sync period in the 'all' window")
    parser.add_argument("--windows", nargs="+", default=["nosync", "one", "legacy", "all", "all-inplace", "engine-wide"],
                        choices=WINDOWS)
    parser.add_argument("--profile-windows", nargs="*", default=[],
                        help="windows whose server processes py-spy samples (bench/pyspy.py; needs py-spy)")
    parser.add_argument("--py-spy", default=None, help="the py-spy binary (default: found on PATH or PYTHONPATH)")
    parser.add_argument("--label", default="", help="a name for this run's profiles")
    args = parser.parse_args()
    args.label = args.label or ("images" if args.sources == "images" else
                                "builders" if args.slot_builders else "threads")
    if args.profile_windows:
        args.py_spy = pyspy.find_py_spy(args.py_spy)
        if args.py_spy is None:
            parser.error("--profile-windows needs py-spy (pip install py-spy, or --py-spy PATH)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    result = asyncio.run(run(args))
    path = write_result(result, args.out, f"sync-stall-{args.shape}-r{args.rank}-t{args.tenants}-{args.label}", plot)
    logger.info("wrote %s: %s", path, {k: v for k, v in result["summary"].items() if k != "median"})


if __name__ == "__main__":
    main()
