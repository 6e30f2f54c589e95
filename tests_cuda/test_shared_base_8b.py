"""Issue 17 at production shape: the colocated trainer's forward/backward on the 8B-shaped model equal
a standalone trainer's (its own copy of the same bits) within bf16 tolerance, and training leaves the
shared weights' checksum unchanged. The tiny model (``test_shared_base_cuda.py``) has none of the
8B's proportions: 32 query heads over 8 key/value heads in the fused q/k/v rows, 14,336-row gate and
up halves, 32 layers.

vLLM serves the 8B shape with random weights (``--load-format dummy``), which no checkpoint holds: the
test maps the server's weights itself (CUDA IPC, as the colocated trainer does), writes them as an HF
checkpoint and gives that to the standalone trainer. Its own call on the device (about 4 minutes):
``bash scripts/gpu/run_issue16.sh colocated-8b``; ``run_suite.sh`` leaves it out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ray
import torch

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.server import ServerConfig
from skyrl_lora.models.synthetic import LLAMA_8B, write_dummy_model
from skyrl_lora.training.actor import start_trainer_actor
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.protocol import AdamParams, Datum, LoraSpec

SERVER = "skyrl-colocated-8b-server"


def _write_checkpoint(model: Path, out: Path) -> None:
    """The server's weights, mapped here, as an HF checkpoint of ``model``'s config in ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from skyrl_lora.training.shared_base import hf_views, map_server_weights

    shutil.copytree(model, out)
    config = AutoConfig.from_pretrained(model)
    shared = map_server_weights(SERVER)
    views = hf_views(shared.server_tensors, config)
    tensors = {name: view.detach().to("cpu", copy=True).contiguous() for name, view in views.items()}
    del views, shared
    torch.cuda.empty_cache()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 8


def _weights_that_say_something() -> None:
    """vLLM's dummy weights are uniform in +-1e-3, the norms' too: every logit is ~0, every logprob
    ln(1/vocab), and no adapter moves them, so an equality of logprobs would say nothing (2026-12-03:
    four steps moved them by 0.0002). Written through the mapping before anyone reads them: norms 1, the
    rest N(0, 0.02) as HF initialises a Llama, so logits spread by ~1 and an adapter shows."""
    from skyrl_lora.training.shared_base import map_server_weights

    shared = map_server_weights(SERVER)
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, tensor in shared.server_tensors.items():
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    torch.cuda.synchronize()
    del shared
    torch.cuda.empty_cache()


def _datum(seq_len: int, offset: int) -> Datum:
    tokens = [(7 * i + offset) % 200 + 3 for i in range(seq_len + 1)]
    return Datum(model_input=tokens[:-1], loss_fn_inputs={"target_tokens": tokens[1:]})


def test_colocated_trainer_equals_a_standalone_one_at_8b(ray_local: None, tiny: Any, tmp_path: Path) -> None:
    assert torch.cuda.is_available()
    model = write_dummy_model(tmp_path / "model", LLAMA_8B, Path(tiny.base))
    config = ServerConfig(model=str(model), max_loras=2, max_lora_rank=32, max_model_len=1024, enforce_eager=True,
                          gpu_memory_utilization=0.3, extra_args=("--load-format", "dummy"))
    server, url = start_server_actor(config, num_gpus=0.4, name=SERVER)
    own_model = tmp_path / "own-model"
    trainers: list[Any] = []
    try:
        _weights_that_say_something()
        _write_checkpoint(model, own_model)
        common = dict(sampler_root=tmp_path / "adapters", max_lora_rank=32, resident_budget_bytes=16 << 30)
        shared = start_trainer_actor(TrainerConfig(base_model=str(model), state_dir=tmp_path / "shared",
                                                   base_weights="shared", share_from=SERVER, **common), num_gpus=0.3)
        trainers.append(shared)
        own = start_trainer_actor(TrainerConfig(base_model=str(own_model), state_dir=tmp_path / "own", **common),
                                  num_gpus=0.3)
        trainers.append(own)
        before = ray.get(shared.shared_base_checksum.remote())
        assert before and ray.get(own.shared_base_checksum.remote()) is None

        spec = LoraSpec(rank=32, alpha=64, seed=5)
        probe = [_datum(96, 1), _datum(64, 2)]
        train = [_datum(128, 3)]

        def logprobs(t: Any) -> list[float]:
            out = ray.get(t.forward.remote("a", probe)).loss_fn_outputs
            return [x for o in out for x in o["logprobs"]]

        def worst(x: list[float], y: list[float]) -> float:
            return max(abs(p - q) for p, q in zip(x, y, strict=True))

        for t in trainers:
            ray.get(t.create_lora.remote("a", spec))
        start = logprobs(shared)
        assert worst(start, logprobs(own)) < 0.05
        losses: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(4):  # a high rate, so the adapter moves the logprobs well past bf16 noise
            for i, t in enumerate(trainers):
                out = ray.get(t.forward_backward.remote("a", train))
                losses[i].append(out.metrics["loss:sum"])
                ray.get(t.optim_step.remote("a", AdamParams(learning_rate=2e-3)))
        trained = logprobs(shared)
        assert worst(trained, start) > 0.2, "training did not move the logprobs: the comparison would say nothing"
        assert worst(trained, logprobs(own)) < 0.1, (trained[:8], logprobs(own)[:8])
        assert max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(losses[0], losses[1])) < 0.02, losses
        assert ray.get(shared.shared_base_checksum.remote()) == before  # the base was never written
        print(f"8b: logprobs colocated vs standalone, worst |diff| {worst(start, logprobs(own)):.4f} before training, "
              f"{worst(trained, logprobs(own)):.4f} after; training moved them by {worst(trained, start):.3f}; "
              f"losses {losses}")
    finally:
        for actor in (*trainers, server):
            ray.kill(actor)
        shutil.rmtree(own_model, ignore_errors=True)
