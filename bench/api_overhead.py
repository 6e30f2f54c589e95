"""API overhead: sampling through the Tinker-compatible API (official SDK) ÷ the direct inference client.

Both paths hit the same vLLM server actor with the same requests (fixed length: ``stop=[]``), in
alternating rounds so drift hits both: at concurrency 1 the ratio of median latencies (target ≤ 1.15),
at concurrency 32 the ratio of tokens/s (target ≥ 0.9), taken per round (the paths of one round run
back to back, so a drift of the machine between rounds cancels) and reported as the median over rounds;
the ratio of the per-path medians is reported beside it. A third path, plain HTTP to the API, shows the
service's own cost without the SDK's client work.

At concurrency 32 the load comes from ``--client-processes`` processes for every path alike (32 in
flight in all): users of a shared backend are many processes, and one Python process driving 32
SDK calls measures that process's GIL rather than the service (the SDK runs its own event-loop
thread beside the caller's threads). The service itself runs in its own Ray actor, as deployed.

    python -m bench.api_overhead --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from bench.common import CpuMeter, actor_pid, add_common_args, machine_name, tiny_setup, today, write_result

logger = logging.getLogger("bench.api_overhead")
KEY = "tml-bench-0123456789"
PATHS = ("api", "direct", "api_raw_http")


@dataclass(frozen=True)
class Target:
    """Where and what to sample; crosses into the client processes."""

    api_url: str
    server_url: str
    base_model: str
    prompt: tuple[int, ...]
    max_tokens: int


# ---------------------------------------------------------------------------------------------- clients
def _sdk_sampler(t: Target):
    import tinker

    client = tinker.ServiceClient(base_url=t.api_url, api_key=KEY).create_sampling_client(base_model=t.base_model)
    return client.result() if hasattr(client, "result") else client  # SDK 0.38 hands back a future


def _sdk_one(sampler, t: Target) -> int:
    from tinker import types

    res = sampler.sample(types.ModelInput.from_ints(list(t.prompt)), 1,
                         types.SamplingParams(max_tokens=t.max_tokens, temperature=1.0, stop=[])).result()
    return len(res.sequences[0].tokens)


async def _raw_session(http, t: Target) -> str:
    async with http.post(f"{t.api_url}/api/v1/create_session", json={}) as r:
        sid = (await r.json())["session_id"]
    async with http.post(f"{t.api_url}/api/v1/create_sampling_session", json={
            "session_id": sid, "sampling_session_seq_id": 0, "base_model": t.base_model}) as r:
        return (await r.json())["sampling_session_id"]


async def _raw_one(http, sampler_id: str, t: Target) -> int:
    """asample + retrieve_future over plain HTTP (aiohttp), without the SDK's client work."""
    async with http.post(f"{t.api_url}/api/v1/asample", json={
            "sampling_session_id": sampler_id, "prompt": {"chunks": [{"tokens": list(t.prompt)}]},
            "sampling_params": {"max_tokens": t.max_tokens, "temperature": 1.0, "stop": []}}) as r:
        rid = (await r.json())["request_id"]
    while True:
        async with http.post(f"{t.api_url}/api/v1/retrieve_future", json={"request_id": rid}) as r:
            if "protobuf" in r.headers.get("content-type", ""):
                await r.read()
                return t.max_tokens
            body = await r.json()
            if "error" in body:
                raise RuntimeError(str(body))


async def _async_load(path: str, t: Target, n: int, concurrency: int) -> int:
    import aiohttp

    from skyrl_lora.inference.client import RemoteInferenceClient

    sem = asyncio.Semaphore(concurrency)
    if path == "direct":
        client = RemoteInferenceClient(t.server_url)
        params = {"max_tokens": t.max_tokens, "temperature": 1.0, "ignore_eos": True}

        async def one() -> int:
            async with sem:
                (s,) = await client.sample_with_retry(list(t.prompt), params)
                return len(s.token_ids)
        try:
            return sum(await asyncio.gather(*(one() for _ in range(n))))
        finally:
            await client.aclose()
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}, timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        sampler_id = await _raw_session(http, t)

        async def raw() -> int:
            async with sem:
                return await _raw_one(http, sampler_id, t)
        return sum(await asyncio.gather(*(raw() for _ in range(n))))


_SDK_SAMPLER = None


