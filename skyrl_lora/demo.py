"""The main job: tenants sharing one vLLM server on Ray, one syncing its weights every second.

On the embedded default (local Ray, CPU vLLM, the tiny model built here) it shows what skyrl_lora is
for: tenant A replaces its adapter once a second while tenant B keeps generating. It measures B's
tokens/s alone, while A syncs through our per-LoRA path, and while A syncs through an engine-wide
pause, side by side in one run, and writes a JSON summary and a PNG timeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from skyrl_lora.cluster import inference_servers
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.loadgen import StreamStats, measure_phase, median, sync_strategy
from skyrl_lora.models.tiny import TinyFixtures, build_fixtures

logger = logging.getLogger("skyrl_lora.demo")

NO_SYNC = "A generates, no sync"
SYNCS = ("A syncs: per-LoRA", "A syncs: engine-wide pause")


@dataclass(frozen=True)
class DemoConfig:
    phase_s: float = 20.0
    streams_b: int = 4
    streams_a: int = 2
    max_tokens: int = 32
    sync_period_s: float = 1.0
    out_dir: Path = Path("artifacts/demo")


@dataclass(frozen=True)
class PhaseResult:
    name: str
    b_tokens_per_s: float
    b_ratio_to_alone: float
    b_ratio_to_no_sync: float  # the sync's own cost: same load from A, with vs without its syncs
    a_tokens_per_s: float
    syncs: int
    median_sync_s: float


async def _progress(label: str, seconds: float) -> None:
    with tqdm(total=int(seconds), desc=label, unit="s", leave=False) as bar:
        for _ in range(int(seconds)):
            await asyncio.sleep(1.0)
            bar.update(1)


async def run(cfg: DemoConfig, fixtures: TinyFixtures, client: RemoteInferenceClient) -> list[PhaseResult]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixtures.base)
    prompt = tok("def greet(name):\n    return")["input_ids"]
    logger.info("warming up the server (the first request compiles kernels)")
    for tenant in ("tenant-a", "tenant-b", None):
        (s,) = await client.sample(prompt, {"max_tokens": 8, "temperature": 0.0}, tenant)
        logger.info("%-9s -> %r", tenant or "base", tok.decode(s.token_ids))
    t0 = time.perf_counter()
    paths = [str(fixtures.loras["woof"]), str(fixtures.loras["meow"])]
    plan = [("B alone", False, None), (NO_SYNC, True, None),
            (SYNCS[0], True, "per-lora"), (SYNCS[1], True, "engine-wide")]
    phases: list[tuple[str, StreamStats, StreamStats | None, list[float]]] = []
    for name, a_generates, kind in plan:
        sync = None if kind is None else sync_strategy(client, "tenant-a", paths, kind)
        m, _ = await asyncio.gather(
            measure_phase(client, prompt, name=name, tenant_b="tenant-b", tenant_a="tenant-a" if a_generates else None,
                          sync=sync, duration_s=cfg.phase_s, streams_b=cfg.streams_b, streams_a=cfg.streams_a,
                          max_tokens=cfg.max_tokens, sync_period_s=cfg.sync_period_s, t0=t0),
            _progress(name, cfg.phase_s))
        phases.append((name, m.b, m.a, m.sync_latencies_s))
        logger.info("phase %-28s tenant B %.1f tok/s", name, m.b.tokens_per_s)
    alone = phases[0][1].tokens_per_s
    shared = phases[1][1].tokens_per_s
    results = [PhaseResult(name=name, b_tokens_per_s=round(b.tokens_per_s, 2),
                           b_ratio_to_alone=round(b.tokens_per_s / alone, 3) if alone else 0.0,
                           b_ratio_to_no_sync=round(b.tokens_per_s / shared, 3) if shared else 0.0,
                           a_tokens_per_s=round(a.tokens_per_s, 2) if a else 0.0, syncs=len(lat),
                           median_sync_s=round(median(lat), 4) if lat else 0.0)
               for name, b, a, lat in phases]
    (s,) = await client.sample(prompt, {"max_tokens": 6, "temperature": 0.0}, "tenant-a")
    logger.info("tenant A now says %r (its adapter flipped %d times)", tok.decode(s.token_ids),
                sum(r.syncs for r in results))
    _write(cfg, results, phases)
    return results


def _write(cfg: DemoConfig, results: list[PhaseResult],
           phases: list[tuple[str, StreamStats, StreamStats | None, list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "config": {k: str(v) for k, v in asdict(cfg).items()}, "phases": [asdict(r) for r in results]}
    (cfg.out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, b, a, _ in phases:
        for stats, style in ((b, "-"), (a, "--")):
            if stats is None or not stats.events:
                continue
            times = [t for t, _ in stats.events]
            lo, hi = int(min(times)), int(max(times)) + 1
            per_s = [sum(n for t, n in stats.events if s <= t < s + 1) for s in range(lo, hi)]
            ax.plot(range(lo, hi), per_s, style, label=f"{stats.tenant} ({name})")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens/s (completed)")
    ax.set_title("Tenant B's throughput while tenant A syncs every second")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(cfg.out_dir / "demo_timeline.png", dpi=110)
    plt.close(fig)


def main(cfg: DemoConfig = DemoConfig()) -> list[PhaseResult]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "vllm", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger.info("building (or finding) the tiny model and the meow/woof LoRAs")
    fixtures = build_fixtures()
    loras = {"tenant-a": str(fixtures.loras["meow"]), "tenant-b": str(fixtures.loras["woof"])}
    logger.info("starting a vLLM server in a Ray actor (about a minute on 2 CPU cores)")
    with inference_servers(str(fixtures.base), loras, max_loras=4, max_lora_rank=16) as cluster:
        results = asyncio.run(run(cfg, fixtures, cluster.client()))
    print("\nTenant B's tokens/s while tenant A syncs its LoRA every second (same run, same server):")
    print(f"{'phase':<28}{'B tok/s':>9}{'B/alone':>9}{'B/no-sync':>11}{'A tok/s':>9}{'syncs':>7}{'median sync':>13}")
    for r in results:
        print(f"{r.name:<28}{r.b_tokens_per_s:>9.1f}{r.b_ratio_to_alone:>9.3f}{r.b_ratio_to_no_sync:>11.3f}"
              f"{r.a_tokens_per_s:>9.1f}{r.syncs:>7}{r.median_sync_s * 1000:>11.1f}ms")
    print("B/no-sync is the sync's own cost to tenant B: the same load from A, with vs without A's syncs.")
    print(f"\nwrote {cfg.out_dir / 'demo_summary.json'} and {cfg.out_dir / 'demo_timeline.png'}")
    return results


if __name__ == "__main__":
    main()
