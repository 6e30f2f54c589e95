"""The main job: several tenants doing reinforcement learning at once on one base model, each syncing
its new weights into vLLM after every step, while every tenant also keeps generating rollouts.

Each tenant has a verifiable task of its own (say ``target`` right after ``prompt``). A step samples a
group from the tenant's live adapter, scores it, trains with ``importance_sampling`` on group-relative
advantages, and calls ``save_weights_for_sampler`` (only that tenant's LoRA flips). The summary shows
that rewards went up and what a sync costs *other* tenants: their rollout tokens/s while someone
else syncs ÷ while nobody syncs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from skyrl_lora.config import DemoTenant
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.training.engine import LocalTrainingEngine
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec

logger = logging.getLogger("skyrl_lora.rl_demo")


@dataclass(frozen=True)
class RlDemoConfig:
    steps: int = 8
    group_size: int = 64
    learning_rate: float = 5e-2
    rollout_streams: int = 1
    rollout_tokens: int = 24
    out_dir: Path = Path("artifacts/demo")


@dataclass
class TenantRun:
    name: str
    target: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # its adapter is on the servers
    rewards: list[float] = field(default_factory=list)
    syncs: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each sync
    rollouts: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, tokens)


async def _tenant_loop(tenant: DemoTenant, seed: int, cfg: RlDemoConfig, engine: LocalTrainingEngine, trainer: Any,
                       client: RemoteInferenceClient, tok: Any, run: TenantRun, bar: tqdm) -> None:
    prompt = tok(tenant.prompt)["input_ids"]
    target = tok.encode(tenant.target, add_special_tokens=False)[0]
    await engine.create_lora(tenant.name, LoraSpec(rank=tenant.rank, alpha=2.0 * tenant.rank, seed=seed))
    await trainer.save_weights_for_sampler.remote(tenant.name, "init")  # the first sync loads it everywhere
    run.ready.set()
    n = len(prompt)
    for step in range(cfg.steps):
        group = await client.sample_with_retry(prompt, {"max_tokens": 1, "temperature": 1.0, "seed": seed * 1000 + step},
                                               tenant.name, num_samples=cfg.group_size)
        rewards = [1.0 if s.token_ids[0] == target else 0.0 for s in group]
        mean = sum(rewards) / len(rewards)
        run.rewards.append(mean)
        data = [Datum(model_input=prompt, loss_fn_inputs={
            "target_tokens": prompt[1:] + [s.token_ids[0]], "logprobs": [0.0] * (n - 1) + [s.logprobs[0]],
            "advantages": [0.0] * (n - 1) + [r - mean]}) for s, r in zip(group, rewards)]
        await engine.forward_backward(tenant.name, data, "importance_sampling")
        await engine.optim_step(tenant.name, AdamParams(learning_rate=cfg.learning_rate))
        t0 = time.monotonic()
        await trainer.save_weights_for_sampler.remote(tenant.name, f"step-{step}")
        run.syncs.append((t0, time.monotonic()))
        logger.info("%-6s step %d  reward %.3f  (say %r after %r)", tenant.name, step, mean, tenant.target, tenant.prompt)
        bar.update(1)


async def _rollouts(tenant: DemoTenant, cfg: RlDemoConfig, client: RemoteInferenceClient, tok: Any, run: TenantRun,
                    stop: asyncio.Event) -> None:
    """A tenant's own generation load, running across everyone's syncs (continued seamlessly on its own)."""
    prompt = tok(tenant.prompt)["input_ids"]
    params = {"max_tokens": cfg.rollout_tokens, "temperature": 1.0, "ignore_eos": True}
    await run.ready.wait()
    while not stop.is_set():
        t0 = time.monotonic()
        (s,) = await client.sample_with_retry(prompt, params, tenant.name)
        run.rollouts.append((t0, time.monotonic(), len(s.token_ids)))


def _isolation(runs: list[TenantRun]) -> dict[str, dict[str, float | int | None]]:
    """Per tenant: median rollout tokens/s of requests that overlapped another tenant's sync ÷ of requests
    that overlapped no sync at all (requests overlapping only their own tenant's sync are left out)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for run in runs:
        others = [w for r in runs if r is not run for w in r.syncs]
        own = run.syncs
        during, quiet = [], []
        for start, end, tokens in run.rollouts:
            rate = tokens / max(end - start, 1e-9)
            hit_other = any(s < end and start < e for s, e in others)
            hit_own = any(s < end and start < e for s, e in own)
            if hit_other:
                during.append(rate)
            elif not hit_own:
                quiet.append(rate)
        ratio = statistics.median(during) / statistics.median(quiet) if during and quiet else None
        out[run.name] = {"requests_during_others_syncs": len(during), "requests_with_no_sync": len(quiet),
                         "tokens_per_s_ratio": ratio}
    return out


async def run_rl_demo(tenants: tuple[DemoTenant, ...], trainer: Any, urls: list[str], model_path: str,
                      cfg: RlDemoConfig) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    client = RemoteInferenceClient(urls)
    engine = LocalTrainingEngine(trainer)
    runs = [TenantRun(t.name, t.target) for t in tenants]
    stop = asyncio.Event()
    t_start = time.monotonic()
    with tqdm(total=cfg.steps * len(tenants), desc="RL steps (all tenants)", unit="step") as bar:
        loops = [asyncio.create_task(_tenant_loop(t, i + 1, cfg, engine, trainer, client, tok, r, bar))
                 for i, (t, r) in enumerate(zip(tenants, runs))]
        loads = [asyncio.create_task(_rollouts(t, cfg, client, tok, r, stop))
                 for t, r in zip(tenants, runs) for _ in range(cfg.rollout_streams)]
        try:
            await asyncio.gather(*loops)
        finally:
            stop.set()
            await asyncio.gather(*loads, return_exceptions=True)
    for t in tenants:
        await engine.delete_lora(t.name)
    await client.aclose()
    isolation = _isolation(runs)
    ratios = [v["tokens_per_s_ratio"] for v in isolation.values() if v["tokens_per_s_ratio"] is not None]
    return {
        "machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"), "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "tenants": {r.name: {"target": r.target, "reward_per_step": r.rewards, "syncs": len(r.syncs),
                             "median_sync_s": statistics.median(e - s for s, e in r.syncs) if r.syncs else None,
                             "rollout_requests": len(r.rollouts)} for r in runs},
        "isolation": isolation,
        "median_isolation_ratio": statistics.median(ratios) if ratios else None,
        "timeline": {r.name: {"rollouts": [(s - t_start, e - t_start, n) for s, e, n in r.rollouts],
                              "syncs": [(s - t_start, e - t_start) for s, e in r.syncs]} for r in runs},
    }


