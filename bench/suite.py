"""Every benchmark in one command, and one summary: ``bench/results/<machine>-<date>.json`` + PNG.

Each benchmark runs in its own process (its own Ray cluster and servers), writes its own JSON and
plot under ``bench/results/<machine>-<date>/``; the summary collects the headline ratios next to
their targets and says which are met. Every figure is a ratio measured side by side in one run.

    python -m bench.suite                  # CPU, the tiny model (about 25 minutes on 2 cores, the soak included)
    python -m bench.suite --quick          # shorter windows, for a smoke run
    python -m bench.suite --gpu --machine h100 --trainer-model 0.5b
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import machine_name, today

logger = logging.getLogger("bench.suite")


@dataclass(frozen=True)
class Target:
    item: str
    label: str
    path: tuple[str | int, ...]  # where the figure sits in the benchmark's JSON
    goal: str  # ">= x", "<= x" or "== x"; "" when only reported


TARGETS: dict[str, list[Target]] = {
    "isolation": [
        Target("1", "B tok/s while A syncs 1/s ÷ A generating, no sync (per-LoRA)",
               ("b_ratio_vs_a_no_sync", "per-lora"), ">= 0.97"),
        Target("1", "same, engine-wide pause", ("b_ratio_vs_a_no_sync", "engine-wide"), ""),
        Target("1", "same, in-place load without pause", ("b_ratio_vs_a_no_sync", "inplace-no-pause"), ""),
        Target("2", "sync latency ÷ raw adapter load", ("sync_over_raw_load",), "<= 1.5"),
        Target("7", "B alone after 200 syncs ÷ before", ("damage", "after_over_before"), ">= 0.95"),
    ],
    "waste": [
        Target("3", "tokens generated twice per abort", ("summary", "regenerated_per_abort"), "<= 0"),
        Target("3", "extra prefill seconds per abort", ("summary", "extra_prefill_s_per_abort"), ""),
        Target("3", "extra prompt tokens per abort (of which cached)", ("summary", "extra_prompt_tokens_per_abort"), ""),
    ],
    "api-overhead": [
        Target("4", "API latency ÷ direct, concurrency 1", ("latency_ratio_c1",), "<= 1.15"),
        Target("4", "API tokens/s ÷ direct, concurrency 32", ("throughput_ratio_c32",), ">= 0.9"),
        Target("4", "API (plain HTTP, no SDK) tokens/s ÷ direct, concurrency 32",
               ("service_only", "throughput_ratio_c32"), ""),
    ],
    "trainer": [
        Target("5", "tenant switch via CPU tier ÷ forward_backward", ("switch_over_step", "cpu"), "<= 0.10"),
        Target("5", "tenant switch via disk tier ÷ forward_backward", ("switch_over_step", "disk"), ""),
        Target("5", "training tok/s, 4 tenants resident ÷ 1",
               ("train_tokens_per_s_ratio_vs_1_tenant", "4 tenants, 4 resident"), ""),
    ],
    "scaling": [
        Target("6", "1 tenant syncing 1/s: tok/s ÷ no sync (per-LoRA)",
               ("by_tenants", "1", "ratio_median", "per-lora"), ">= 0.97"),
        Target("6", "8 tenants (per-LoRA, median tenant)", ("by_tenants", "8", "ratio_median", "per-lora"), ""),
        Target("6", "32 tenants (per-LoRA, median tenant)", ("by_tenants", "32", "ratio_median", "per-lora"), ">= 0.9"),
        Target("6", "32 tenants (per-LoRA, worst tenant)", ("by_tenants", "32", "ratio_min", "per-lora"), ""),
        Target("6", "1 tenant, engine-wide pause", ("by_tenants", "1", "ratio_median", "engine-wide"), ""),
        Target("6", "8 tenants, engine-wide pause", ("by_tenants", "8", "ratio_median", "engine-wide"), ""),
        Target("6", "32 tenants, engine-wide pause", ("by_tenants", "32", "ratio_median", "engine-wide"), ""),
    ],
    "soak": [  # issue 9's load test: 4 tenants, one sync a second round-robin
        Target("soak", "syncs done", ("soak", "syncs"), ">= 500"),
        Target("soak", "tokens lost, repeated or changed vs uninterrupted twins", ("soak", "mismatched_tokens"), "<= 0"),
        Target("soak", "requests failed or stuck", ("soak", "error_count"), "<= 0"),
        Target("soak", "completions cut by a sync and continued", ("soak", "aborted_segments"), ""),
        Target("soak", "largest memory growth of a server process after warm-up", ("soak", "memory_growth_max"), "<= 0.10"),
    ],
}


def commands(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    gpu = ["--num-gpus", "1"] if args.gpu else []
    common = ["--machine", args.machine, "--out", str(out)]
    model = ["--model", args.model] if args.model else []
    quick = args.quick
    return {
        "isolation": ["-m", "bench.isolation", *common, *gpu, *model, "--phase-s", "3" if quick else "5",
                      "--rounds", "2" if quick else "6", "--damage-syncs", "50" if quick else "200"],
        "waste": ["-m", "bench.waste", *common, *gpu, *model, "--windows", "2" if quick else "4",
                  "--window-s", "4" if quick else "6"],
        "scaling": ["-m", "bench.scaling", *common, *gpu, *model, "--window-s", "4" if quick else "8",
                    "--rounds", "1" if quick else "2"],
        "api-overhead": ["-m", "bench.api_overhead", *common, *gpu,
                         *(["--rounds", "1", "--concurrent-requests", "128"] if quick else [])],
        "soak": ["-m", "bench.soak", *common, *gpu, "--syncs", "60" if quick else "500"],
        "trainer": ["-m", "bench.trainer_switch", *common, "--model", args.trainer_model,
                    *(["--rank", "32", "--batch", "16", "--seq-len", "512"] if args.trainer_model == "0.5b" else []),
                    "--rounds", "5" if quick else "15"],
    }


def _find(out: Path, name: str) -> Path | None:
    pattern = "trainer-switch-*" if name == "trainer" else name
    found = sorted(out.glob(f"*-{pattern}.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _get(data: Any, path: tuple[str | int, ...]) -> float | None:
    for key in path:
        if not isinstance(data, dict) or str(key) not in data:
            return None
        data = data[str(key)]
    return float(data) if isinstance(data, int | float) else None


def _met(value: float | None, goal: str) -> bool | None:
    if not goal or value is None:
        return None
    op, x = goal.split()
    return {">=": value >= float(x), "<=": value <= float(x), "==": value == float(x)}[op]


def summarise(out: Path, runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, targets in TARGETS.items():
        path = _find(out, name)
        data = json.loads(path.read_text()) if path else None
        for t in targets:
            value = _get(data, t.path) if data else None
            rows.append({"item": t.item, "benchmark": name, "figure": t.label, "value": value, "target": t.goal or None,
                         "met": _met(value, t.goal), "source": str(path) if path else None,
                         "ran": runs.get(name, {}).get("rc") == 0})
    return rows


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(rows) + 1.2))
    ax.axis("off")
    cells = [[r["item"], r["figure"], "—" if r["value"] is None else f"{r['value']:.3g}", r["target"] or "",
              {True: "met", False: "NOT met", None: ""}[r["met"]]] for r in rows]
    table = ax.table(cellText=cells, colLabels=["#", "figure", "measured", "target", ""], loc="center",
                     colWidths=[0.04, 0.62, 0.1, 0.1, 0.1], cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for i, r in enumerate(rows, start=1):
        if r["met"] is not None:
            table[i, 4].set_facecolor("#c8f0c8" if r["met"] else "#f4c7c7")
    ax.set_title(f"skyrl_lora benchmarks · {summary['machine']} · {summary['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default=None)
    parser.add_argument("--gpu", action="store_true", help="servers on one GPU each")
    parser.add_argument("--model", default=None, help="base model for the inference benchmarks (default: tiny)")
    parser.add_argument("--trainer-model", default="tiny", choices=["tiny", "0.5b"])
    parser.add_argument("--only", nargs="*", choices=list(TARGETS), default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.machine = machine_name(args.machine)
    stem = f"{args.machine}-{today()}"
    out = args.out / stem
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for name, argv in commands(args, out).items():
        if args.only and name not in args.only:
            continue
        logger.info("running %s: %s", name, " ".join(argv))
        t0 = time.perf_counter()
        log = out / f"{name}.log"
        with log.open("w") as fh:
            try:
                rc = subprocess.run([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=args.timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        runs[name] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}
        logger.info("%s: rc %d in %.0f s", name, rc, runs[name]["wall_s"])
    summary = {"machine": args.machine, "date": today(), "args": {k: str(v) for k, v in vars(args).items()},
               "runs": runs, "rows": summarise(out, runs)}
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / f"{stem}.png")
    for r in summary["rows"]:
        logger.info("%-2s %-62s %10s %-8s %s", r["item"], r["figure"][:62],
                    "—" if r["value"] is None else f"{r['value']:.4g}", r["target"] or "", r["met"])
    print(args.out / f"{stem}.json")
    sys.exit(0 if all(r["rc"] == 0 for r in runs.values()) else 1)


if __name__ == "__main__":
    main()
