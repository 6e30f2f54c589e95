"""API overhead: sampling through the Tinker-compatible API (official SDK) ÷ the direct inference client.

Both paths hit the same vLLM server actor with the same requests (fixed length: ``stop=[]``), in
alternating rounds so drift hits both: at concurrency 1 the ratio of median latencies (target ≤ 1.15),
at concurrency 32 the ratio of tokens/s (target ≥ 0.9).

    python -m bench.api_overhead --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import machine_name, today, write_result

logger = logging.getLogger("bench.api_overhead")
KEY = "tml-bench-0123456789"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serial-requests", type=int, default=16, help="requests per path per round, concurrency 1")
    parser.add_argument("--concurrent-requests", type=int, default=96, help="requests per path per round, concurrency 32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["TINKER_TELEMETRY"] = "0"

    import ray
    import tinker
    from tinker import types
    from transformers import AutoTokenizer

    from skyrl_lora.api.server import start_api_actor
    from skyrl_lora.api.settings import ApiSettings
    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.client import RemoteInferenceClient
    from skyrl_lora.inference.server import ServerConfig
    from skyrl_lora.models.tiny import build_fixtures
    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig

    fx = build_fixtures()
    root = Path(tempfile.mkdtemp(prefix="api-bench-"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    server, url = start_server_actor(ServerConfig(model=str(fx.base), max_loras=4, max_lora_rank=16, max_model_len=1024),
                                     num_gpus=args.num_gpus)
    trainer = start_trainer_actor(TrainerConfig(base_model=str(fx.base), state_dir=root / "t", sampler_root=root / "a",
                                                inference_urls=(url,), max_lora_rank=16), num_gpus=0)
    # The service in its own process, as deployed (sharing this client's GIL would bill it for the SDK's CPU).
    api_actor, api_url = start_api_actor(ApiSettings(base_model=str(fx.base), data_dir=root / "api",
                                                     api_keys={KEY: "bench"}), trainer, [url])
    tok = AutoTokenizer.from_pretrained(fx.base)
    prompt = tok("def main():\n    print('hello')")["input_ids"]
    sampler = tinker.ServiceClient(base_url=api_url, api_key=KEY).create_sampling_client(base_model=str(fx.base))
    sdk_params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop=[])
    direct = RemoteInferenceClient(url)
    direct_params = {"max_tokens": args.max_tokens, "temperature": 1.0, "ignore_eos": True}
    loop = asyncio.new_event_loop()

    def via_api() -> int:
        res = sampler.sample(types.ModelInput.from_ints(prompt), 1, sdk_params).result()
        return len(res.sequences[0].tokens)

    async def via_direct_one() -> int:
        (s,) = await direct.sample_with_retry(prompt, direct_params)
        return len(s.token_ids)

    import httpx

    raw_http = httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": KEY}, timeout=60)
    sid = loop.run_until_complete(raw_http.post("/api/v1/create_session", json={})).json()["session_id"]
    sampler_id = loop.run_until_complete(raw_http.post("/api/v1/create_sampling_session", json={
        "session_id": sid, "sampling_session_seq_id": 0, "base_model": str(fx.base)})).json()["sampling_session_id"]

    async def via_raw_one() -> int:
        """The service's own cost: asample + retrieve_future over plain HTTP, without the SDK's client work."""
        r = await raw_http.post("/api/v1/asample", json={
            "sampling_session_id": sampler_id, "prompt": {"chunks": [{"tokens": prompt}]},
            "sampling_params": {"max_tokens": args.max_tokens, "temperature": 1.0, "stop": []}})
        rid = r.json()["request_id"]
        while True:
            r = await raw_http.post("/api/v1/retrieve_future", json={"request_id": rid})
            if "protobuf" in r.headers.get("content-type", ""):
                return args.max_tokens
            if "error" in r.json():
                raise RuntimeError(r.text)

    def serial(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    pool = ThreadPoolExecutor(args.concurrency)

    def concurrent_api(n: int) -> float:
        t0 = time.perf_counter()
        tokens = sum(pool.map(lambda _: via_api(), range(n)))
        return tokens / (time.perf_counter() - t0)

    def concurrent_direct(n: int, one_request=None) -> float:
        one_request = one_request or via_direct_one

        async def run() -> float:
            sem = asyncio.Semaphore(args.concurrency)

            async def one() -> int:
                async with sem:
                    return await one_request()
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one() for _ in range(n))))
            return tokens / (time.perf_counter() - t0)
        return loop.run_until_complete(run())

    serial(via_api, 4)  # warm-up: kernels, connections, the database
    serial(lambda: loop.run_until_complete(via_direct_one()), 4)
    serial(lambda: loop.run_until_complete(via_raw_one()), 4)
    lat = {"api": [], "direct": [], "api_raw_http": []}
    tps = {"api": [], "direct": [], "api_raw_http": []}
    runners = {"api": via_api, "direct": lambda: loop.run_until_complete(via_direct_one()),
               "api_raw_http": lambda: loop.run_until_complete(via_raw_one())}
    for r in range(args.rounds):
        order = ("api", "direct", "api_raw_http") if r % 2 == 0 else ("api_raw_http", "direct", "api")
        for path in order:
            lat[path] += serial(runners[path], args.serial_requests)
        for path in order:
            if path == "api":
                tps[path].append(concurrent_api(args.concurrent_requests))
            else:
                tps[path].append(concurrent_direct(args.concurrent_requests,
                                                   via_raw_one if path == "api_raw_http" else via_direct_one))
        logger.info("round %d: median latency api %.3f raw %.3f direct %.3f; tok/s api %.0f raw %.0f direct %.0f", r,
                    statistics.median(lat["api"]), statistics.median(lat["api_raw_http"]), statistics.median(lat["direct"]),
                    tps["api"][-1], tps["api_raw_http"][-1], tps["direct"][-1])

    result = {
        "machine": machine_name(args.machine), "date": today(), "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "rounds": args.rounds,
        "latency_s_median": {k: statistics.median(v) for k, v in lat.items()},
        "latency_ratio_c1": statistics.median(lat["api"]) / statistics.median(lat["direct"]),
        "tokens_per_s_median": {k: statistics.median(v) for k, v in tps.items()},
        "throughput_ratio_c32": statistics.median(tps["api"]) / statistics.median(tps["direct"]),
        "service_only": {  # the same, with a plain HTTP client instead of the SDK: what the service itself costs
            "latency_ratio_c1": statistics.median(lat["api_raw_http"]) / statistics.median(lat["direct"]),
            "throughput_ratio_c32": statistics.median(tps["api_raw_http"]) / statistics.median(tps["direct"])},
        "targets": {"latency_ratio_c1": "<= 1.15", "throughput_ratio_c32": ">= 0.9"},
        "samples": {"latency_s": lat, "tokens_per_s": tps},
    }
    loop.run_until_complete(direct.aclose())
    loop.run_until_complete(raw_http.aclose())
    ray.get(api_actor.stop.remote())
    ray.shutdown()
    write_result(result, args.out, "api-overhead", _plot)
    print(json.dumps({k: result[k] for k in ("latency_ratio_c1", "throughput_ratio_c32", "service_only", "latency_s_median",
                                             "tokens_per_s_median")}, indent=2))


def _plot(result: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.boxplot([result["samples"]["latency_s"]["direct"], result["samples"]["latency_s"]["api_raw_http"],
                 result["samples"]["latency_s"]["api"]])
    ax1.set_xticks([1, 2, 3], ["direct client", "API (plain HTTP)", "API (tinker SDK)"])
    ax1.set_ylabel("latency, s")
    ax1.set_title(f"concurrency 1: ratio {result['latency_ratio_c1']:.3f} (target ≤ 1.15)")
    names = ["direct", "api_raw_http", "api"]
    ax2.bar(["direct", "API (HTTP)", "API (SDK)"], [result["tokens_per_s_median"][n] for n in names],
            color=["tab:gray", "tab:cyan", "tab:blue"])
    ax2.set_ylabel("tokens/s")
    ax2.set_title(f"concurrency {result['concurrency']}: ratio {result['throughput_ratio_c32']:.3f} (target ≥ 0.9)")
    fig.suptitle(f"{result['machine']} · {result['date']} · {result['max_tokens']} tokens per sample")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
