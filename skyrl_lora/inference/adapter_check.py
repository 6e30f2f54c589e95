"""Checks an adapter against the served model before any of it reaches the engine.

A bad adapter used to surface as an exception inside vLLM's ``add_lora`` (on the engine's step loop)
or, worse, as wrong output: a NaN in one tensor serves NaN logits to that tenant. Staging refuses it
first, naming what is wrong, so nothing is flipped and the tenant's old version keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyrl_lora.errors import SkyrlError
from skyrl_lora.lora_targets import SERVED_MODULES, UNEMBED_MODULES

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = {"F16", "BF16", "F32"}
# a decoder layer's projection (layer, module) or the output layer (module only)
_TENSOR_NAME = re.compile(r"(?:\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)|\.(lm_head))\.lora_([AB])\.weight$")


class AdapterCheckError(SkyrlError):
    """An adapter the server refuses to stage (always a 400 naming ``lora_path``)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(400, f"lora_path '{path}': {problem}", "lora_path")
        self.path, self.problem = str(path), problem

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses from AdapterChecker's processes as itself
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class ModelShape:
    """What an adapter must fit: each served module's (in, out) features and the layer count."""

    num_layers: int
    features: Mapping[str, tuple[int, int]]

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelShape | None:
        """Llama-style decoders (Llama, Qwen2/3, Mistral); None for a model of another shape."""
        try:
            hidden = int(hf_config.hidden_size)
            heads = int(hf_config.num_attention_heads)
            kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
            inter = int(hf_config.intermediate_size)
            layers = int(hf_config.num_hidden_layers)
            vocab = int(hf_config.vocab_size)
        except (AttributeError, TypeError, ValueError):
            return None
        q, kv = heads * head_dim, kv_heads * head_dim
        return cls(layers, {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
                            "lm_head": (hidden, vocab)})