def client_load(path: str, t: Target, n: int, concurrency: int) -> int:
    """Runs in a client process: ``n`` requests, ``concurrency`` in flight; returns tokens received."""
    global _SDK_SAMPLER
    if path != "api":
        return asyncio.run(_async_load(path, t, n, concurrency))
    if _SDK_SAMPLER is None:  # one SDK client per process, as an application would hold it
        _SDK_SAMPLER = _sdk_sampler(t)
    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(lambda _: _sdk_one(_SDK_SAMPLER, t), range(n)))


def throughput(pool: ProcessPoolExecutor, processes: int, path: str, t: Target, n: int, concurrency: int) -> float:
    share, extra = divmod(n, processes)
    conc, cextra = divmod(concurrency, processes)
    t0 = time.perf_counter()
    futures = [pool.submit(client_load, path, t, share + (i < extra), conc + (i < cextra)) for i in range(processes)]
    tokens = sum(f.result() for f in futures)
    return tokens / (time.perf_counter() - t0)


class SerialClients:
    """Concurrency 1: one long-lived client per path in this process, one request at a time."""

    def __init__(self, t: Target) -> None:
        import aiohttp

        from skyrl_lora.inference.client import RemoteInferenceClient

        self.t = t
        self.loop = asyncio.new_event_loop()
        self.sdk = _sdk_sampler(t)
        self.direct = RemoteInferenceClient(t.server_url)

        async def raw_setup() -> tuple:
            http = aiohttp.ClientSession(headers={"X-API-Key": KEY}, timeout=aiohttp.ClientTimeout(total=120))
            return http, await _raw_session(http, t)
        self.http, self.sampler_id = self.loop.run_until_complete(raw_setup())
        self.params = {"max_tokens": t.max_tokens, "temperature": 1.0, "ignore_eos": True}

    def timed(self, path: str) -> float:
        t0 = time.perf_counter()
        if path == "api":
            _sdk_one(self.sdk, self.t)
        elif path == "direct":
            self.loop.run_until_complete(self.direct.sample_with_retry(list(self.t.prompt), self.params))
        else:
            self.loop.run_until_complete(_raw_one(self.http, self.sampler_id, self.t))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.loop.run_until_complete(self.http.close())
        self.loop.run_until_complete(self.direct.aclose())
        self.loop.close()


