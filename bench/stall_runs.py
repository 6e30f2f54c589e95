"""Several ``bench.sync_stall`` runs of the same windows, read together: each window's ratios to its own
run's no-sync window, per run and their median, against issue 16's targets.

One round of 10 s windows is noisy at 8B (the no-sync watcher p99 alone moved 24–30 ms between runs on
one H200), so a target is judged on the median of runs made on the same machine, each run still
comparing its windows side by side.

    python -m bench.stall_runs RUN.json [RUN.json ...] --label final --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import finish_figure, write_result

# the ratios issue 16 sets targets on, by window: (summary key, target, True where higher is better)
ONE_TENANT: list[tuple[str, float, bool]] = [
    ("others_ratio", 0.97, True), ("p99_gap_ratio", 1.1, False), ("max_gap_over_nosync_p99", 2.0, False)]
TARGETS: dict[str, list[tuple[str, float, bool]]] = {
    "one": ONE_TENANT,
    "one-inplace": ONE_TENANT,
    "all": [("tokens_ratio", 0.80, True)],
    "all-inplace": [("tokens_ratio", 0.95, True)],
}
SHOWN = ("tokens_ratio", "others_ratio", "p99_gap_ratio", "max_gap_over_nosync_p99")


def _meets(value: float | None, target: float, higher: bool) -> bool:
    return value is not None and (value >= target if higher else value <= target)


def combine(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per window and ratio: each run's value, their median, and the target's verdict on the median."""
    windows = list(next(iter(runs.values()))["summary"]["median"])
    table: dict[str, dict[str, Any]] = {}
    for window in windows:
        row: dict[str, Any] = {}
        for ratio in SHOWN:
            values = {name: run["summary"].get(f"{window}_{ratio}") for name, run in runs.items()}
            present = [v for v in values.values() if v is not None]
            row[ratio] = {"runs": values, "median": statistics.median(present) if present else None}
        for ratio, target, higher in TARGETS.get(window, []):
            row[ratio]["target"] = target
            row[ratio]["met"] = _meets(row[ratio]["median"], target, higher)
            row[ratio]["runs_met"] = sum(_meets(v, target, higher) for v in row[ratio]["runs"].values())
        table[window] = row
    cost = [run["summary"].get("abort_cost_vs_inplace") for run in runs.values()]
    known = [c for c in cost if c is not None]  # runs without both eight-tenant windows have none
    return {"windows": table, "abort_cost_vs_inplace": {"runs": dict(zip(runs, cost)),
                                                        "median": statistics.median(known) if known else None}}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    table = result["combined"]["windows"]
    names = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, ratios in ((axes[0], ("tokens_ratio", "others_ratio")), (axes[1], ("p99_gap_ratio",))):
        for k, ratio in enumerate(ratios):
            for i, name in enumerate(names):
                runs = [v for v in table[name][ratio]["runs"].values() if v is not None]
                x = i + 0.3 * (k - (len(ratios) - 1) / 2)
                ax.scatter([x] * len(runs), runs, s=12, color=f"C{k}", alpha=0.6)
                ax.hlines(table[name][ratio]["median"], x - 0.12, x + 0.12, color=f"C{k}",
                          label=ratio if i == 0 else None)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("÷ the run's no-sync window (dots: runs, bars: median)")
    axes[1].set_ylabel("watcher p99 gap ÷ no sync")
    finish_figure(fig, png, f"{result['machine']}: {len(result['runs'])} sync_stall runs ({result['label']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench.sync_stall result JSONs")
    parser.add_argument("--label", default="runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    runs = {path.stem: json.loads(path.read_text()) for path in args.runs}
    first = next(iter(runs.values()))
    result = {"machine": first["machine"], "date": first["date"], "label": args.label, "config": first["config"],
              "runs": [str(p) for p in args.runs], "combined": combine(runs)}
    path = write_result(result, args.out, f"sync-stall-runs-{args.label}", plot)
    print(json.dumps({w: {r: v["median"] for r, v in row.items()} for w, row in result["combined"]["windows"].items()},
                     indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
