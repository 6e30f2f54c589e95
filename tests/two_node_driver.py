"""Driver run inside a two-node local Ray cluster (tests/test_two_nodes.py): a server placed on the
second node, reached through the address it announces, and a version published to it from the head
node (sent as files, not a path). Prints one JSON line with what it saw."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import aiohttp
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import AutoTokenizer

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.models.tiny import build_fixtures
from skyrl_lora.node_identity import node_identity

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
    client = RemoteInferenceClient(url)
    (sample,) = await client.sample(tok("x = 1")["input_ids"], {"max_tokens": 4, "temperature": 0.0}, "woof")
    port = urllib.parse.urlsplit(url).port
    out = {"url": url, "tokens": sample.token_ids, "woof": woof,
           "reachable_at_announced": await reachable(url),
           "reachable_at_head_loopback": await reachable(f"http://127.0.0.1:{port}")}
    out.update(await publish_across_nodes(client, tok, fixtures))
    return out


async def publish_across_nodes(client: RemoteInferenceClient, tok, fixtures) -> dict:
    """A version published from this (head) node to the server on the second node: the client sees
    another node and sends the files; the server stages them from its own node memory."""
    shm = Path(tempfile.mkdtemp(prefix="two-node-publish-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        version = shutil.copytree(fixtures.loras["meow"], shm / "meow")
        (reply,) = await client.update_lora("pub", str(fixtures.loras["woof"]), create=True)  # first version
        (reply,) = await client.update_lora("pub", str(fixtures.loras["woof"]) + "-durable", load_from=str(version),
                                            source_node=node_identity())
        (state,) = await client.state()
        served = next(lo for lo in state.loras if lo.name == "pub")
        (sample,) = await client.sample(tok("x = 1")["input_ids"], {"max_tokens": 4, "temperature": 0.0}, "pub")
        meow = tok(" meow", add_special_tokens=False)["input_ids"][0]
        out = {"server_node_differs": state.node != node_identity(), "published_version": reply.lora.version,
               "served_from_upload": "/uploads/" in served.path, "published_tokens_meow": sample.token_ids == [meow] * 4}
        await client.unload_lora_adapter("pub")
        out["upload_freed"] = not Path(served.path).exists()
        return out
    finally:
        shutil.rmtree(shm, ignore_errors=True)


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
