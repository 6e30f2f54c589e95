"""Writing a durable copy from host memory, the two ways side by side: how long, and how long an
asyncio loop on another thread waits meanwhile.

The trainer actor writes each published version's durable copy on a thread after
``save_weights_for_sampler`` returns, while its event loop answers calls. safetensors' ``save_file``
copies every tensor into ``bytes`` before writing; ``FlatWeights.save`` writes a header and then the
flat buffer in one write. A heartbeat coroutine wakes every millisecond; its largest gap during a
write is what a caller of the actor would wait at worst for the interpreter lock. Rounds alternate
the two ways. (On the 2-core CPU, 2026-12-02: 350 against 198 ms per write, gaps 7.0 against
4.6 ms: the lock is not what delayed the actor's answer on the H200; the copy off the GPU was,
``scripts/gpu/persist_lock.py``.)

    python -m bench.persist_stall --machine cpu2       # host work: a CPU is enough
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

from bench import common

logger = logging.getLogger("bench.persist_stall")
# an 8B-shaped Llama (hidden 4096, 32 layers, 8 kv heads, intermediate 14336), rank 32, every linear
PROJ = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
        "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
WAYS = ("safetensors_save_file", "flat_weights_save")


def _layout(layers: int, rank: int) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for layer in range(layers):
        for name, (fan_in, fan_out) in PROJ.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{part}.{name}"
            out += [(f"{stem}.lora_A.weight", (rank, fan_in)), (f"{stem}.lora_B.weight", (fan_out, rank))]
    return sorted(out)


async def _largest_gap(write: Any) -> tuple[float, float]:
    """(the heartbeat's largest gap, the write's duration), seconds."""
    done = False
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)
    gaps.clear()
    t0 = time.perf_counter()
    await asyncio.to_thread(write)
    took = time.perf_counter() - t0
    done = True
    await beat
    return max(gaps), took


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from skyrl_lora.inference.slot_image import FlatWeights

    layout = _layout(args.layers, args.rank)
    flat = FlatWeights(torch.randn(sum(r * c for _, (r, c) in layout)).to(torch.bfloat16), layout)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "adapter_model.safetensors"
        ways = {"safetensors_save_file": lambda: save_file({k: t.clone() for k, t in flat.named().items()}, str(path)),
                "flat_weights_save": lambda: flat.save(path)}
        for rnd in range(args.rounds):
            for way in WAYS if rnd % 2 == 0 else WAYS[::-1]:
                gap, took = await _largest_gap(ways[way])
                rows.append({"round": rnd, "way": way, "largest_loop_gap_ms": 1e3 * gap, "write_ms": 1e3 * took})
                logger.info("%s", rows[-1])
    summary = {way: {k: statistics.median(r[k] for r in rows if r["way"] == way)
                     for k in ("largest_loop_gap_ms", "write_ms")} for way in WAYS}
    return {"machine": common.machine_name(args.machine), "date": common.today(),
            "config": {"layers": args.layers, "rank": args.rank, "bytes": 2 * flat.flat.numel(), "dir": args.dir},
            "rows": rows, "summary": summary}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    med = result["summary"]
    ax.bar(list(med), [m["largest_loop_gap_ms"] for m in med.values()], color=["tab:red", "tab:green"])
    ax.set_ylabel("largest event-loop gap during the write (ms)")
    common.finish_figure(fig, png, f"{result['machine']}: durable copy of {result['config']['bytes'] / 1e6:.0f} MB "
                         f"(8B rank {result['config']['rank']}), median of {len(result['rows']) // 2}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dir", default=None, help="where the file is written (default: the temp dir)")
    common.add_common_args(parser, model=False)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(run(args))
    path = common.write_result(result, args.out, "persist-stall", plot)
    logger.info("bench.persist_stall wrote %s: %s", path, result["summary"])


if __name__ == "__main__":
    main()
