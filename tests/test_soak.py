"""Issue 9, load: the soak's short variant (``python -m bench.soak`` is the full one, ≥ 500 syncs).

Its own float32 server: greedy completions must be reproducible token for token across batch
compositions for the twin comparison to mean anything.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from bench.soak import soak, twin_adapter
from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.inference.vllm_compat.worker import FLIP_LOG_KEPT

pytestmark = pytest.mark.vllm

TENANTS = [f"soak-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def soak_server(tiny, tmp_path_factory):
    paths = twin_adapter(tiny.base, tmp_path_factory.mktemp("soak"))
    config = ServerConfig(model=str(tiny.base), loras=dict.fromkeys(TENANTS, paths[0]), max_loras=10,
                          max_lora_rank=16, dtype="float32")
    actor, url = start_server_actor(config, num_cpus=1)
    yield actor, url, paths
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor)


async def test_short_soak_loses_nothing(soak_server, tok) -> None:
    actor, url, paths = soak_server
    prompts = [tok(t)["input_ids"] for t in ("def main():\n    for item in", "class Node:\n    def __init__(self")]

    async def memory() -> dict[str, float]:
        return await asyncio.to_thread(ray.get, actor.memory.remote(), timeout=30)

    result = await soak([url], TENANTS, paths, prompts, syncs=24, period_s=0.5, max_tokens=32, streams=1,
                        memory_probe=memory)
    assert result["error_count"] == 0, result["errors"]
    assert result["stuck_requests"] == 0
    assert result["aborted_segments"] > 0  # the syncs really cut completions
    assert result["mismatched_requests"] == 0 and result["mismatched_tokens"] == 0
    assert result["requests"] >= 8 and result["left_staged"] == 0
    assert len(result["memory_bytes"]) == 2
    # the same with in-place syncs (armed flips on this one-worker server): nothing is cut, nothing
    # changes a token, nothing stays staged
    logged = len(await asyncio.to_thread(ray.get, actor.flip_log.remote(), timeout=30))
    inplace = await soak([url], TENANTS, paths, prompts, syncs=24, period_s=0.5, max_tokens=32, streams=1,
                         mode="inplace")
    flips = await asyncio.to_thread(ray.get, actor.flip_log.remote(), timeout=30)
    assert len(flips) == min(logged + 24, FLIP_LOG_KEPT) and all(f["error"] is None for f in flips)  # each armed
    assert inplace["error_count"] == 0 and inplace["stuck_requests"] == 0, inplace["errors"]
    assert inplace["aborted_segments"] == 0 and inplace["requests"] >= 8 and inplace["left_staged"] == 0
    assert inplace["mismatched_requests"] == 0 and inplace["mismatched_tokens"] == 0
