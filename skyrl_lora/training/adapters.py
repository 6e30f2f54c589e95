"""Adapter slots: peft adapters living in the one shared model, each with its own AdamW.

A slot holds one tenant at a time. Its LoRA parameters, both AdamW moments and the gradients are
views into four flat fp32 buffers, so switching tenants of the same shape (rank, alpha, target
modules) into a slot is four large copies with no module surgery; a slot of another shape is deleted
and a new peft adapter injected. Parameter names are kept in peft's saved-adapter form
(``...q_proj.lora_A.weight``), which is also what vLLM loads.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from skyrl_lora.errors import SkyrlError
from skyrl_lora.lora_targets import SERVED_MODULES
from skyrl_lora.training.pinned import PinnedPool
from skyrl_lora.training.protocol import LoraSpec
from skyrl_lora.training.snapshot import Layout, TenantSnapshot

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass(eq=False)
class Slot:
    name: str  # the peft adapter name
    spec: LoraSpec
    params: dict[str, nn.Parameter]  # canonical name -> parameter (a view of ``flat["w"]``), buffer order
    layout: Layout
    flat: dict[str, torch.Tensor]  # "w", "m", "v", "g": one fp32 buffer each
    steps: list[torch.Tensor]  # AdamW's per-parameter step counters (always equal)
    optimizer: torch.optim.AdamW
    tenant: str | None = None
    has_grads: bool = False
    nbytes: int = 0


def canonical(param_name: str, adapter: str) -> str:
    return param_name.replace(f".{adapter}.", ".")


class AdapterSlots:
    """Owns the PeftModel wrapped around the frozen base; creates, recycles and removes slots."""

    def __init__(self, base: nn.Module, device: torch.device) -> None:
        self.base = base
        self.device = device
        self.pool = PinnedPool(enabled=device.type == "cuda")
        self.model: PeftModel | None = None  # made with the first slot
        self._names = (f"slot{i}" for i in itertools.count())
        self.active: str | None = None
        self._layers: list[BaseTunerLayer] = []  # peft's LoRA layers, for switching the active adapter cheaply
        self._shapes: dict[str, list[tuple[int, int]]] = {}
        for name, module in base.named_modules():
            if isinstance(module, nn.Linear):
                self._shapes.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))

    # ------------------------------------------------------------------ sizes
    def check_targets(self, spec: LoraSpec) -> None:
        missing = [m for m in spec.target_modules if m not in self._shapes]
        if missing:
            raise SkyrlError(400, f"target_modules: {missing} are not linear layers of the base model "
                                  f"(it has {sorted(self._shapes)})", "target_modules")
        unserved = sorted(set(spec.target_modules) - set(SERVED_MODULES))
        if unserved:  # the servers could not load such an adapter: refuse it before any training
            raise SkyrlError(400, f"target_modules: {unserved} cannot be served with LoRA; choose from "
                                  f"{list(SERVED_MODULES)}", "target_modules")

    def numel(self, spec: LoraSpec) -> int:
        return sum(spec.rank * (i + o) for m in spec.target_modules for i, o in self._shapes.get(m, []))

    def slot_bytes(self, spec: LoraSpec) -> int:
        """Upper bound of a tenant's state: fp32 weights, exp_avg, exp_avg_sq, grads, and its step count."""
        return 4 * 4 * self.numel(spec) + 4

    # ------------------------------------------------------------------ slots
    def add(self, spec: LoraSpec) -> Slot:
        from peft import LoraConfig, get_peft_model

        name = next(self._names)
        # peft annotates lora_alpha as int, but takes (and scales by) a float
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha,  # type: ignore[arg-type]
                            target_modules=list(spec.target_modules),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        if self.model is None:
            self.model = get_peft_model(self.base, config, adapter_name=name)
        else:
            self.model.add_adapter(name, config)
        params = dict(sorted((canonical(n, name), p) for n, p in self.model.named_parameters() if f".{name}." in n))
        total = sum(p.numel() for p in params.values())
        flat = {k: torch.zeros(total, dtype=torch.float32, device=self.device) for k in ("w", "m", "v", "g")}
        optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
        steps: list[torch.Tensor] = []
        offset = 0
        for p in params.values():  # re-home every parameter, moment and gradient into the flat buffers
            n = p.numel()
            p.data = flat["w"][offset: offset + n].view(p.shape)
            p.grad = flat["g"][offset: offset + n].view(p.shape)
            # AdamW's per-parameter state filled as views of the flat buffers, so a tenant's moments move
            # with its weights in one copy (torch >= 2.1 keeps exactly these keys for AdamW without
            # amsgrad; load_state_dict would copy them out of the buffers instead)
            step = torch.zeros((), dtype=torch.float32)  # where and how AdamW keeps it (not capturable)
            optimizer.state[p] = {"step": step, "exp_avg": flat["m"][offset: offset + n].view(p.shape),
                                  "exp_avg_sq": flat["v"][offset: offset + n].view(p.shape)}
            steps.append(step)
            offset += n
        layout = tuple((k, tuple(p.shape)) for k, p in params.items())
        self._refresh_layers()
        return Slot(name, spec, params, layout, flat, steps, optimizer, nbytes=self.slot_bytes(spec))

    def remove(self, slot: Slot) -> None:
        assert self.model is not None
        if len(self.model.peft_config) == 1:
            raise RuntimeError("the last slot is recycled, never removed")
        with warnings.catch_warnings():  # peft warns when the deleted adapter was the active one; we re-activate
            warnings.simplefilter("ignore", UserWarning)
            self.model.delete_adapter(slot.name)
        slot.params.clear()
        slot.flat.clear()
        slot.optimizer.state.clear()
        self._refresh_layers()

    def activate(self, slot: Slot) -> None:
        """Make ``slot`` the adapter the model runs with and the only one that takes gradients.

        peft's ``set_adapter`` walks the module tree once per LoRA layer (quadratic: ~30 ms a switch on
        a 24-layer model, 7 % of a training step); pointing each cached LoRA layer at the slot is the
        same state change in O(layers). Other slots' parameters are not in the forward pass, so they
        get no gradients even though they keep ``requires_grad``.
        """
        assert self.model is not None
        if self.active == slot.name:
            return
        if all(hasattr(layer, "_active_adapter") for layer in self._layers):
            for layer in self._layers:
                layer._active_adapter = slot.name
            # peft types base_model as the wrapped nn.Module; it is the LoraModel, whose active_adapter is a str
            self.model.base_model.active_adapter = slot.name  # type: ignore[assignment]
        else:  # a peft without the attribute: take the slow, public path
            self.model.set_adapter(slot.name)
        for p in slot.params.values():
            p.requires_grad_(True)
        self.active = slot.name

    def _refresh_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)] if self.model is not None else []
        self.active = None

    # ------------------------------------------------------------------ state moves
    @torch.no_grad()
    def initialise(self, slot: Slot, tenant: str, spec: LoraSpec) -> None:
        """A new tenant: lora_A from the tenant's seed (as peft does, Kaiming-uniform), lora_B zero."""
        gen = torch.Generator().manual_seed(spec.seed)
        for key, p in slot.params.items():
            if ".lora_A." in key:
                init = torch.empty(p.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=gen)
                p.copy_(init)
            else:
                p.zero_()
        for k in ("m", "v", "g"):
            slot.flat[k].zero_()
        self._set_steps(slot, 0.0)
        slot.has_grads = False
        slot.tenant = tenant
        slot.spec = spec

    @torch.no_grad()
    def restore(self, slot: Slot, tenant: str, snap: TenantSnapshot) -> None:
        if snap.layout != slot.layout:
            raise SkyrlError(400, f"path: saved adapter does not match rank/targets {snap.spec.signature}", "path")
        for k in ("w", "m", "v", "g"):
            src = snap.tensors.get(k)
            if src is None:
                slot.flat[k].zero_()
            else:
                slot.flat[k].copy_(src, non_blocking=True)
        self._set_steps(slot, float(snap.tensors["t"][0]) if "t" in snap.tensors else 0.0)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        slot.has_grads = snap.has_grads
        slot.tenant = tenant
        slot.spec = snap.spec

    @torch.no_grad()
    def snapshot(self, slot: Slot, step: int, *, with_optimizer: bool = True, with_grads: bool = True) -> TenantSnapshot:
        pin = self.device.type == "cuda"
        kinds = ["w"] + (["m", "v"] if with_optimizer else []) + (["g"] if with_grads and slot.has_grads else [])
        tensors: dict[str, torch.Tensor] = {}
        for k in kinds:
            out = self.pool.empty(slot.flat[k].shape, torch.float32)
            out.copy_(slot.flat[k], non_blocking=pin)
            tensors[k] = out
        if with_optimizer:
            tensors["t"] = slot.steps[0].detach().to("cpu", copy=True).reshape(1) if slot.steps else torch.zeros(1)
        if pin:
            torch.cuda.current_stream(self.device).synchronize()
        return TenantSnapshot(slot.spec, step, slot.layout, tensors)

    @staticmethod
    def _set_steps(slot: Slot, value: float) -> None:
        for t in slot.steps:
            t.fill_(value)
