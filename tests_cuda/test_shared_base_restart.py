"""A colocated trainer follows its server across a crash (``training/base_watch.py``): the server's
process is killed, Ray starts another that loads the weights into other GPU memory, and the trainer
lets go of the old mapping, waits, and builds its base on the new run's weights. Tenants' adapters are
untouched, a training call made while the server was down waits and runs, the next publication goes
by GPU copy into the new run, and the device's free memory comes back to what it was: no second copy
of the base is left behind.

A 3 GB model (Llama-shaped, 24 layers of width 2,048, random weights through ``--load-format dummy``),
so that a base left mapped would show in the free memory. Runs on the device with the suite
(``scripts/gpu/run_issue16.sh restart``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.models.synthetic import LlamaShape, write_dummy_model
from skyrl_lora.training.actor import start_trainer_actor
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec
from skyrl_lora.training.shared_base import checksum, map_server_weights
from tests.conftest import wait_for

SERVER = "skyrl-restart-server"
SHAPE = LlamaShape(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=8, max_position_embeddings=1024)
GiB = 1 << 30


def _datum(seq_len: int, offset: int) -> Datum:
    tokens = [(5 * i + offset) % 200 + 3 for i in range(seq_len + 1)]
    return Datum(model_input=tokens[:-1], loss_fn_inputs={"target_tokens": tokens[1:]})


def _server_checksum() -> dict[str, int]:
    """The server's weights as this process maps them (independently of the trainer)."""
    shared = map_server_weights(SERVER)
    try:
        return checksum(shared.server_tensors)
    finally:
        del shared
        torch.cuda.empty_cache()


def test_colocated_trainer_follows_a_restarted_server(ray_local: None, tiny: Any, tmp_path: Path) -> None:
    assert torch.cuda.is_available()
    model = write_dummy_model(tmp_path / "model", SHAPE, Path(tiny.base))
    config = ServerConfig(model=str(model), max_loras=2, max_lora_rank=16, max_model_len=512, enforce_eager=True,
                          gpu_memory_utilization=0.2, state_dir=str(tmp_path / "server-state"),
                          extra_args=("--load-format", "dummy"))
    server, url = start_server_actor(config, num_gpus=0.4, name=SERVER, max_restarts=1)
    shm = Path("/dev/shm") / f"skyrl-restart-{uuid.uuid4().hex[:8]}"
    trainer = None
    try:
        trainer = start_trainer_actor(TrainerConfig(
            base_model=str(model), state_dir=tmp_path / "trainer", sampler_root=tmp_path / "adapters",
            publish_root=shm, inference_urls=(url,), max_lora_rank=16, base_weights="shared", share_from=SERVER,
            reshare_poll_s=0.5), num_gpus=0.3)
        first = ray.get(trainer.shared_base_info.remote())
        assert first.mapped and first.incarnation and first.reshares == 0
        ray.get(trainer.create_lora.remote("a", LoraSpec(rank=16, alpha=32, seed=2)))
        probe, train = [_datum(64, 1)], [_datum(96, 2)]
        ray.get(trainer.forward_backward.remote("a", train))
        ray.get(trainer.optim_step.remote("a", AdamParams(learning_rate=1e-3)))
        published = ray.get(trainer.save_weights_for_sampler.remote("a", "v1"))
        assert published.synced and published.timeline is not None
        assert "ipc_handle" in published.timeline.export_parts  # the version went by GPU copy
        adapter = ray.get(trainer.snapshot_tensors.remote("a"))
        before = ray.get(trainer.forward.remote("a", probe)).loss_fn_outputs[0]["logprobs"]
        free_before = torch.cuda.mem_get_info()[0]

        ray.kill(server, no_restart=False)  # a crash: Ray starts the actor again, which loads vLLM again
        t0 = time.monotonic()
        during = trainer.forward.remote("a", probe)  # waits for the new run's weights, then runs

        async def reshared() -> bool:
            info = await trainer.shared_base_info.remote()
            return bool(info.reshares == 1 and info.mapped)
        asyncio.run(wait_for(reshared, 600, "the trainer's base on the restarted server's weights"))
        back_s = time.monotonic() - t0
        second = ray.get(trainer.shared_base_info.remote())
        assert second.incarnation != first.incarnation and second.tensors == first.tensors

        during_logprobs = ray.get(during, timeout=600).loss_fn_outputs[0]["logprobs"]
        after = ray.get(trainer.forward.remote("a", probe)).loss_fn_outputs[0]["logprobs"]
        assert during_logprobs in (before, after)  # on the old run's weights, or it waited for the new run's
        assert ray.get(trainer.shared_base_checksum.remote()) == _server_checksum()  # the new run's memory
        after_adapter = ray.get(trainer.snapshot_tensors.remote("a"))
        assert all(torch.equal(adapter[k], after_adapter[k]) for k in adapter)  # the tenant is untouched

        ray.get(trainer.forward_backward.remote("a", train))
        ray.get(trainer.optim_step.remote("a", AdamParams(learning_rate=1e-3)))
        assert ray.get(trainer.info.remote("a")).step == 2
        republished = ray.get(trainer.save_weights_for_sampler.remote("a", "v2"))
        assert republished.synced and republished.timeline is not None
        assert "ipc_handle" in republished.timeline.export_parts  # by GPU copy into the new run again
        client = RemoteInferenceClient(url)
        (sample,) = asyncio.run(client.sample([5, 6, 7, 8], {"max_tokens": 8, "temperature": 0.0}, "a"))
        assert len(sample.token_ids) == 8

        free_after = torch.cuda.mem_get_info()[0]
        base_bytes = ray.get(trainer.shared_base_bytes.remote())
        assert base_bytes > 2.5 * GiB
        # a base left mapped would hold its 3 GB beside the new run's: the device's free memory says not
        assert free_after > free_before - base_bytes / 2, (free_before / GiB, free_after / GiB, base_bytes / GiB)
        print(f"restart: base on the new run's weights {back_s:.1f} s after the kill; free memory "
              f"{free_before / GiB:.2f} -> {free_after / GiB:.2f} GiB (base {base_bytes / GiB:.2f} GiB); "
              f"logprobs equal across the restart: {before == after}")
    finally:
        for actor in (trainer, server):
            if actor is not None:
                ray.kill(actor)