# ---------------------------------------------------------------------------------------------- main
def _plot(result: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    ax1.boxplot([result["samples"]["latency_s"][p] for p in ("direct", "api_raw_http", "api")])
    ax1.set_xticks([1, 2, 3], ["direct client", "API (plain HTTP)", "API (tinker SDK)"])
    ax1.set_ylabel("latency, s")
    ax1.set_title(f"concurrency 1: ratio {result['latency_ratio_c1']:.3f} (target ≤ 1.15)")
    names = ["direct", "api_raw_http", "api"]
    ax2.bar(["direct", "API (HTTP)", "API (SDK)"], [result["tokens_per_s_median"][n] for n in names],
            color=["tab:gray", "tab:cyan", "tab:blue"])
    ax2.set_ylabel("tokens/s")
    ax2.set_title(f"concurrency {result['concurrency']} ({result['client_processes']} client processes): "
                  f"paired ratio {result['throughput_ratio_c32']:.3f} (target ≥ 0.9)", fontsize=9)
    cpu = result.get("cpu_ms_per_sample_c32")
    if cpu:  # who burns the cores, per sample: on a small box the clients share them with vLLM
        bottom = [0.0, 0.0, 0.0]
        for group, colour in (("vllm", "tab:gray"), ("api", "tab:blue"), ("clients", "tab:orange")):
            heights = [cpu[n].get(group, 0.0) for n in names]
            ax3.bar(["direct", "API (HTTP)", "API (SDK)"], heights, bottom=bottom, color=colour, label=group)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax3.set_ylabel("CPU ms per sample")
        ax3.set_title(f"CPU per sample at concurrency {result['concurrency']}, by process", fontsize=9)
        ax3.legend(fontsize=8)
    fig.suptitle(f"{result['machine']} · {result['date']} · {result['max_tokens']} tokens per sample")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def replot(json_path: Path) -> None:
    """Redraw a result's PNG from its JSON (``python -m bench.api_overhead --replot <json>``)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    _plot(json.loads(json_path.read_text()), json_path.with_name(json_path.name.removesuffix(".json") + ".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serial-requests", type=int, default=16, help="requests per path per round, concurrency 1")
    parser.add_argument("--concurrent-requests", type=int, default=512, help="requests per path per round at c32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--client-processes", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of this result JSON")
    add_common_args(parser, model=False)
    args = parser.parse_args()
    if args.replot is not None:
        replot(args.replot)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["TINKER_TELEMETRY"] = "0"

    import ray

    from skyrl_lora.api.server import start_api_actor
    from skyrl_lora.api.settings import ApiSettings
    from skyrl_lora.cluster import start_local_ray
    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.server import ServerConfig
    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig

    setup = tiny_setup("def main():\n    print('hello')")
    root = Path(tempfile.mkdtemp(prefix="api-bench-"))
    start_local_ray(num_cpus=4, namespace=None)
    server, url = start_server_actor(ServerConfig(model=setup.base, max_loras=4, max_lora_rank=16, max_model_len=1024),
                                     num_gpus=args.num_gpus)
    trainer = start_trainer_actor(TrainerConfig(base_model=setup.base, state_dir=root / "t", sampler_root=root / "a",
                                                inference_urls=(url,), max_lora_rank=16), num_gpus=0)
    api_actor, api_url = start_api_actor(ApiSettings(base_model=setup.base, data_dir=root / "api",
                                                     api_keys={KEY: "bench"}), trainer, [url])
    target = Target(api_url=api_url, server_url=url, base_model=setup.base, prompt=tuple(setup.prompt),
                    max_tokens=args.max_tokens)

    procs = args.client_processes
    lat: dict[str, list[float]] = {p: [] for p in PATHS}
    tps: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}  # CPU seconds per sample, by process group
    serial = SerialClients(target)
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        for path in PATHS:  # warm-up: imports in every client process, kernels, connections, the database
            throughput(pool, procs, path, target, 2 * procs, procs)
            serial.timed(path)
        meter = CpuMeter({"vllm": [actor_pid(server)], "api": [actor_pid(api_actor)],
                          "clients": list(pool._processes)})  # the pool's workers all exist after the warm-up
        for r in range(args.rounds):
            order = PATHS if r % 2 == 0 else PATHS[::-1]
            for path in order:  # concurrency 1: one request at a time, long-lived clients in this process
                lat[path] += [serial.timed(path) for _ in range(args.serial_requests)]
            for path in order:
                before = meter.read()
                tps[path].append(throughput(pool, procs, path, target, args.concurrent_requests, args.concurrency))
                used = CpuMeter.delta(before, meter.read())
                cpu[path].append({k: v / args.concurrent_requests for k, v in used.items()})
            logger.info("round %d: median latency api %.3f raw %.3f direct %.3f; tok/s api %.0f raw %.0f direct %.0f",
                        r, *(statistics.median(lat[p]) for p in ("api", "api_raw_http", "direct")),
                        *(tps[p][-1] for p in ("api", "api_raw_http", "direct")))
    serial.close()
    ray.get(api_actor.stop.remote())
    ray.shutdown()
    med_lat = {k: statistics.median(v) for k, v in lat.items()}
    med_tps = {k: statistics.median(v) for k, v in tps.items()}

    def paired(path: str) -> float:
        return statistics.median(a / d for a, d in zip(tps[path], tps["direct"]))
    result = {
        "machine": machine_name(args.machine), "date": today(), "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "client_processes": procs, "rounds": args.rounds,
        "latency_s_median": med_lat, "latency_ratio_c1": med_lat["api"] / med_lat["direct"],
        "tokens_per_s_median": med_tps, "throughput_ratio_c32": paired("api"),
        "throughput_ratio_c32_of_medians": med_tps["api"] / med_tps["direct"],
        "service_only": {"latency_ratio_c1": med_lat["api_raw_http"] / med_lat["direct"],
                         "throughput_ratio_c32": paired("api_raw_http"),
                         "throughput_ratio_c32_of_medians": med_tps["api_raw_http"] / med_tps["direct"]},
        "targets": {"latency_ratio_c1": "<= 1.15", "throughput_ratio_c32": ">= 0.9"},
        "cpu_ms_per_sample_c32": {p: {k: 1000 * statistics.median(r[k] for r in cpu[p]) for k in cpu[p][0]}
                                   for p in PATHS},
        "samples": {"latency_s": lat, "tokens_per_s": tps, "cpu_s_per_sample": cpu},
    }
    print(write_result(result, args.out, "api-overhead", _plot))
    logger.info("CPU ms per sample at c%d: %s", args.concurrency, result["cpu_ms_per_sample_c32"])
    logger.info("latency ratio c1 %.3f, throughput ratio c%d %.3f (plain HTTP %.3f)", result["latency_ratio_c1"],
                args.concurrency, result["throughput_ratio_c32"], result["service_only"]["throughput_ratio_c32"])


if __name__ == "__main__":
    main()
