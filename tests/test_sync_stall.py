"""Issue 16 on a CPU: one tenant syncing over and over does not stall another tenant's stream.

A mid-size Llama (hidden 1024, 8 layers, vLLM's dummy weights) with rank-256 adapters on every
projection, in fp32 as the trainer writes them: 160 MB each, the size of an 8B model's rank-32
adapter, so that reading and packing one takes clearly longer than a decode step. A watcher streams the
base model (the tenants' KL reference) through ``/v1/completions`` and records the gap between tokens; tenant A syncs every
0.75 s. (On a CPU a LoRA stream's own decode step, vLLM's torch LoRA ops at the maximum rank, is as
slow as an adapter load, which would hide the stall either way; the GPU benchmark watches a LoRA
tenant.) Staged (the default), the engine only registers the
finished version between two steps, so the watcher's largest gap stays near its gaps without syncs.
The same syncs with the adapter read inside the engine's ``add_lora`` (the old way, still there
behind ``off_loop=False``) run in the same test and are recorded beside it (junit properties), but
not asserted: on 2 CPU cores the old way's stall is not reliably visible (see below).

Margins, from runs on the 2-core CI box (tests/README.md): the staged max gap within
``STAGED_MAX_OVER_P99`` × the no-sync p99 (measured 1.5×, 1.8×, 2.0×; 2.0–2.9× in eight runs on
2026-12-02: on a CPU the flip copies the 160 MB image into the slot, about one decode step). The old way's max gap read
7.1×, 5.0×, 2.1× and 2.8× in four runs, and its engine time per flip 49 ms against staging's 34 ms:
on a CPU the flip's copy into the adapter slot, which staging does not remove, is most of a load.
Where staging matters, on the GPU at 8B, the benchmark shows it (flip 22 ms against 104 ms).
"""

from __future__ import annotations

import asyncio
import statistics

import pytest
import ray

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.loadgen import GapStats, watch_gaps
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.models.synthetic import MID_CPU, write_dummy_model, write_random_adapter

pytestmark = pytest.mark.vllm

WINDOW_S = 8.0
SYNC_PERIOD_S = 0.75
STAGED_MAX_OVER_P99 = 3.5
RANK = 256
PROMPT = "def handle(request):\n    user = request.user\n"


@pytest.fixture(scope="module")
def mid_server(tiny, ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("mid-model")
    model = write_dummy_model(work / "model", MID_CPU, tiny.base)
    paths = {name: str(write_random_adapter(work / name, model, RANK, seed=i, dtype="float32"))
             for i, name in enumerate(("a-v0", "a-v1"))}
    config = ServerConfig(model=str(model), loras={"a": paths["a-v0"]}, max_loras=4,
                          max_cpu_loras=8, max_lora_rank=RANK, max_model_len=1024, extra_args=("--load-format", "dummy"))
    actor, url = start_server_actor(config, num_cpus=1)
    yield url, [paths["a-v0"], paths["a-v1"]]
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor)


async def _watch_while(url: str, action) -> GapStats:
    """The watcher's gaps over one window, with ``action`` (or nothing) running beside it."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_gaps(url, "base", PROMPT, duration_s=WINDOW_S, max_tokens=128))
    runner = asyncio.create_task(action(stop)) if action else None
    stats = await watcher
    stop.set()
    if runner is not None:
        await runner
    return stats


def _syncing(client: RemoteInferenceClient, paths: list[str], off_loop: bool, flips: list[float]):
    """A syncs on a fixed schedule, one every ``SYNC_PERIOD_S`` (a faster sync must not mean more
    flips in the window, or the largest gap would be a maximum over more of them); ``flips`` gets the
    engine's time at each flip, as the server measured it."""
    async def run(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start, i = loop.time(), 0
        while not stop.is_set():
            (reply,) = await client.update_lora("a", paths[i % 2], off_loop=off_loop)
            flips.append(reply.load_s)
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, start + i * SYNC_PERIOD_S - loop.time()))
            except TimeoutError:
                pass
    return run


async def test_one_tenants_syncs_do_not_stall_another_tenants_stream(mid_server, record_property) -> None:
    url, paths = mid_server
    client = RemoteInferenceClient(url)
    await client.sample([0, 1, 2], {"max_tokens": 4})  # warm the engine and A's adapter
    await client.sample([0, 1, 2], {"max_tokens": 4}, "a")
    quiet = await _watch_while(url, None)
    staged_flips: list[float] = []
    staged = await _watch_while(url, _syncing(client, paths, True, staged_flips))
    legacy_flips: list[float] = []
    legacy = await _watch_while(url, _syncing(client, paths, False, legacy_flips))
    p99 = quiet.quantile(0.99)
    figures = {"quiet_p50_ms": 1e3 * quiet.quantile(0.5), "quiet_p99_ms": 1e3 * p99, "quiet_max_ms": 1e3 * quiet.max_s,
               "staged_p99_ms": 1e3 * staged.quantile(0.99), "staged_max_ms": 1e3 * staged.max_s,
               "legacy_p99_ms": 1e3 * legacy.quantile(0.99), "legacy_max_ms": 1e3 * legacy.max_s,
               "staged_flip_ms": 1e3 * statistics.median(staged_flips), "legacy_flip_ms": 1e3 * statistics.median(legacy_flips),
               "staged_syncs": len(staged_flips), "legacy_syncs": len(legacy_flips)}
    record_property("gaps", figures)
    assert len(staged_flips) >= 4 and len(legacy_flips) >= 4, figures
    assert staged.max_s <= STAGED_MAX_OVER_P99 * p99, figures