def summary_lines(result: dict) -> list[str]:
    lines = ["", "tenant   task                 reward: first step -> last step   syncs   others'-sync tokens/s ÷ no-sync"]
    for name, t in result["tenants"].items():
        r = t["reward_per_step"]
        iso = result["isolation"][name]["tokens_per_s_ratio"]
        lines.append(f"{name:<8} say {t['target']!r:<16} {r[0]:.3f} -> {r[-1]:.3f} "
                     f"({'up' if r[-1] > r[0] else 'NOT up'})          {t['syncs']:>3}     "
                     f"{'n/a' if iso is None else f'{iso:.3f}'}")
    med = result["median_isolation_ratio"]
    lines.append(f"median over tenants: a tenant's rollout tokens/s while another tenant syncs ÷ with no sync = "
                 f"{'n/a' if med is None else f'{med:.3f}'}")
    return lines


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7))
    for name, t in result["tenants"].items():
        ax1.plot(range(len(t["reward_per_step"])), t["reward_per_step"], marker="o", label=f"{name}: say {t['target']!r}")
    ax1.set_xlabel("RL step")
    ax1.set_ylabel("mean reward")
    ax1.set_title("reward per tenant (each tenant syncs after every step)")
    ax1.legend()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, tl) in enumerate(result["timeline"].items()):
        c = colors[i % len(colors)]
        pts = sorted(tl["rollouts"], key=lambda x: x[1])
        ax2.plot([e for _, e, _ in pts], [n / max(e - s, 1e-9) for s, e, n in pts], ".", color=c, label=f"{name} rollouts")
        for s, e in tl["syncs"]:
            ax2.axvspan(s, max(e, s + 0.02), color=c, alpha=0.25)
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("tokens/s per rollout request")
    ax2.set_title("rollout speed over time; shaded: a tenant's sync (its colour)")
    ax2.legend(loc="lower right")
    fig.suptitle(f"skyrl_lora multi-tenant RL · {result['machine']} · {result['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def write(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, png = out_dir / "rl_demo_summary.json", out_dir / "rl_demo.png"
    js.write_text(json.dumps(result, indent=2))
    plot(result, png)
    return js, png
