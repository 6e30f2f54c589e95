"""Supervised fine-tuning of one tenant's LoRA, then its adapter synced into vLLM and sampled.

    .venv/bin/python examples/sft.py --phrase " woof" --steps 10
    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".stage", "artifacts", ".git"]}' -- python examples/sft.py
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from transformers import AutoTokenizer

from skyrl_lora.cluster import skyrl_system
from skyrl_lora.config import SkyrlConfig
from skyrl_lora.training.engine import LocalTrainingEngine
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec

logger = logging.getLogger("example.sft")


async def sft(system, phrase: str, steps: int) -> None:
    tok = AutoTokenizer.from_pretrained(system.model)
    engine = LocalTrainingEngine(system.trainer)
    client = system.inference.client()  # carries the servers' bearer token
    prompt = tok("def main():\n    return")["input_ids"]
    word = tok.encode(phrase, add_special_tokens=False)
    seq = prompt + word * 6
    datum = Datum(model_input=seq[:-1], loss_fn_inputs={"target_tokens": seq[1:],
                                                        "weights": [0.0] * (len(prompt) - 1) + [1.0] * (len(word) * 6)})
    await engine.create_lora("sft-tenant", LoraSpec(rank=8, alpha=16))
    for step in range(steps):
        out = await engine.forward_backward("sft-tenant", [datum] * 4, "cross_entropy")
        await engine.optim_step("sft-tenant", AdamParams(learning_rate=5e-3))
        logger.info("step %d  loss %.3f", step, out.loss)
    path = await engine.save_weights_for_sampler("sft-tenant", "final")
    (s,) = await client.sample(prompt, {"max_tokens": 8, "temperature": 0.0}, "sft-tenant")
    logger.info("adapter %s now says: %r", path, tok.decode(s.token_ids))
    await engine.delete_lora("sft-tenant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--phrase", default=" woof")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with skyrl_system(SkyrlConfig.load(args.config)) as system:
        asyncio.run(sft(system, args.phrase, args.steps))


if __name__ == "__main__":
    main()
