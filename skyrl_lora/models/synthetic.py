"""Production-shaped models without a checkpoint: a Llama config served with vLLM's ``--load-format
dummy`` (random weights), the tiny fixture's tokenizer, and adapters of the right shapes written
directly with safetensors. Costs that scale with size (an adapter load, its copy into a slot) only
show at these sizes; the tiny model hides them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from skyrl_lora.inference.adapter_check import ModelShape
from skyrl_lora.lora_targets import PROJECTION_MODULES, UNEMBED_MODULES


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096


LLAMA_8B = LlamaShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8)
# big enough on a CPU that one rank-64 adapter is tens of MB and its load outlasts a decode step
MID_CPU = LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=8, max_position_embeddings=2048)


def write_dummy_model(out: Path, shape: LlamaShape, tokenizer_from: Path) -> Path:
    """A model directory vLLM serves with ``--load-format dummy``: config and tokenizer, no weights."""
    out.mkdir(parents=True, exist_ok=True)
    base = json.loads((tokenizer_from / "config.json").read_text())
    config = {**base, "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
              "num_hidden_layers": shape.num_hidden_layers, "num_attention_heads": shape.num_attention_heads,
              "num_key_value_heads": shape.num_key_value_heads, "head_dim": shape.hidden_size // shape.num_attention_heads,
              "max_position_embeddings": shape.max_position_embeddings, "torch_dtype": "bfloat16"}
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, out / name)
    return out


def write_random_adapter(out: Path, model_dir: Path, rank: int, *, seed: int = 0, dtype: str = "bfloat16",
                         targets: tuple[str, ...] = PROJECTION_MODULES, scale: float = 0.01) -> Path:
    """A peft-format adapter of random weights for every layer and target of ``model_dir``'s config
    (``lm_head`` among ``targets``: the output layer too)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    assert shape is not None, f"{model_dir} is not a Llama-shaped model"
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    prefixes = [(module, f"base_model.model.model.layers.{layer}."
                 f"{'self_attn' if module in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{module}")
                for layer in range(shape.num_layers) for module in targets if module not in UNEMBED_MODULES]
    prefixes += [(module, f"base_model.model.{module}") for module in targets if module in UNEMBED_MODULES]
    for module, prefix in prefixes:
        fan_in, fan_out = shape.features[module]
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * scale).to(torch_dtype)
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * scale).to(torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(targets), "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic"}, indent=1))
    return out