def read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise AdapterCheckError(path, "has no adapter_config.json") from None
    except (OSError, ValueError) as exc:
        raise AdapterCheckError(path, f"unreadable adapter_config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterCheckError(path, "adapter_config.json is not an object")
    return config


def check_adapter_config(path: Path, shape: ModelShape | None, max_rank: int | None) -> tuple[int, list[str]]:
    """Rank and target modules of ``adapter_config.json``; returns them. Raises AdapterCheckError."""
    return validate_adapter_config(path, read_adapter_config(path), shape, max_rank)


def validate_adapter_config(path: Path, config: dict[str, Any], shape: ModelShape | None,
                            max_rank: int | None) -> tuple[int, list[str]]:
    """:func:`check_adapter_config` of a config already read from ``path``."""
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterCheckError(path, f"adapter_config.json r={rank!r} is not a positive integer")
    if max_rank is not None and rank > max_rank:
        raise AdapterCheckError(path, f"rank {rank} exceeds the server's max_lora_rank {max_rank}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    known = set(shape.features) if shape else set(SERVED_MODULES)
    unknown = sorted(set(targets) - known)
    if unknown:
        raise AdapterCheckError(path, f"target_modules {unknown} are not LoRA-served modules of this model "
                                f"({sorted(known)})")
    if "lora_alpha" in config and (not isinstance(config["lora_alpha"], (int, float)) or config["lora_alpha"] <= 0):
        raise AdapterCheckError(path, f"adapter_config.json lora_alpha={config['lora_alpha']!r} is not a positive number")
    return rank, list(targets)


def check_adapter(path: Path, shape: ModelShape | None, max_rank: int | None) -> None:
    """Rank, target modules, every tensor's name, dtype, shape and values; raises AdapterCheckError."""
    import torch
    from safetensors import SafetensorError, safe_open

    rank, targets = check_adapter_config(path, shape, max_rank)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterCheckError(path, "has no adapter_model.safetensors")
    seen = 0
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                seen += 1
                _check_tensor(path, name, handle.get_slice(name), rank, set(targets), shape)
                # a NaN or an Inf anywhere makes the sum non-finite; a sum is ~9x cheaper than
                # isfinite().all() on bf16 (27 vs 230 ms for an 8B rank-32 adapter on one core)
                if not bool(torch.isfinite(handle.get_tensor(name).sum())):
                    raise AdapterCheckError(path, f"tensor {name} holds NaN or Inf values")
    except SafetensorError as exc:  # a truncated or garbled file
        raise AdapterCheckError(path, f"adapter_model.safetensors is damaged ({exc})") from exc
    except OSError as exc:
        raise AdapterCheckError(path, f"adapter_model.safetensors cannot be read ({exc})") from exc
    if seen == 0:
        raise AdapterCheckError(path, "adapter_model.safetensors holds no tensors")


def _check_tensor(path: Path, name: str, view: Any, rank: int, targets: set[str], shape: ModelShape | None) -> None:
    dtype = str(view.get_dtype())
    if dtype not in ALLOWED_DTYPES:
        raise AdapterCheckError(path, f"tensor {name} has dtype {dtype}; expected one of {sorted(ALLOWED_DTYPES)}")
    match = _TENSOR_NAME.search(name)
    if match is None:
        raise AdapterCheckError(path, f"tensor {name} is not a LoRA weight of a decoder layer's projection "
                                "or of lm_head")
    layer = int(match.group(1)) if match.group(1) is not None else None
    module, side = match.group(2) or match.group(3), match.group(4)
    if (layer is None) != (module in UNEMBED_MODULES):
        raise AdapterCheckError(path, f"tensor {name}: {module} is not where this model has it")
    if targets and module not in targets:
        raise AdapterCheckError(path, f"tensor {name} is for {module}, which target_modules does not list")
    dims = tuple(view.get_shape())
    if shape is None:
        return
    if layer is not None and layer >= shape.num_layers:
        raise AdapterCheckError(path, f"tensor {name} is for layer {layer}; the model has {shape.num_layers}")
    if module not in shape.features:
        raise AdapterCheckError(path, f"tensor {name}: {module} is not a LoRA-served module of this model")
    fan_in, fan_out = shape.features[module]
    want = (rank, fan_in) if side == "A" else (fan_out, rank)
    if dims != want:
        raise AdapterCheckError(path, f"tensor {name} has shape {list(dims)}; this model and r={rank} need {list(want)}")


def _imports() -> None:
    """Run once in each checker process as it starts, so the first check does not pay for them."""
    import safetensors  # noqa: F401
    import torch  # noqa: F401


class AdapterChecker:
    """Runs :func:`check_adapter` in processes of its own.

    The check reads every tensor and sums it; for an 8B rank-32 adapter (160 MB) that is tens of ms,
    much of it with the interpreter lock held (safetensors copies each tensor out of its mapping with
    it). In the server's process that lock is also the one every tenant's token stream goes through:
    on the H200 (8B, 8 tenants each syncing once a second) the check was 52 % of the server process's
    py-spy samples (``bench/results/h200-2026-12-02/profiles``). ``processes=0``: a thread of the
    caller's process (the old way, and where spawning is not wanted)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        if processes > 0:
            self._pool = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        # spawn, not fork: the server's process runs threads (Ray's, uvicorn's, the engine client's)
        return concurrent.futures.ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_imports)

    async def check(self, path: Path, shape: ModelShape | None, max_rank: int | None) -> None:
        """Raises AdapterCheckError as :func:`check_adapter` does."""
        if self._pool is None:
            await asyncio.to_thread(check_adapter, path, shape, max_rank)
            return
        try:
            await asyncio.wrap_future(self._pool.submit(check_adapter, path, shape, max_rank))
        except concurrent.futures.process.BrokenProcessPool:  # a checker died (killed, out of memory)
            logger.warning("an adapter checker process died; starting new ones and checking %s here", path)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()
            await asyncio.to_thread(check_adapter, path, shape, max_rank)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
