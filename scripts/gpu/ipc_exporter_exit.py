"""What happens to a colocated trainer's mapped base weights when the server process that exported
them dies (torch only, seconds on the device): are the mapped tensors still readable, and does the
GPU memory come back only once the importer lets go? The answer decides how the trainer re-shares
after a server restart (``training/shared_base.py``).

    python scripts/gpu/ipc_exporter_exit.py [--gib 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import multiprocessing.synchronize
import os
import pickle
import signal
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("ipc_exporter_exit")


def _exporter(path: str, gib: float, ready: mp.synchronize.Event, hold: mp.synchronize.Event) -> None:
    from torch.multiprocessing.reductions import reduce_tensor

    t = torch.full((int(gib * 2**30) // 2,), 3.0, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    with open(path, "wb") as f:
        pickle.dump(reduce_tensor(t), f)
    ready.set()
    hold.wait(600)


def _free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.cuda.init()
    ctx = mp.get_context("spawn")
    result: dict[str, object] = {"gib": args.gib, "free_start_gib": _free_gib()}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "handle.pkl")
        ready, hold = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_exporter, args=(path, args.gib, ready, hold))
        proc.start()
        assert ready.wait(120), "the exporter never shared its tensor"
        result["free_exported_gib"] = _free_gib()
        with open(path, "rb") as f:
            rebuild, rebuild_args = pickle.load(f)
        mapped = rebuild(*rebuild_args)
        result["mapped_sum_alive"] = float(mapped[:1024].float().sum())
        result["free_mapped_gib"] = _free_gib()
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)  # as a crashed server dies: no cleanup of its own
        proc.join(60)
        result["exporter_exit_code"] = proc.exitcode
        result["free_after_exporter_died_gib"] = _free_gib()
        try:
            result["mapped_sum_after_death"] = float(mapped[:1024].float().sum())
            mapped.add_(0)  # does a write reach the memory without a fault?
            torch.cuda.synchronize()
            result["mapped_write_after_death"] = "ok"
        except Exception as exc:  # an illegal address would poison this context: say so
            result["mapped_after_death_error"] = f"{type(exc).__name__}: {exc}"
        del mapped
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        try:
            torch.cuda.ipc_collect()
        except Exception as exc:
            result["ipc_collect_error"] = str(exc)
        time.sleep(1.0)  # (the driver's teardown of the dead context is not synchronous with our call)
        result["free_after_importer_released_gib"] = _free_gib()
        result["seconds"] = time.perf_counter() - t0
    logger.info("%s", json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ipc_exporter_exit.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
