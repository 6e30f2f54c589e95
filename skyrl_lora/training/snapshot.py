"""A tenant's whole training state as flat tensors: what the cache tiers, checkpoints and restarts move.

Keys are ``w/`` (adapter weights), ``m/`` and ``v/`` (AdamW moments), ``t/`` (AdamW step counts) and
``g/`` (gradients accumulated by forward_backward but not yet applied), each followed by the adapter's
canonical parameter name. One safetensors file holds it all, so a copy is bit-identical by construction.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import LoraSpec

FORMAT = "skyrl_lora.tenant_state/1"
KINDS = ("w", "m", "v", "t", "g")


@dataclass
class TenantSnapshot:
    spec: LoraSpec
    step: int
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def has_grads(self) -> bool:
        return any(k.startswith("g/") for k in self.tensors)

    def part(self, kind: str) -> dict[str, torch.Tensor]:
        prefix = kind + "/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def weights_only(self) -> TenantSnapshot:
        return TenantSnapshot(self.spec, self.step, {k: v for k, v in self.tensors.items() if k.startswith("w/")})


def write_snapshot(snap: TenantSnapshot, path: Path, extra_metadata: dict[str, str] | None = None) -> int:
    """Atomically write ``snap`` to ``path``; returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "spec": snap.spec.model_dump_json(), "step": str(snap.step), **(extra_metadata or {})}
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
        tensors = load_file(str(path))
    except SkyrlError:
        raise
    except FileNotFoundError as exc:
        raise SkyrlError(404, f"path: no saved state at '{path.name}'", "path") from exc
    except Exception as exc:  # a truncated or foreign file: refuse it, name it
        raise SkyrlError(400, f"path: unreadable tenant state '{path.name}': {exc}", "path") from exc
    if pin and torch.cuda.is_available():
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return TenantSnapshot(spec, int(meta.get("step", "0")), tensors)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def spec_of(meta: dict[str, str]) -> LoraSpec:
    return LoraSpec.model_validate(json.loads(meta["spec"]))
