"""Driver run inside a two-node local Ray cluster (tests/test_two_nodes.py): a server placed on the
second node, reached through the address it announces. Prints one JSON line with what it saw."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse

import aiohttp
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import AutoTokenizer

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.models.tiny import build_fixtures

SECOND_NODE_IP = "127.0.0.2"


async def reachable(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url + "/health") as resp:
                return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def probe(url: str, fixtures) -> dict:
    tok = AutoTokenizer.from_pretrained(fixtures.base)
    woof = tok(" woof", add_special_tokens=False)["input_ids"][0]
    (sample,) = await RemoteInferenceClient(url).sample(tok("x = 1")["input_ids"],
                                                       {"max_tokens": 4, "temperature": 0.0}, "woof")
    port = urllib.parse.urlsplit(url).port
    return {"url": url, "tokens": sample.token_ids, "woof": woof,
            "reachable_at_announced": await reachable(url),
            "reachable_at_head_loopback": await reachable(f"http://127.0.0.1:{port}")}


def main() -> None:
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    second = next(n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == SECOND_NODE_IP)
    fixtures = build_fixtures()
    actor, url = start_server_actor(
        ServerConfig(model=str(fixtures.base), loras={"woof": str(fixtures.loras["woof"])}, max_loras=2),
        scheduling_strategy=NodeAffinitySchedulingStrategy(second["NodeID"], soft=False))
    try:
        out = asyncio.run(probe(url, fixtures))
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
