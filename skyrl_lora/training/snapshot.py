"""A tenant's whole training state as a few flat tensors: what the cache tiers, checkpoints and restarts move.

A slot keeps every LoRA parameter of a tenant as a view into one flat fp32 buffer, and likewise both
AdamW moments and the gradients, so a tenant is four contiguous tensors (``w``, ``m``, ``v``, ``g``)
plus the AdamW step count ``t`` and a layout (parameter names and shapes, in buffer order). Moving a
tenant is then four large copies instead of thousands of small ones, and a copy is bit-identical by
construction. One safetensors file holds it all (layout and spec in its metadata).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import LoraSpec

FORMAT = "skyrl_lora.tenant_state/2"
Layout = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass
class TenantSnapshot:
    spec: LoraSpec
    step: int
    layout: Layout
    tensors: dict[str, torch.Tensor]  # "w" always; "m", "v", "t" with optimizer state; "g" with pending grads

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def has_grads(self) -> bool:
        return "g" in self.tensors

    @property
    def has_optimizer(self) -> bool:
        return "m" in self.tensors

    def part(self, kind: str) -> dict[str, torch.Tensor]:
        """Per-parameter views of one flat buffer (``w``, ``m``, ``v`` or ``g``); empty if absent."""
        flat = self.tensors.get(kind)
        if flat is None:
            return {}
        out, offset = {}, 0
        for name, shape in self.layout:
            n = 1
            for d in shape:
                n *= d
            out[name] = flat[offset: offset + n].view(shape)
            offset += n
        return out

    def weights_only(self) -> TenantSnapshot:
        return TenantSnapshot(self.spec, self.step, self.layout, {"w": self.tensors["w"]})


def write_snapshot(snap: TenantSnapshot, path: Path, extra_metadata: dict[str, str] | None = None) -> int:
    """Atomically write ``snap`` to ``path``; returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "spec": snap.spec.model_dump_json(), "step": str(snap.step),
            "layout": json.dumps([[n, list(s)] for n, s in snap.layout]), **(extra_metadata or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in snap.tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def read_snapshot(path: Path, *, pin: bool = False) -> TenantSnapshot:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise SkyrlError(400, f"path: '{path.name}' is not a skyrl_lora tenant state", "path")
        spec = LoraSpec.model_validate_json(meta["spec"])
        layout = tuple((str(n), tuple(int(d) for d in s)) for n, s in json.loads(meta["layout"]))
        tensors = load_file(str(path))
    except SkyrlError:
        raise
    except FileNotFoundError as exc:
        raise SkyrlError(404, f"path: no saved state at '{path.name}'", "path") from exc
    except Exception as exc:  # a truncated or foreign file: refuse it, name it
        raise SkyrlError(400, f"path: unreadable tenant state '{path.name}': {exc}", "path") from exc
    if pin and torch.cuda.is_available():
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return TenantSnapshot(spec, int(meta.get("step", "0")), layout, tensors)
