"""The main job: several tenants doing reinforcement learning at once on one base model, each syncing
its new weights into vLLM after every step; then a measurement of what one tenant's syncs cost the others.

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
from typing import Any, TypedDict

from tqdm import tqdm

from skyrl_lora.config import DemoTenant
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.training.engine import LocalTrainingEngine
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec

logger = logging.getLogger("skyrl_lora.rl_demo")


@dataclass(frozen=True)
class RlDemoConfig:
    steps: int = 10
    group_size: int = 64
    learning_rate: float = 2e-2
    rollout_streams: int = 2
    rollout_tokens: int = 16
    window_s: float = 3.0  # isolation measurement: alternating quiet / one-tenant-syncing windows
    window_pairs: int = 6
    sync_period_s: float = 1.0  # in a sync window the syncing tenant syncs once a second (an eager RL loop's pace)
    out_dir: Path = Path("artifacts/demo")


class _Isolation(TypedDict):
    per_tenant: dict[str, dict[str, Any]]  # tenant -> {"pairs", "tokens_per_s_ratio"}
    windows: list[dict[str, Any]]


@dataclass
class TenantRun:
    name: str
    target: str
    rewards: list[float] = field(default_factory=list)
    syncs: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each sync


async def _tenant_loop(tenant: DemoTenant, seed: int, cfg: RlDemoConfig, engine: LocalTrainingEngine, trainer: Any,
                       client: RemoteInferenceClient, tok: Any, run: TenantRun, bar: tqdm) -> None:
    prompt = tok(tenant.prompt)["input_ids"]
    target = tok.encode(tenant.target, add_special_tokens=False)[0]
    await engine.create_lora(tenant.name, LoraSpec(rank=tenant.rank, alpha=2.0 * tenant.rank, seed=seed))
    await trainer.save_weights_for_sampler.remote(tenant.name, "init")  # the first sync loads it everywhere
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


async def _measure_isolation(tenants: tuple[DemoTenant, ...], trainer: Any, client: RemoteInferenceClient, tok: Any,
                             cfg: RlDemoConfig, t_start: float) -> _Isolation:
    """Every tenant generates rollouts non-stop while windows alternate: nobody syncs / one tenant (in turn)
    syncs once every ``sync_period_s``. Each *other* tenant's tokens/s in a sync window ÷ in the neighbouring
    quiet window."""
    tokens = {t.name: 0 for t in tenants}
    stop = asyncio.Event()

    async def stream(t: DemoTenant) -> None:
        prompt = tok(t.prompt)["input_ids"]
        params = {"max_tokens": cfg.rollout_tokens, "temperature": 1.0, "ignore_eos": True}
        while not stop.is_set():
            (s,) = await client.sample_with_retry(prompt, params, t.name)
            tokens[t.name] += len(s.token_ids)

    async def window(syncer: DemoTenant | None) -> tuple[dict[str, float], int, tuple[float, float]]:
        before, t0 = dict(tokens), time.monotonic()
        syncs = 0
        if syncer is None:
            await asyncio.sleep(cfg.window_s)  # a measurement window, not a wait for a condition
        else:
            while (due := t0 + syncs * cfg.sync_period_s) < t0 + cfg.window_s:
                await asyncio.sleep(max(0.0, due - time.monotonic()))  # pacing the syncs, not waiting on a condition
                await trainer.save_weights_for_sampler.remote(syncer.name, f"sync-{syncs}")
                syncs += 1
            await asyncio.sleep(max(0.0, t0 + cfg.window_s - time.monotonic()))
        dt = time.monotonic() - t0
        return {k: (tokens[k] - before[k]) / dt for k in tokens}, syncs, (t0 - t_start, t0 - t_start + dt)

    streams = [asyncio.create_task(stream(t)) for t in tenants for _ in range(cfg.rollout_streams)]
    ratios: dict[str, list[float]] = {t.name: [] for t in tenants}
    windows: list[dict[str, Any]] = []
    try:
        await window(None)  # warm-up
        with tqdm(total=cfg.window_pairs, desc="isolation windows", unit="pair") as bar:
            for i in range(cfg.window_pairs):
                syncer = tenants[i % len(tenants)]
                got: dict[bool, dict[str, float]] = {}
                for who in ((None, syncer) if i % 2 == 0 else (syncer, None)):  # alternate, so drift hits both
                    rates, syncs, span = await window(who)
                    got[who is None] = rates
                    windows.append({"syncing": None if who is None else who.name, "syncs": syncs, "span": span,
                                    "tokens_per_s": rates})
                for t in tenants:
                    if t is not syncer and got[True][t.name] > 0:
                        ratios[t.name].append(got[False][t.name] / got[True][t.name])
                bar.update(1)
    finally:
        stop.set()
        await asyncio.gather(*streams, return_exceptions=True)
    return {"per_tenant": {k: {"pairs": len(v), "tokens_per_s_ratio": statistics.median(v) if v else None}
                           for k, v in ratios.items()}, "windows": windows}


async def run_rl_demo(tenants: tuple[DemoTenant, ...], trainer: Any, client: RemoteInferenceClient, model_path: str,
                      cfg: RlDemoConfig) -> dict[str, Any]:
    """The demo on a running system; ``client`` (``InferenceCluster.client()``, which carries the servers'
    token) is closed at the end."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    engine = LocalTrainingEngine(trainer)
    runs = [TenantRun(t.name, t.target) for t in tenants]
    t_start = time.monotonic()
    with tqdm(total=cfg.steps * len(tenants), desc="RL steps (all tenants)", unit="step") as bar:
        await asyncio.gather(*(_tenant_loop(t, i + 1, cfg, engine, trainer, client, tok, r, bar)
                               for i, (t, r) in enumerate(zip(tenants, runs))))
    isolation: _Isolation = {"per_tenant": {}, "windows": []}
    if len(tenants) > 1 and cfg.window_pairs > 0:
        isolation = await _measure_isolation(tenants, trainer, client, tok, cfg, t_start)
    for t in tenants:
        await engine.delete_lora(t.name)
    await client.aclose()
    ratios = [v["tokens_per_s_ratio"] for v in isolation["per_tenant"].values() if v["tokens_per_s_ratio"] is not None]
    return {
        "machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "tenants": {r.name: {"target": r.target, "reward_per_step": r.rewards, "syncs": len(r.syncs),
                             "median_sync_s": statistics.median(e - s for s, e in r.syncs) if r.syncs else None}
                    for r in runs},
        "isolation": isolation["per_tenant"],
        "isolation_windows": isolation["windows"],
        "median_isolation_ratio": statistics.median(ratios) if ratios else None,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = ["", "tenant   task            reward: first -> last step        syncs   tokens/s while another tenant syncs "
                 "÷ while nobody syncs"]
    for name, t in result["tenants"].items():
        r = t["reward_per_step"]
        iso = result["isolation"].get(name, {}).get("tokens_per_s_ratio")
        trend = "up" if r[-1] > r[0] else "NOT up"
        lines.append(f"{name:<8} say {t['target']!r:<10} {r[0]:.3f} -> {r[-1]:.3f} ({trend:<6})      {t['syncs']:>3}     "
                     f"{'n/a' if iso is None else f'{iso:.3f}'}")
    med = result["median_isolation_ratio"]
    lines.append(f"median over tenants: {'n/a' if med is None else f'{med:.3f}'} (1.0 = a sync costs other tenants nothing)")
    return lines


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]
    for i, (name, t) in enumerate(result["tenants"].items()):  # marker and dash per tenant: equal curves stay visible
        marker, dash = styles[i % len(styles)]
        ax1.plot(range(len(t["reward_per_step"])), t["reward_per_step"], marker=marker, ls=dash, markersize=7 - i,
                 label=f"{name}: say {t['target']!r}")
    ax1.set_xlabel("RL step")
    ax1.set_ylabel("mean reward")
    ax1.set_title("reward per tenant (each tenant syncs after every step)")
    ax1.legend()
    names = list(result["tenants"])
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for w in result["isolation_windows"]:
        s0, s1 = w["span"]
        if w["syncing"] is not None:
            ax2.axvspan(s0, s1, color=colors[w["syncing"]], alpha=0.15)
        # one bar per tenant side by side inside the window: equal rates (the point of isolation)
        # would otherwise draw one tenant's line over the others'
        width = (s1 - s0) / max(1, len(names))
        for i, name in enumerate(names):
            rate = w["tokens_per_s"].get(name)
            if rate is not None:
                ax2.bar(s0 + i * width, rate, width=0.9 * width, align="edge", color=colors[name])
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[name], label=f"{name} rollout tokens/s") for name in names]
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("tokens/s per window")
    ax2.set_title("isolation windows: shaded = that tenant syncs once a second; white = nobody syncs")
    ax2.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(f"skyrl_lora multi-tenant RL · {result['machine']} · {result['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, png = out_dir / "rl_demo_summary.json", out_dir / "rl_demo.png"
    js.write_text(json.dumps(result, indent=2))
    plot(result, png)
    return js, png
