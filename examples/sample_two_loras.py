"""Sampling example: one vLLM server in a Ray actor, two tenants' LoRAs, one targeted sync.

    ./run.sh demo                                     # the full demo
    .venv/bin/python examples/sample_two_loras.py     # this example alone
    ray job submit --working-dir . -- python examples/sample_two_loras.py   # against `ray start --head`
"""

from __future__ import annotations

import asyncio
import logging

from transformers import AutoTokenizer

from skyrl_lora.cluster import inference_servers
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.models.tiny import build_fixtures

logger = logging.getLogger("example")


async def sample(client: RemoteInferenceClient, base: str, woof_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(base)
    prompt = tok("The animal says")["input_ids"]
    for tenant in ("alice", "bob"):
        (s,) = await client.sample_with_retry(prompt, {"max_tokens": 6, "temperature": 0.0}, tenant)
        logger.info("%s: %r", tenant, tok.decode(s.token_ids))
    # alice syncs new weights (here: the woof adapter); only alice's requests are touched.
    await client.update_lora("alice", woof_path)
    (s,) = await client.sample_with_retry(prompt, {"max_tokens": 6, "temperature": 0.0}, "alice")
    logger.info("alice after her sync: %r (version %d)", tok.decode(s.token_ids), s.version_spans[-1].version)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    fx = build_fixtures()
    loras = {"alice": str(fx.loras["meow"]), "bob": str(fx.loras["woof"])}
    with inference_servers(str(fx.base), loras) as cluster:
        asyncio.run(sample(cluster.client(), str(fx.base), str(fx.loras["woof"])))


if __name__ == "__main__":
    main()
