"""What every benchmark shares: the machine's name, the result file names, writing JSON + PNG."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def machine_name(explicit: str | None = None) -> str:
    """``--machine``, else ``SKYRL_BENCH_MACHINE``, else the host name: results say where they ran."""
    return explicit or os.environ.get("SKYRL_BENCH_MACHINE") or platform.node()


def today() -> str:
    return time.strftime("%Y-%m-%d")


def write_result(result: dict[str, Any], out_dir: Path, name: str, plot: Callable[[dict[str, Any], Path], None] | None
                 ) -> Path:
    """``<out>/<machine>-<date>-<name>.json`` (+ ``.png`` from ``plot``); returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['machine']}-{result['date']}-{name}"  # may contain dots ("0.5b"): no with_suffix
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(result, out_dir / f"{stem}.png")
    return json_path


def add_common_args(parser: Any, *, model: bool = True) -> None:
    """The options every inference benchmark takes: where it runs and where results go."""
    if model:
        parser.add_argument("--model", default=None, help="base model path (default: the tiny model)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per inference server")
    parser.add_argument("--machine", default=None, help="name in the results (default: $SKYRL_BENCH_MACHINE or host)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


@dataclass(frozen=True)
class TinySetup:
    """The tiny model, its two phrase LoRAs (woof, meow) and a code prompt, as the benchmarks use them."""

    base: str
    paths: list[str]
    prompt: list[int]
    tokenizer: Any


def tiny_setup(prompt: str = "def greet(name):\n    return") -> TinySetup:
    import logging

    from transformers import AutoTokenizer

    from skyrl_lora.models.tiny import build_fixtures

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fixtures = build_fixtures()
    tok = AutoTokenizer.from_pretrained(fixtures.base)
    return TinySetup(base=str(fixtures.base), paths=[str(fixtures.loras["woof"]), str(fixtures.loras["meow"])],
                     prompt=tok(prompt)["input_ids"], tokenizer=tok)


class CpuMeter:
    """CPU seconds spent by named groups of processes (each pid with its children) between two reads.

    Throughput ratios on a small machine are set by whoever burns the cores; this says who that is.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        import psutil

        self._procs: dict[str, list[Any]] = {}
        for name, pids in groups.items():
            procs = []
            for pid in pids:
                try:
                    p = psutil.Process(pid)
                    procs += [p, *p.children(recursive=True)]
                except psutil.Error:
                    continue
            self._procs[name] = procs

    def read(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for name, procs in self._procs.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    continue
            out[name] = total
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before.get(k, 0.0) for k in after}


def actor_pid(actor: Any) -> int:
    """The process id of a Ray actor (runs a tiny function inside it)."""
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60))
