"""What a colocated trainer costs on the GPU, at production size (issue 17).

An 8B-shaped Llama served with ``--load-format dummy``; a trainer actor on the same GPU builds its
base on views of the server's weights (CUDA IPC, no copy), creates ``--tenants`` rank-``--rank``
LoRAs on every projection and runs one forward/backward + optimizer step each on ``--seq-len``
tokens. Reported: the trainer process's CUDA memory (allocated and peak), the base size it did not
copy, the tenants' adapter + optimizer bytes, and the same trainer's figure with its own copy of the
base (its measured peak + the base bytes; an own copy of dummy weights has no checkpoint to load).

    python -m bench.colocated_memory --num-gpus 1 --tenants 4 --rank 32     # H200
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bench.common import (
    add_colocated_args,
    add_common_args,
    machine_name,
    start_colocated,
    today,
    training_datum,
    write_result,
)

logger = logging.getLogger("bench.colocated_memory")
SERVER = "skyrl-bench-colocated-server"
GiB = float(1 << 30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from skyrl_lora.training.protocol import AdamParams, LoraSpec

    pair = start_colocated(args, SERVER, [])
    trainer, server_start_s, trainer_start_s = pair.trainer, pair.server_start_s, pair.trainer_start_s
    try:
        checksum = ray.get(trainer.shared_base_checksum.remote())
        base_bytes = ray.get(trainer.shared_base_bytes.remote())
        after_load = ray.get(trainer.cuda_memory.remote())
        spec = LoraSpec(rank=args.rank, alpha=float(args.rank))
        infos = [ray.get(trainer.create_lora.remote(f"t{i}", spec)) for i in range(args.tenants)]
        datum = training_datum(args.seq_len)
        step_s = []
        for i in range(args.tenants):
            t = time.perf_counter()
            ray.get(trainer.forward_backward.remote(f"t{i}", [datum]))
            ray.get(trainer.optim_step.remote(f"t{i}", AdamParams(learning_rate=1e-4)))
            step_s.append(time.perf_counter() - t)
        after_train = ray.get(trainer.cuda_memory.remote())
        unchanged = ray.get(trainer.shared_base_checksum.remote()) == checksum
        tenant_bytes = sum(info.nbytes for info in infos)
    finally:
        pair.stop()
    peak = after_train["max_allocated"]
    return {
        "machine": machine_name(args.machine), "date": today(), "model": "llama-8b-shape (dummy weights, bf16)",
        "rank": args.rank, "tenants": args.tenants, "seq_len": args.seq_len,
        "server_start_s": server_start_s, "trainer_start_s": trainer_start_s,
        "base_bytes_shared_not_copied": base_bytes,
        "trainer_allocated_after_load_bytes": after_load["allocated"],
        "trainer_peak_bytes": peak, "tenants_state_bytes": tenant_bytes,
        "activations_and_rest_bytes": peak - tenant_bytes,
        "standalone_trainer_bytes_estimate": peak + base_bytes,
        "base_unchanged_after_training": unchanged, "step_s": step_s,
    }


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    shared = result["trainer_peak_bytes"] / GiB
    own = result["standalone_trainer_bytes_estimate"] / GiB
    ax.bar(["colocated (views)", "own base copy"], [shared, own], color=["tab:green", "tab:gray"])
    ax.set_ylabel("trainer GPU memory, GiB (peak)")
    base = result["base_bytes_shared_not_copied"] / GiB
    ax.set_title(f"8B-shape, {result['tenants']} tenants rank {result['rank']}: base {base:.1f} GiB not copied", fontsize=9)
    for i, v in enumerate((shared, own)):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, model=False)
    add_colocated_args(parser, seq_len=512, sampling=False)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    result = run(args)
    print(write_result(result, args.out, "colocated-memory", plot))
    print({k: v for k, v in result.items() if not isinstance(v, list)})


if __name__ == "__main__":
    main()
