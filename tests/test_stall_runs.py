"""``bench.stall_runs``: repeated sync_stall runs judged on their median (pure logic)."""

from __future__ import annotations

from typing import Any

from bench.stall_runs import combine


def _run(one_others: float, p99: float) -> dict[str, Any]:
    summary = {"median": {"nosync": {}, "one": {}},
               "nosync_others_ratio": 1.0, "nosync_p99_gap_ratio": 1.0,
               "one_others_ratio": one_others, "one_p99_gap_ratio": p99, "one_max_gap_over_nosync_p99": 1.5,
               "abort_cost_vs_inplace": 0.1}
    return {"summary": summary}


def test_the_target_is_judged_on_the_median_and_each_run_is_counted() -> None:
    runs = {"a": _run(0.96, 1.20), "b": _run(0.98, 1.00), "c": _run(0.99, 1.05)}
    one = combine(runs)["windows"]["one"]
    assert one["others_ratio"]["median"] == 0.98
    assert one["others_ratio"]["met"] and one["others_ratio"]["runs_met"] == 2
    assert one["p99_gap_ratio"]["median"] == 1.05
    assert one["p99_gap_ratio"]["met"] and one["p99_gap_ratio"]["runs_met"] == 2
    assert one["tokens_ratio"]["median"] is None  # a ratio no run reported stays unjudged


def test_a_median_past_the_target_is_not_met() -> None:
    runs = {"a": _run(0.96, 1.2), "b": _run(0.95, 1.3)}
    for run in runs.values():
        del run["summary"]["abort_cost_vs_inplace"]  # runs without the eight-tenant windows
    combined = combine(runs)
    assert combined["abort_cost_vs_inplace"]["median"] is None
    one = combined["windows"]["one"]
    assert not one["others_ratio"]["met"] and one["others_ratio"]["runs_met"] == 0
    assert not one["p99_gap_ratio"]["met"]
