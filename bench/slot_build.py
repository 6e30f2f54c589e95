"""What building a slot image out of process costs, part by part, on this machine's CPU.

The H200 run of 2026-12-02 (``h200-2026-12-02/sync-stall-8b-r32-t8-slot-builders.json``) put a builder
process at 226-251 ms per 8B rank-32 version, and that bounds how many versions a second a server can
take. This times :func:`skyrl_lora.inference.slot_builder.build_image` on adapters of that size (no
GPU, no vLLM: the plan is laid out as vLLM lays out a Llama's LoRA slots: q/k/v and gate/up as packed
slices, then o and down, then lm_head), and the worker's side after it: reading the file into its buffer
(pinned on a GPU, where the DMA follows). Assembling in memory the builder keeps is timed beside
assembling in fresh memory each time.

    python -m bench.slot_build --shape 8b --rank 32 --versions 8
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine_name, today, write_result

logger = logging.getLogger("bench.slot_build")
PACKED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def llama_plan(shape: Any, rank: int, dtype: str, unembed: bool) -> Any:
    """The plan vLLM's LoRA layers of a Llama give (see ``_SlotLayout.plan``), at max rank ``rank``."""
    from skyrl_lora.inference.slot_builder import BuildPlan, PlanEntry

    entries: list[PlanEntry] = []
    offset = 0

    def add(source: str, rows: int, cols: int, scaled: bool) -> None:
        nonlocal offset
        entries.append(PlanEntry(offset=offset, rows=rows, cols=cols, source=source, scaled=scaled))
        offset += rows * cols

    for layer in range(shape.num_layers):
        for block, parts in PACKED:
            names = [f"base_model.model.model.layers.{layer}.{block}.{p}" for p in parts]
            for name, part in zip(names, parts):
                add(f"{name}.lora_A.weight", rank, shape.features[part][0], False)
            for name, part in zip(names, parts):
                add(f"{name}.lora_B.weight", shape.features[part][1], rank, True)
    if unembed:
        add("base_model.model.lm_head.lora_A.weight", rank, shape.features["lm_head"][0], False)
        add("base_model.model.lm_head.lora_B.weight", shape.features["lm_head"][1], rank, True)
    return BuildPlan(dtype=dtype, numel=offset, entries=entries)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    from skyrl_lora.inference.adapter_check import ModelShape
    from skyrl_lora.inference.slot_builder import BuildJob, build_image, read_image
    from skyrl_lora.lora_targets import PROJECTION_MODULES, UNEMBED_MODULES
    from skyrl_lora.models.synthetic import LLAMA_8B, MID_CPU, write_dummy_model, write_random_adapter
    from skyrl_lora.models.tiny import build_fixtures

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="slot-build-"))
    model = write_dummy_model(work / "model", {"8b": LLAMA_8B, "mid-cpu": MID_CPU}[args.shape], build_fixtures().base)
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model))
    assert shape is not None
    targets = PROJECTION_MODULES + (UNEMBED_MODULES if args.unembed else ())
    adapters = [write_random_adapter(work / f"v{i}", model, args.rank, seed=i, dtype=args.file_dtype, targets=targets)
                for i in range(min(args.versions, 2))]
    plan = llama_plan(shape, args.rank, "bfloat16", args.unembed)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    # a builder keeps its assembly memory (scratch); without it every image is assembled in fresh
    # memory, whose pages fault in one by one as a fresh shared-memory mapping's did before
    times: dict[str, list[float]] = {"build_kept_ms": [], "build_fresh_ms": [], "read_ms": []}
    scratch = torch.empty(plan.numel, dtype=torch.bfloat16)
    host = torch.empty(plan.numel, dtype=torch.bfloat16)  # the worker's (pinned, on a GPU) buffer
    for i in range(args.versions):
        for kind, kept in (("build_kept_ms", scratch), ("build_fresh_ms", None)):  # alternating, side by side
            out = os.path.join(shm, f"skyrl-bench-image-{os.getpid()}-{i}")
            t0 = time.perf_counter()
            build_image(plan, BuildJob(adapter_dir=str(adapters[i % len(adapters)]), out_path=out, scaling=2.0), kept)
            t1 = time.perf_counter()
            read_image(out, host)
            t2 = time.perf_counter()
            os.unlink(out)
            times[kind].append(1e3 * (t1 - t0))
            times["read_ms"].append(1e3 * (t2 - t1))
        logger.info("version %d: %s", i, {k: round(v[-1], 1) for k, v in times.items()})
    image_mb = plan.numel * 2 / 2**20
    p50 = {k: statistics.median(v[1:] or v) for k, v in times.items()}  # the first is a warm-up
    return {"machine": machine_name(args.machine), "date": today(),
            "config": {"shape": args.shape, "rank": args.rank, "versions": args.versions, "threads": args.threads,
                       "file_dtype": args.file_dtype, "unembed": args.unembed, "image_mb": image_mb},
            "times": times,
            "summary": {**{f"{k[:-3]}_p50_ms": v for k, v in p50.items()},
                        "fresh_over_kept": p50["build_fresh_ms"] / p50["build_kept_ms"]}}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = {"build_kept_ms": "builder, memory kept", "build_fresh_ms": "builder, fresh memory",
              "read_ms": "worker: read into its buffer"}
    for i, (kind, label) in enumerate(labels.items()):
        values = result["times"][kind]
        ax.bar([v + 0.27 * (i - 1) for v in range(len(values))], values, width=0.27, label=label)
    cfg = result["config"]
    ax.set_title(f"slot image build, {cfg['shape']} r{cfg['rank']} ({cfg['image_mb']:.0f} MB), {result['machine']}")
    ax.set_xlabel("version")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["8b", "mid-cpu"], default="8b")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--versions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the builder (its default)")
    parser.add_argument("--file-dtype", default="bfloat16", help="the adapter file's dtype (the trainer writes float32)")
    parser.add_argument("--unembed", action="store_true", help="a LoRA on lm_head too")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    path = write_result(result, args.out, f"slot-build-{args.shape}-r{args.rank}-{args.file_dtype}", plot)
    logger.info("%s -> %s", result["summary"], path)


if __name__ == "__main__":
    main()
