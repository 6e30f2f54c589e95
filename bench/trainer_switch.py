"""Trainer benchmark: tenant switch time per cache tier ÷ one forward_backward step, and training tokens/s
with 1 tenant vs 4 tenants (all resident, and sharing one slot so every step switches).

Measurements alternate round by round (step, CPU switch, disk switch, ...) so drift hits all alike; the
figures are medians. A switch is what a real step pays when its tenant is not resident: evict the
current tenant of the slot to its tier, and restore the incoming one from the tier it was in.

    python -m bench.trainer_switch                      # tiny model, CPU
    python -m bench.trainer_switch --model 0.5b --rank 32 --seq-len 512   # random 0.5B Llama, on GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine_name, today, write_result
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec
from skyrl_lora.training.trainer import MultiTenantTrainer

logger = logging.getLogger("bench.trainer_switch")
GiB = 1 << 30


def random_llama(out: Path, preset: str) -> Path:
    """A Llama with random weights from a config: nothing downloaded. '0.5b' has Qwen2.5-0.5B's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)}[preset]
    config = LlamaConfig(max_position_embeddings=4096, **shapes)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    logger.info("random %s Llama: %.0fM params at %s", preset, sum(p.numel() for p in model.parameters()) / 1e6, out)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    if args.model == "tiny":
        from skyrl_lora.models.tiny import build_fixtures

        base = build_fixtures().base
    else:
        base = random_llama(work / "model", args.model)
    spec = LoraSpec(rank=args.rank, alpha=2 * args.rank)

    def trainer(name: str, resident: int, cpu: int) -> MultiTenantTrainer:
        t = MultiTenantTrainer(TrainerConfig(base_model=str(base), state_dir=work / name, sampler_root=work / f"{name}-s",
                                             resident_budget_bytes=resident, cpu_budget_bytes=cpu,
                                             max_lora_rank=max(64, args.rank), max_seq_len=args.seq_len + 1))
        t.load()
        return t

    probe = trainer("probe", 64 * GiB, 0)
    probe.create_lora("p", spec)
    one = probe.slots.slot_bytes(spec)
    vocab = probe.vocab_size
    del probe
    g = torch.Generator().manual_seed(0)
    data = [Datum(model_input=torch.randint(3, vocab, (args.seq_len,), generator=g).tolist(),
                  loss_fn_inputs={"target_tokens": torch.randint(3, vocab, (args.seq_len,), generator=g).tolist()})
            for _ in range(args.batch)]
    tokens = args.batch * args.seq_len
    adam = AdamParams(learning_rate=1e-4)

    via_cpu = trainer("cpu", one, 64 * GiB)  # one resident slot: every switch goes through the CPU tier
    via_disk = trainer("disk", one, 0)  # no CPU tier: every switch goes through disk
    for t in (via_cpu, via_disk):
        for name in ("a", "b"):
            t.create_lora(name, LoraSpec(rank=args.rank, alpha=2 * args.rank, seed=hash(name) % 1000))
        for name in ("a", "b", "a", "b"):  # warm up kernels, allocator, pinned buffers, page cache
            t.forward_backward(name, data)
            t.optim_step(name, adam)

    steps, cpu_sw, disk_sw = [], [], []
    for r in range(args.rounds):
        occupant = "a" if r % 2 == 0 else "b"
        other = "b" if occupant == "a" else "a"
        via_cpu.make_resident(occupant)
        steps.append(timed(functools.partial(via_cpu.forward_backward, occupant, data)))
        via_cpu.optim_step(occupant, adam)
        assert via_cpu.info(other).tier == "cpu"
        cpu_sw.append(timed(functools.partial(via_cpu.make_resident, other)))
        via_disk.make_resident(occupant)
        assert via_disk.info(other).tier == "disk"
        disk_sw.append(timed(functools.partial(via_disk.make_resident, other)))
    del via_cpu, via_disk

    configs = {"1 tenant": (1, 1), "4 tenants, 4 resident": (4, 4), "4 tenants, 1 slot (switch every step)": (4, 1)}
    runners = {}
    for label, (n_tenants, slots) in configs.items():
        t = trainer(f"tp{n_tenants}-{slots}", slots * one, 64 * GiB)
        names = [f"t{i}" for i in range(n_tenants)]
        for n in names:
            t.create_lora(n, spec)
            t.forward_backward(n, data)  # warm-up
            t.optim_step(n, adam)
        runners[label] = (t, names)
    samples: dict[str, list[float]] = {label: [] for label in configs}
    per_window = max(4, args.throughput_steps // 4)
    for _ in range(4):  # windows of each configuration alternate, so drift hits all of them
        for label, (t, names) in runners.items():
            sync()
            t0 = time.perf_counter()
            for i in range(per_window):
                n = names[i % len(names)]
                t.forward_backward(n, data)
                t.optim_step(n, adam)
            sync()
            samples[label].append(per_window * tokens / (time.perf_counter() - t0))
    tps = {label: statistics.median(v) for label, v in samples.items()}
    step_s = statistics.median(steps)
    result = {
        "machine": machine_name(args.machine), "date": today(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "model": args.model, "rank": args.rank, "batch": args.batch, "seq_len": args.seq_len,
        "tenant_state_bytes": one, "rounds": args.rounds,
        "forward_backward_s": step_s,
        "switch_s": {"cpu": statistics.median(cpu_sw), "disk": statistics.median(disk_sw)},
        "switch_over_step": {"cpu": statistics.median(cpu_sw) / step_s, "disk": statistics.median(disk_sw) / step_s},
        "target_cpu_switch_over_step": 0.10,
        "train_tokens_per_s": tps,
        "train_tokens_per_s_ratio_vs_1_tenant": {k: v / tps["1 tenant"] for k, v in tps.items()},
    }
    return result


def plot(result: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tiers = list(result["switch_over_step"])
    ax1.bar(tiers, [result["switch_over_step"][t] for t in tiers], color=["tab:blue", "tab:gray"])
    ax1.axhline(result["target_cpu_switch_over_step"], color="tab:red", ls="--", label="target (CPU tier) 0.10")
    ax1.set_ylabel("tenant switch ÷ one forward_backward step")
    ax1.set_title(f"switch cost by tier (rank {result['rank']}, {result['batch']}×{result['seq_len']} tokens)")
    ax1.legend()
    names = list(result["train_tokens_per_s"])
    ax2.barh(names, [result["train_tokens_per_s"][n] for n in names], color="tab:green")
    ax2.set_xlabel("training tokens/s")
    ax2.set_title("throughput, 1 vs 4 tenants")
    fig.suptitle(f"{result['machine']} · {result['device']} · {result['model']} · {result['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "0.5b"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--machine", default=None, help="name in the results file (default: host name)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    write_result(result, args.out, f"trainer-switch-{result['model']}", plot)
    print(json.dumps({k: result[k] for k in ("switch_over_step", "train_tokens_per_s_ratio_vs_1_tenant")}, indent=2))


if __name__ == "__main__":
    main()
