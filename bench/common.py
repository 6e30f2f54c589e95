"""What every benchmark shares: the machine's name, the result file names, writing JSON + PNG, and the
8B-shaped server with a colocated trainer beside it."""

from __future__ import annotations

import json
import os
import platform
import tempfile
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


def finish_figure(fig: Any, png: Path, title: str, *, dpi: int = 120) -> None:
    """Title, layout and the PNG beside the benchmark's JSON."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)


def add_colocated_args(parser: Any, *, seq_len: int, sampling: bool = True) -> None:
    """The options of the benchmarks that put a colocated trainer beside an 8B-shaped server."""
    parser.add_argument("--tenants", type=int, default=4, help="sampling tenants on the server")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training datum")
    parser.add_argument("--server-memory", type=float, default=0.45, help="the server's gpu_memory_utilization")
    if sampling:
        parser.add_argument("--streams", type=int, default=8, help="requests in flight per tenant")
        parser.add_argument("--max-tokens", type=int, default=128)


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


def training_datum(seq_len: int) -> Any:
    """One next-token datum of ``seq_len`` tokens (the benchmarks train on it over and over)."""
    from skyrl_lora.training.protocol import Datum

    return Datum(model_input=list(range(3, 3 + seq_len)), loss_fn_inputs={"target_tokens": list(range(4, 4 + seq_len))})


@dataclass
class Colocated:
    """A server of an 8B-shaped model (``--load-format dummy``, CUDA graphs) and a trainer on the same
    GPU whose base is views of the server's weights; ``shape="tiny"`` is a CPU smoke run instead (the
    packaged tiny model, which has weights, so the trainer falls back to its own copy)."""

    server: Any
    url: str
    trainer: Any
    model: Path
    work: Path
    adapters: dict[str, str]
    server_start_s: float
    trainer_start_s: float

    def stop(self) -> None:
        import ray

        ray.kill(self.trainer)
        ray.kill(self.server)


def start_colocated(args: Any, name: str, tenants: list[str], *, shape: str = "8b", publish: bool = False,
                    publish_images: bool = True, sync_mode: str = "abort", **server: Any) -> Colocated:
    """``tenants`` get random rank-``args.rank`` adapters on the server; ``publish``: the trainer
    syncs into the server through shared memory (``save_weights_for_sampler``), as ready slot images
    (``publish_images``) or as files, in ``sync_mode``."""
    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.server import ServerConfig
    from skyrl_lora.models.synthetic import LLAMA_8B, write_dummy_model, write_random_adapter
    from skyrl_lora.models.tiny import build_fixtures
    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig

    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    base = build_fixtures().base
    model = write_dummy_model(work / "model", LLAMA_8B, base) if shape == "8b" else Path(base)
    adapters = {t: str(write_random_adapter(work / t, model, args.rank, seed=i)) for i, t in enumerate(tenants)}
    config = ServerConfig(model=str(model), loras=adapters, max_loras=len(adapters) + 4,
                          max_cpu_loras=len(adapters) + 8, max_lora_rank=args.rank, max_model_len=1024,
                          enforce_eager=args.num_gpus == 0, gpu_memory_utilization=args.server_memory,
                          extra_args=("--load-format", "dummy") if shape == "8b" else (), **server)
    t0 = time.perf_counter()
    server_actor, url = start_server_actor(config, num_gpus=args.num_gpus * 0.6, name=name)
    server_start_s = time.perf_counter() - t0
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    t0 = time.perf_counter()
    trainer = start_trainer_actor(TrainerConfig(
        base_model=str(model), state_dir=work / "trainer", sampler_root=work / "adapters", max_lora_rank=args.rank,
        resident_budget_bytes=64 << 30, base_weights="shared" if shape == "8b" else "shared_or_own", share_from=name,
        publish_root=Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shm)) if publish else None,
        publish_images=publish_images, inference_urls=(url,) if publish else (), sync_mode=sync_mode),
        num_gpus=args.num_gpus * 0.4)
    return Colocated(server_actor, url, trainer, model, work, adapters, server_start_s, time.perf_counter() - t0)
