"""A trainer whose frozen base model *is* the inference server's weights: views, not a copy.

On one GPU a trainer with its own base is a second copy (16 GB at 8B, 64 GB at 32B). Here the
server's worker hands out CUDA IPC handles of its parameters once (``vllm_compat``), the trainer maps
them and builds the HF model on views of them: vLLM's fused ``qkv_proj`` / ``gate_up_proj`` rows are
the HF projections one after another, so each projection is a row range of the fused tensor. The
base is frozen and never written (``checksum`` proves it in the tests); only LoRA parameters train.

Where this cannot apply (CPU, another GPU, a layout with no clean view) the caller falls back to its
own copy or refuses, as configured (``TrainerConfig.base_weights``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skyrl_lora.inference.vllm_compat import FUSED_PROJECTIONS, PADDED_VOCAB_PARAMS, SHAREABLE_ARCHITECTURES

logger = logging.getLogger(__name__)


class SharingImpossible(Exception):
    """The base weights cannot be shared here; the message says why."""


def check_shareable(config: Any) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or archs[0] not in SHAREABLE_ARCHITECTURES:
        raise SharingImpossible(f"architecture {archs or '?'} has no known view onto vLLM's layout "
                                f"(supported: {sorted(SHAREABLE_ARCHITECTURES)})")
    if getattr(config, "quantization_config", None):
        raise SharingImpossible("a quantized checkpoint's vLLM weights are not the HF parameters")


def _fused_rows(config: Any) -> dict[str, tuple[int, ...]]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    return {"qkv_proj": (q, kv, kv), "gate_up_proj": (config.intermediate_size, config.intermediate_size)}


def hf_views(vllm_params: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """HF parameter name -> a view into one of vLLM's parameters (no copies)."""
    rows = _fused_rows(config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in vllm_params.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if module in FUSED_PROJECTIONS:
            parts, sizes = FUSED_PROJECTIONS[module], rows[module]
            if tensor.shape[0] != sum(sizes):
                raise SharingImpossible(f"{name} has {tensor.shape[0]} rows, not {sum(sizes)} ({' + '.join(map(str, sizes))})")
            start = 0
            for part, size in zip(parts, sizes):
                out[name.replace(f".{module}.", f".{part}.")] = tensor[start:start + size]
                start += size
        elif name.endswith(PADDED_VOCAB_PARAMS):
            out[name] = tensor[: config.vocab_size]
        else:
            out[name] = tensor
    return out


def vllm_layout(hf_state: Mapping[str, torch.Tensor], config: Any, pad_vocab_to: int = 64) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_views`: HF tensors laid out as vLLM holds them (fused, vocab padded).
    What the CPU tests build a "server's weights" from, where no CUDA memory can be shared."""
    out: dict[str, torch.Tensor] = {}
    fused_of = {part: (fused, i) for fused, parts in FUSED_PROJECTIONS.items() for i, part in enumerate(parts)}
    pending: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in hf_state.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if module in fused_of:
            fused, i = fused_of[module]
            key = name.replace(f".{module}.", f".{fused}.")
            pending.setdefault(key, [None] * len(FUSED_PROJECTIONS[fused]))[i] = tensor
        elif name.endswith(PADDED_VOCAB_PARAMS):
            pad = (-tensor.shape[0]) % pad_vocab_to
            out[name] = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])]) if pad else tensor.clone()
        else:
            out[name] = tensor.clone()
    for key, parts in pending.items():
        if any(p is None for p in parts):
            raise SharingImpossible(f"{key}: not every part of the fused projection is there")
        out[key] = torch.cat(parts)  # type: ignore[arg-type]
    return out


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers computed at init (rotary inverse frequencies) were made on the meta device: make them again."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)):
                if not type(child).__name__.endswith("RotaryEmbedding"):
                    raise SharingImpossible(f"{parent_name}.{child_name}: buffers with no known way to rebuild them")
                with torch.device(device):  # (older transformers took a device argument, newer ones don't)
                    setattr(parent, child_name, type(child)(config=model.config))


def model_on_views(config: Any, views: Mapping[str, torch.Tensor]) -> nn.Module:
    """The HF model of ``config`` (the base model's, already read for :func:`hf_views`) whose
    parameters are ``views``: frozen, never copied, in the server's dtype."""
    from transformers import AutoModelForCausalLM

    check_shareable(config)
    dtypes = {t.dtype for t in views.values()}
    if len(dtypes) != 1:
        raise SharingImpossible(f"the server's weights mix dtypes {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    state = dict(views)
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))  # type: ignore[arg-type]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SharingImpossible(f"the server has no parameters for {missing[:4]} ({len(missing)} in all)")
    extra = sorted(set(state) - set(expected))
    if extra:  # the server's own additions (none on the supported architectures); not the HF model's
        logger.info("server parameters the trainer does not use: %s", extra[:8])
        state = {k: v for k, v in state.items() if k in expected}
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != dtype:
            raise SharingImpossible(f"{name}: the server holds {tuple(got.shape)} {got.dtype}, the trainer needs "
                                    f"{tuple(want.shape)} {dtype}")
    model.load_state_dict(state, assign=True, strict=True)
    device = next(iter(views.values())).device
    _rebuild_meta_buffers(model, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class BaseViews:
    """The frozen parameters of a model built on views (HF names, as ``named_parameters()`` gave them
    then), with the shape and dtype each was built with: what moves the model onto *another* mapping
    of the server's weights (a restarted server's), its tenants' LoRA slots and optimizer states
    untouched."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.shapes = {name: (tuple(p.shape), p.dtype) for name, p in self.params.items()}

    def rebind(self, views: Mapping[str, torch.Tensor]) -> None:
        """Point each parameter at its view in ``views``. All are checked before any moves, so a
        mismatch leaves the model as it was."""
        for name, (shape, dtype) in self.shapes.items():
            view = views.get(name)
            if view is None:
                raise SharingImpossible(f"the server has no parameter for {name} any more")
            if tuple(view.shape) != shape or view.dtype != dtype:
                raise SharingImpossible(f"{name}: the server now holds {tuple(view.shape)} {view.dtype}, the model "
                                        f"was built on {shape} {dtype}")
        for name, param in self.params.items():
            param.data = views[name]

    def detach(self) -> None:
        """Let go of the server's memory: each parameter holds an empty tensor of its own instead of a
        view (a step before :meth:`rebind` fails on the shapes, never reads freed memory)."""
        for param in self.params.values():
            param.data = param.data.new_empty(0)


def checksum(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """An exact fingerprint of each tensor's bits (words summed as integers): equal before and after
    training means nothing wrote to the shared base."""
    out: dict[str, int] = {}
    for name, t in tensors.items():
        words = t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)
        out[name] = int(words.to(torch.int64).sum().item())
    return out


@dataclass
class SharedBase:
    """What the trainer keeps of the server's weights: the mapped tensors (vLLM names) and their views."""

    server_tensors: dict[str, torch.Tensor]
    device_uuid: str
    architecture: str
    incarnation: str | None = None  # which run of the server actor mapped these (a restart makes another)


def open_shared_weights(path: str | Path) -> SharedBase:
    """Map the handles a server wrote (``vllm_compat.worker.LoraStagingWorkerExtension.skyrl_share_weights``).
    Must run in another process than the server's worker, on the same GPU."""
    if not torch.cuda.is_available():
        raise SharingImpossible("no CUDA device in the trainer's process")
    with open(path, "rb") as f:
        info = pickle.load(f)  # written by our own worker extension, on this node
    here = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    if info["device_uuid"] != here:
        raise SharingImpossible(f"the server's weights are on GPU {info['device_uuid']}, the trainer is on {here}")
    tensors = {}
    for name, ((rebuild, args), shape, _dtype) in info["params"].items():
        tensor = rebuild(*args)
        if tuple(tensor.shape) != tuple(shape):
            raise SharingImpossible(f"{name}: mapped {tuple(tensor.shape)}, expected {tuple(shape)}")
        tensors[name] = tensor
    return SharedBase(tensors, info["device_uuid"], info.get("architecture", "?"))


def map_server_weights(server_name: str, timeout_s: float = 300.0) -> SharedBase:
    """Ask the named inference server actor for its weights' handles and map them here."""
    import tempfile

    import ray

    if not torch.cuda.is_available():
        raise SharingImpossible("the trainer has no CUDA device (a CPU vLLM keeps its weights in its own process)")
    try:
        server = ray.get_actor(server_name)
    except ValueError as exc:
        raise SharingImpossible(f"no inference server actor named '{server_name}'") from exc
    with tempfile.TemporaryDirectory(prefix="skyrl-share-") as tmp:
        path = str(Path(tmp) / "handles.pkl")
        try:
            info: Any = ray.get(server.share_base_weights.remote(path), timeout=timeout_s)  # the actor's dict
        except Exception as exc:  # the server's SkyrlError, wrapped by Ray: its text says why
            cause = getattr(exc, "cause", None) or exc
            raise SharingImpossible(f"the server '{server_name}' did not share its weights: {cause}") from exc
        if not info.get("incarnation"):
            raise SharingImpossible(f"the server '{server_name}' did not say which run of it shares its weights")
        shared = open_shared_weights(path)
        shared.incarnation = str(info["incarnation"])
        return shared
