"""The colocated trainer for real (issue 17): a vLLM server's worker hands out CUDA IPC handles of its
weights, a trainer actor on the same GPU builds its base model on views of them. Against a standalone
trainer (its own copy) on the tiny model: the same logprobs within bf16 tolerance, before and after
training; the shared weights' checksum unchanged by training; the server's greedy base output
unchanged; two tenants train while two others sample."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.training.actor import start_trainer_actor
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec

SERVER = "skyrl-colocated-server"


def _datum(tok: Any, phrase: str) -> Datum:
    p = tok.encode("def main():\n    return")
    seq = p + tok.encode(phrase, add_special_tokens=False) * 6
    return Datum(model_input=seq[:-1], loss_fn_inputs={"target_tokens": seq[1:],
                                                       "weights": [0.0] * (len(p) - 1) + [1.0] * (len(seq) - len(p))})


def test_colocated_trainer_on_the_servers_weights(ray_local: None, tiny: Any, tok: Any, tmp_path: Path) -> None:
    assert torch.cuda.is_available()
    config = ServerConfig(model=str(tiny.base), loras={"s1": str(tiny.loras["meow"]), "s2": str(tiny.loras["woof"])},
                          max_loras=4, max_lora_rank=16, max_model_len=512, gpu_memory_utilization=0.3)
    server, url = start_server_actor(config, num_gpus=0.5, name=SERVER)
    common = dict(base_model=str(tiny.base), sampler_root=tmp_path / "adapters", max_lora_rank=16,
                  inference_urls=(url,))
    shm = Path("/dev/shm") / f"skyrl-colocated-{uuid.uuid4().hex[:8]}"
    shared = start_trainer_actor(TrainerConfig(state_dir=tmp_path / "shared", base_weights="shared",
                                               share_from=SERVER, publish_root=shm, **common), num_gpus=0.3)
    own = start_trainer_actor(TrainerConfig(state_dir=tmp_path / "own", **common), num_gpus=0.2)
    try:
        before = ray.get(shared.shared_base_checksum.remote())
        assert before and ray.get(own.shared_base_checksum.remote()) is None
        client = RemoteInferenceClient(url)
        greedy = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
        prompt = tok.encode("import os\nclass Config:")
        (base_before,) = asyncio.run(client.sample(prompt, greedy))

        spec = LoraSpec(rank=8, alpha=16, seed=3)
        probe = [_datum(tok, " meow")]
        for t in (shared, own):
            ray.get([t.create_lora.remote("a", spec), t.create_lora.remote("b", spec)])

        def logprobs(t: Any) -> list[float]:
            out: list[float] = ray.get(t.forward.remote("a", probe)).loss_fn_outputs[0]["logprobs"]
            return out

        def worst(x: list[float], y: list[float]) -> float:
            return max(abs(p - q) for p, q in zip(x, y))
        assert worst(logprobs(shared), logprobs(own)) < 0.05

        async def sample_while_training() -> tuple[list[Any], list[Any]]:
            async def tenant_samples(name: str) -> list[Any]:
                return await asyncio.gather(*(client.sample(prompt, {"max_tokens": 16}, name) for _ in range(8)))

            sampling = asyncio.gather(tenant_samples("s1"), tenant_samples("s2"))
            for _ in range(3):
                for tenant, phrase in (("a", " woof"), ("b", " meow")):
                    await shared.forward_backward.remote(tenant, [_datum(tok, phrase)])
                    await shared.optim_step.remote(tenant, AdamParams(learning_rate=1e-2))
            return await sampling

        done = asyncio.run(sample_while_training())
        assert all(len(s.token_ids) == 16 for group in done for (s,) in group)
        for _ in range(3):
            ray.get(own.forward_backward.remote("a", [_datum(tok, " woof")]))
            ray.get(own.optim_step.remote("a", AdamParams(learning_rate=1e-2)))
        assert worst(logprobs(shared), logprobs(own)) < 0.1  # both trained the same way (bf16 noise)
        assert ray.get(shared.shared_base_checksum.remote()) == before  # the base was never written
        (base_after,) = asyncio.run(client.sample(prompt, greedy))
        assert base_after.token_ids == base_before.token_ids

        # publication from the colocated trainer is a GPU copy into the server (no file, no host trip) ...
        before_t = ray.get(server.stage_timings.remote())
        sw = ray.get(shared.save_weights_for_sampler.remote("a", "colocated-v1"))
        assert sw.synced and sw.versions
        after_t = ray.get(server.stage_timings.remote())
        assert {k: len(after_t[k]) - len(before_t.get(k, [])) for k in ("gpu_copy_ms", "prebuilt_ms", "load_ms")} == \
            {"gpu_copy_ms": 1, "prebuilt_ms": 0, "load_ms": 0}, after_t
        ray.get(shared.durable.remote(sw.path))  # the durable copy is written after the call returns
        deadline = time.monotonic() + 30
        while any(p.is_file() for p in shm.rglob("*")):  # then nothing is left in shared memory
            assert time.monotonic() < deadline, list(shm.rglob("*"))
            time.sleep(0.05)
        # ... whose slot holds bit for bit what vLLM's own load of the durable copy writes
        asyncio.run(client.load_lora_adapter("a-legacy", str(tiny.loras["woof"]), load_inplace=False))
        asyncio.run(client.update_lora("a-legacy", sw.path, off_loop=False))
        digests = {n: ray.get(server.slot_digest.remote(n)) for n in ("a", "a-legacy")}
        assert None not in digests["a"] and digests["a"] == digests["a-legacy"], digests
        # the next versions reuse the trainer's buffers (image and copy, split once): still bit for bit
        for v in (2, 3):
            ray.get(shared.forward_backward.remote("a", [_datum(tok, " woof")]))
            ray.get(shared.optim_step.remote("a", AdamParams(learning_rate=1e-2)))
            sw = ray.get(shared.save_weights_for_sampler.remote("a", f"colocated-v{v}"))
            ray.get(shared.durable.remote(sw.path))
            asyncio.run(client.update_lora("a-legacy", sw.path, off_loop=False))
            again = {n: ray.get(server.slot_digest.remote(n)) for n in ("a", "a-legacy")}
            assert again["a"] == again["a-legacy"] != digests["a"], (v, again, digests)
            digests = again
        mem_shared = ray.get(shared.cuda_memory.remote())
        mem_own = ray.get(own.cuda_memory.remote())
        print(f"colocated trainer CUDA allocated {mem_shared}; standalone {mem_own}")
        assert mem_shared["allocated"] < mem_own["allocated"]  # it holds no base copy
    finally:
        for actor in (shared, own, server):
            ray.kill(actor)
        shutil.rmtree(shm, ignore_errors=True)
