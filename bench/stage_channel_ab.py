"""Staging over the stage channel against staging through ``collective_rpc``, alternating runs.

Whether staging goes around the engine's loop is a server setting (``stage_channel``), so the two
ways cannot share one server: this runs ``bench.publish_latency`` (and, with ``--sync-stall``,
``bench.sync_stall``) with the channel on and off, alternating, ``--rounds`` times, and summarises
the runs it finds under ``--out`` side by side (medians over rounds of each run's p50).

    python -m bench.stage_channel_ab --rounds 3 --shape tiny --num-gpus 0     # CPU, tiny model
    python -m bench.stage_channel_ab --aggregate-only --out DIR               # summarise runs made before
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import finish_figure, machine_name, today, write_result

logger = logging.getLogger("bench.stage_channel_ab")
WAYS = {True: "stage-channel", False: "no-stage-channel"}


def _run(module: str, args: list[str], out: Path) -> None:
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    logger.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def aggregate(out: Path) -> dict[str, Any]:
    publish: dict[str, dict[str, list[float]]] = {}
    stall: dict[str, dict[str, list[float]]] = {}
    for path in sorted(out.glob("*-r*/*.json")):
        result = json.loads(path.read_text())
        way = WAYS[bool(result["config"].get("stage_channel", True))]
        if "publish-latency" in path.name:
            for window, s in result["summary"].items():
                for key in ("sync_ms_p50", "save_to_first_token_ms_p50", "first_token_ms_p50"):
                    publish.setdefault(way, {}).setdefault(f"{window}_{key}", []).append(s[key])
        elif "sync-stall" in path.name:
            for w in result["windows"]:
                for key in ("tokens_per_s", "watch_p99_ms", "watch_max_ms", "stage_asks", "syncs"):
                    stall.setdefault(way, {}).setdefault(f"{w['window']}_{key}", []).append(w[key])
    med = {name: {way: {k: statistics.median(v) for k, v in d.items()} for way, d in part.items()}
           for name, part in (("publish_latency", publish), ("sync_stall", stall)) if part}
    runs = {name: {way: len(next(iter(d.values()))) for way, d in part.items()}
            for name, part in (("publish_latency", publish), ("sync_stall", stall)) if part}
    return {"median": med, "runs": runs}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    pub = result["summary"]["median"].get("publish_latency", {})
    keys = [k for k in next(iter(pub.values()), {}) if k.endswith(("sync_ms_p50", "save_to_first_token_ms_p50"))]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    for i, (way, d) in enumerate(sorted(pub.items())):
        ax.bar([j + (i - 0.5) * width for j in range(len(keys))], [d[k] for k in keys], width=width, label=way)
    ax.set_xticks(range(len(keys)), [k.removesuffix("_p50").replace("_", " ") for k in keys], fontsize=7)
    ax.set_ylabel("ms (median over runs of each run's p50)")
    ax.legend()
    finish_figure(fig, png, f"{result['machine']}: staging around the engine's loop vs collective_rpc "
                            f"({result['config']['shape']} model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/stage-channel"))
    parser.add_argument("--machine", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", choices=("8b", "tiny"), default="tiny")
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--sync-stall", action="store_true", help="also bench.sync_stall (mid-cpu shape on a CPU)")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    common = ["--num-gpus", str(args.num_gpus)] + (["--machine", args.machine] if args.machine else [])
    if not args.aggregate_only:
        for r in range(1, args.rounds + 1):
            for way in WAYS.values():
                _run("bench.publish_latency", ["--shape", args.shape, "--rank", "8" if args.shape == "tiny" else "32",
                                               "--tenants", "2", "--streams", "4", "--publishes", "8", f"--{way}",
                                               *common], args.out / f"{way}-r{r}")
                if args.sync_stall:
                    shape = ["--shape", "mid-cpu", "--rank", "64"] if args.num_gpus == 0 else ["--shape", "8b", "--rank", "32"]
                    _run("bench.sync_stall", [*shape, "--tenants", "2", "--streams", "2", "--window-s", "8", "--rounds",
                                              "1", "--windows", "nosync", "one", "all", "all-inplace", f"--{way}", *common],
                         args.out / f"sync-stall-{way}-r{r}")
    result = {"machine": machine_name(args.machine), "date": today(),
              "config": {"shape": args.shape, "rounds": args.rounds, "num_gpus": args.num_gpus},
              "summary": aggregate(args.out)}
    logger.info("wrote %s: %s", write_result(result, args.out, "stage-channel-ab", plot), result["summary"])


if __name__ == "__main__":
    main()
