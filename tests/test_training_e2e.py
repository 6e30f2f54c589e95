"""The trainer as a Ray actor syncing one tenant into a real vLLM server while another tenant generates."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.training.actor import start_trainer_actor
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.engine import EngineConfig, LocalTrainingEngine, make_training_engine
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec

from .conftest import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def trainer_actor(tiny, vllm_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    config = TrainerConfig(base_model=str(tiny.base), state_dir=root / "state", sampler_root=root / "sampler",
                           inference_urls=(vllm_server.url,), max_lora_rank=16, num_threads=1)
    # On the device the one GPU belongs to the vLLM server; the trainer then trains on CPU.
    actor = start_trainer_actor(config, num_gpus=0)
    yield actor
    ray.kill(actor)


def phrase_data(tok, word: str, prompt: list[int]) -> list[Datum]:
    w = tok.encode(word, add_special_tokens=False)
    seq = prompt + w * 6
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(w) * 6)
    return [Datum(model_input=seq[:-1], loss_fn_inputs={"target_tokens": seq[1:], "weights": weights})] * 4


async def test_sampler_sync_changes_one_tenant_and_never_aborts_another(tiny, tok, vllm_server, trainer_actor) -> None:
    client = RemoteInferenceClient(vllm_server.url)
    engine = make_training_engine(EngineConfig(kind="local"), actor=trainer_actor)
    assert isinstance(engine, LocalTrainingEngine)
    prompt = tok("def main():\n    print('hello')")["input_ids"]
    meow, woof = (tok.encode(w, add_special_tokens=False)[0] for w in (" meow", " woof"))

    # Tenant A serves the meow adapter; its trainer-side LoRA learns " woof".
    await client.load_lora_adapter("tenant-a", str(tiny.loras["meow"]), load_inplace=False)
    (before,) = await client.sample(prompt, {"max_tokens": 8, **GREEDY}, "tenant-a")
    assert before.token_ids == [meow] * 8
    await engine.create_lora("tenant-a", LoraSpec(rank=8, alpha=16))
    data = phrase_data(tok, " woof", prompt)
    for _ in range(10):
        await engine.forward_backward("tenant-a", data)
        await engine.optim_step("tenant-a", AdamParams(learning_rate=5e-3))

    # B (another tenant) and A both have long requests in flight when A syncs.
    b_tasks = [asyncio.create_task(client.sample(prompt, {"max_tokens": 400, **GREEDY}, "meow2")) for _ in range(3)]
    a_task = asyncio.create_task(client.sample_with_retry(prompt, {"max_tokens": 200, **GREEDY}, "tenant-a"))
    b_done: list[float] = []
    for t in b_tasks:
        t.add_done_callback(lambda _t: b_done.append(time.monotonic()))

    async def generating(name: str, count: int) -> bool:
        (state,) = await client.state()
        info = next(lo for lo in state.loras if lo.name == name)
        return info.in_flight >= count and info.in_flight_tokens >= 8 * count

    await wait_for(lambda: generating("meow2", 3), what="B generating")
    await wait_for(lambda: generating("tenant-a", 1), what="A generating")
    synced = await trainer_actor.save_weights_for_sampler.remote("tenant-a", "step-10")
    sync_end = time.monotonic()
    assert synced.synced and synced.versions == [2]

    b_results = await asyncio.wait_for(asyncio.gather(*b_tasks), 300)
    for (s,) in b_results:  # never aborted, full length, one weight version
        assert s.finish_reason == "length" and len(s.token_ids) == 400
        assert [v.version for v in s.version_spans] == [1]
    assert max(b_done) > sync_end, "B finished before the sync: the test proved nothing"

    (a,) = await asyncio.wait_for(a_task, 300)  # one seamless completion across the sync
    assert a.finish_reason == "length" and len(a.token_ids) == 200 and len(a.logprobs) == 200
    k = a.token_ids.index(woof)
    assert a.token_ids == [meow] * k + [woof] * (200 - k)
    assert [v.version for v in a.version_spans] == [1, 2]
    (after,) = await client.sample(prompt, {"max_tokens": 8, **GREEDY}, "tenant-a")
    assert after.token_ids == [woof] * 8

    # Deleting the tenant removes it from the trainer and from inference.
    await engine.delete_lora("tenant-a")
    (state,) = await client.state()
    assert "tenant-a" not in {lo.name for lo in state.loras}
    with pytest.raises(SkyrlError) as err:
        await engine.forward("tenant-a", data)
    assert err.value.status == 404


async def test_trainer_actor_metrics_and_state(trainer_actor) -> None:
    state = await trainer_actor.state.remote()
    assert state.loaded and state.device == ("cpu" if not torch.cuda.is_available() else state.device)
    text = await trainer_actor.metrics_text.remote()
    assert 'skyrl_trainer_cache_hits_total{tier="resident"}' in text
    assert "skyrl_trainer_switch_seconds_bucket" in text
