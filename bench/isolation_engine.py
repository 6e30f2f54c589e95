"""Low-noise isolation benchmark: tenant B's token rate with and without tenant A's syncs, in-process.

The HTTP benchmark (bench/isolation.py) counts finished requests in multi-second phases, and on a
2-core machine its windows differ by ±15 % with no sync at all. Here the server runs in this process,
B's tokens are counted as they stream out of the engine (token-level, not request-level), and short
windows with and without A's syncs alternate many times, so drift hits both sides alike; the ratio
is the median of per-pair ratios. A generates in every window; only the syncs differ. Modes: ``abort`` (our per-LoRA flip),
``inplace`` (in-place load, no pause), ``engine-wide`` (vLLM's whole-engine pause around an in-place load).

    python bench/isolation_engine.py --pairs 20 --window-s 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import time
from pathlib import Path

from skyrl_lora.inference import vllm_compat as compat
from skyrl_lora.inference.lora_control import LoraController, new_request_id
from skyrl_lora.inference.server import EmbeddedVLLMServer, ServerConfig
from skyrl_lora.models.tiny import build_fixtures

logger = logging.getLogger("bench.isolation_engine")


async def _stream_forever(ctl: LoraController, tenant: str, prompt: list[int], max_tokens: int,
                          counter: list[int], stop: asyncio.Event) -> None:
    lora = compat.make_lora_request(tenant, 1, "-")
    while not stop.is_set():
        params = compat.make_sampling_params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in ctl.generate(compat.tokens_prompt(prompt), params, new_request_id(), lora_request=lora):
            counter[0] += len(out.outputs[0].token_ids)


async def run(args: argparse.Namespace) -> dict:
    fx = build_fixtures()
    paths = [str(fx.loras["woof"]), str(fx.loras["meow"])]
    server = EmbeddedVLLMServer(ServerConfig(model=str(fx.base), loras={"a": paths[1], "b": paths[0]},
                                             max_loras=4, max_lora_rank=16))
    await server.start()
    ctl = server.controller
    prompt = [0, 42, 540, 338, 14, 325]
    stop = asyncio.Event()
    b_count, a_count = [0], [0]
    streams = [asyncio.create_task(_stream_forever(ctl, "b", prompt, args.max_tokens, b_count, stop))
               for _ in range(args.streams_b)]
    streams += [asyncio.create_task(_stream_forever(ctl, "a", prompt, args.max_tokens, a_count, stop))
                for _ in range(args.streams_a)]
    await asyncio.sleep(3.0)  # warm-up

    async def window(sync_mode: str | None) -> float:
        start_tokens, t0 = b_count[0], time.perf_counter()
        i = 0
        while (now := time.perf_counter()) < t0 + args.window_s:
            if sync_mode == "engine-wide":  # vLLM's whole-engine pause around an in-place load
                await ctl.pause(None, "bench", 30.0)
                try:
                    await ctl.load("a", paths[i % 2], mode="inplace")
                finally:
                    ctl.resume(None, "bench")
                i += 1
            elif sync_mode is not None:
                await ctl.load("a", paths[i % 2], mode=sync_mode)
                i += 1
            await asyncio.sleep(min(args.sync_period_s, t0 + args.window_s - now))
        return (b_count[0] - start_tokens) / (time.perf_counter() - t0)

    result: dict = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
                    "vllm": compat.vllm_version(), "args": vars(args), "modes": {}}
    for mode in args.modes:
        ratios, with_sync, without = [], [], []
        for k in range(args.pairs):
            order = [mode, None] if k % 2 == 0 else [None, mode]
            rates = {}
            for m in order:
                rates[m] = await window(m)
            with_sync.append(rates[mode])
            without.append(rates[None])
            ratios.append(rates[mode] / rates[None])
        result["modes"][mode] = {"median_ratio": round(statistics.median(ratios), 4),
                                 "mean_ratio": round(statistics.mean(ratios), 4),
                                 "b_tok_s_with_sync_median": round(statistics.median(with_sync), 1),
                                 "b_tok_s_without_median": round(statistics.median(without), 1),
                                 "ratios": [round(r, 4) for r in ratios]}
        logger.info("mode %-8s B with/without syncs: median ratio %.4f", mode, statistics.median(ratios))
    stop.set()
    await asyncio.gather(*streams)
    await server.stop()
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    modes = list(result["modes"])
    ax.boxplot([result["modes"][m]["ratios"] for m in modes], tick_labels=modes)
    ax.axhline(0.97, color="red", ls="--", lw=1, label="target 0.97")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_ylabel("tenant B tok/s: A syncing once a second ÷ A not syncing")
    ax.set_title(f"{result['machine']} · vLLM {result['vllm']} · {result['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--sync-period-s", type=float, default=1.0)
    parser.add_argument("--streams-b", type=int, default=4)
    parser.add_argument("--streams-a", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["abort", "inplace", "engine-wide"],
                        choices=["abort", "inplace", "engine-wide"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("vllm", "skyrl_lora.inference.lora_control"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = asyncio.run(run(args))
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{platform.node()}-{time.strftime('%Y-%m-%d')}-isolation-engine"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(json.dumps({m: {k: v for k, v in r.items() if k != "ratios"} for m, r in result["modes"].items()}, indent=2))
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
