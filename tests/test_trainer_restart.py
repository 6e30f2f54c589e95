"""Issue 9: the trainer actor dies. Ray restarts it; each tenant comes back from its last saved state,
a request that was in flight fails with a clear error, and the same request succeeds when retried."""

from __future__ import annotations

import time

import pytest
import ray
import torch
from ray.exceptions import RayActorError

from skyrl_lora.api.trainer_backend import call_actor
from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.actor import start_trainer_actor
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec


def _batch(tok, n: int) -> list[Datum]:
    ids = tok("def main():\n    return 1")["input_ids"]
    return [Datum(model_input=ids[:-1], loss_fn_inputs={"target_tokens": ids[1:]}) for _ in range(n)]


def test_a_dead_trainer_comes_back_with_the_last_saved_state(tiny, tok, ray_local, tmp_path) -> None:
    config = TrainerConfig(base_model=str(tiny.base), state_dir=tmp_path / "t", sampler_root=tmp_path / "a",
                           max_lora_rank=16, num_threads=1)
    trainer = start_trainer_actor(config, num_gpus=0, max_restarts=1)
    try:
        ray.get(trainer.create_lora.remote("ada", LoraSpec(rank=8, alpha=16, seed=1)), timeout=60)
        adam = AdamParams(learning_rate=1e-2)
        ray.get(trainer.forward_backward.remote("ada", _batch(tok, 2)), timeout=60)
        ray.get(trainer.optim_step.remote("ada", adam), timeout=60)
        ray.get(trainer.save_state.remote("ada", "step1"), timeout=60)
        saved = ray.get(trainer.snapshot_tensors.remote("ada"), timeout=60)
        ray.get(trainer.forward_backward.remote("ada", _batch(tok, 2)), timeout=60)  # after the save: lost on a crash
        ray.get(trainer.optim_step.remote("ada", adam), timeout=60)
        moved = ray.get(trainer.snapshot_tensors.remote("ada"), timeout=60)
        assert any(not torch.equal(saved[k], moved[k]) for k in saved)

        in_flight = trainer.forward_backward.remote("ada", _batch(tok, 64))
        ray.kill(trainer, no_restart=False)  # the process dies; Ray restarts the actor
        with pytest.raises(RayActorError):
            ray.get(in_flight, timeout=120)

        deadline = time.monotonic() + 180
        while True:  # calls made while Ray restarts the actor may fail; poll with a deadline
            try:
                ray.get(trainer.ready.remote(), timeout=60)
                break
            except RayActorError:
                assert time.monotonic() < deadline, "the trainer did not come back"
                time.sleep(0.5)
        restored = ray.get(trainer.snapshot_tensors.remote("ada"), timeout=60)
        for k in saved:
            assert torch.equal(restored[k], saved[k]), k  # exactly the saved state, not the lost step
        out = ray.get(trainer.forward_backward.remote("ada", _batch(tok, 2)), timeout=60)  # the retry works
        assert out.metrics["loss:sum"] > 0
    finally:
        ray.kill(trainer, no_restart=True)


async def test_the_api_reports_a_dead_trainer_as_a_clear_retryable_error() -> None:
    """Pure mapping: what the service tells a client whose request was on a trainer that died."""

    class DeadMethod:
        @staticmethod
        def remote(*_: object):
            async def fail() -> None:
                raise RayActorError()
            return fail()

    with pytest.raises(SkyrlError) as e:
        await call_actor(DeadMethod())
    assert e.value.status == 503 and "submit the request again" in e.value.message
