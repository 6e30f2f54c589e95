"""Adapter slots: peft adapters living in the one shared model, each with its own AdamW.

A slot holds one tenant at a time. Switching tenants of the same shape (rank, alpha, target modules)
into a slot is a copy of tensors into existing parameters and optimizer state, with no module
surgery; a slot of another shape is deleted and a new peft adapter injected. Parameter names are kept
in peft's saved-adapter form (``...q_proj.lora_A.weight``), which is also what vLLM loads.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.pinned import PinnedPool
from skyrl_lora.training.protocol import LoraSpec
from skyrl_lora.training.snapshot import TenantSnapshot


@dataclass(eq=False)
class Slot:
    name: str  # the peft adapter name
    spec: LoraSpec
    params: dict[str, nn.Parameter]  # canonical name -> parameter, sorted by name
    optimizer: torch.optim.AdamW
    tenant: str | None = None
    nbytes: int = 0  # weights + two moments + gradients
    touched: set[str] = field(default_factory=set)


def canonical(param_name: str, adapter: str) -> str:
    return param_name.replace(f".{adapter}.", ".")


class AdapterSlots:
    """Owns the PeftModel wrapped around the frozen base; creates, recycles and removes slots."""

    def __init__(self, base: nn.Module, device: torch.device) -> None:
        self.base = base
        self.device = device
        self.pool = PinnedPool(enabled=device.type == "cuda")
        self.model = None  # peft.PeftModel, made with the first slot
        self._names = (f"slot{i}" for i in itertools.count())
        self.active: str | None = None
        leaf_names = {name.rsplit(".", 1)[-1]: module for name, module in base.named_modules() if isinstance(module, nn.Linear)}
        self._linear_names = set(leaf_names)
        self._shapes: dict[str, list[tuple[int, int]]] = {}
        for name, module in base.named_modules():
            if isinstance(module, nn.Linear):
                self._shapes.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))

    # ------------------------------------------------------------------ sizes
    def check_targets(self, spec: LoraSpec) -> None:
        missing = [m for m in spec.target_modules if m not in self._linear_names]
        if missing:
            raise SkyrlError(400, f"target_modules: {missing} are not linear layers of the base model "
                                  f"(it has {sorted(self._linear_names)})", "target_modules")

    def numel(self, spec: LoraSpec) -> int:
        return sum(spec.rank * (i + o) for m in spec.target_modules for i, o in self._shapes.get(m, []))

    def slot_bytes(self, spec: LoraSpec) -> int:
        """Upper bound of a tenant's state: fp32 weights, exp_avg, exp_avg_sq, grads, and a step per tensor."""
        tensors = 2 * sum(len(self._shapes.get(m, [])) for m in spec.target_modules)
        return 4 * 4 * self.numel(spec) + 4 * tensors

    # ------------------------------------------------------------------ slots
    def add(self, spec: LoraSpec) -> Slot:
        from peft import LoraConfig, get_peft_model

        name = next(self._names)
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        if self.model is None:
            self.model = get_peft_model(self.base, config, adapter_name=name)
        else:
            self.model.add_adapter(name, config)
        params = {canonical(n, name): p for n, p in self.model.named_parameters() if f".{name}." in n}
        for p in params.values():  # adapters train in fp32 whatever the base dtype
            p.data = p.data.to(device=self.device, dtype=torch.float32)
        params = dict(sorted(params.items()))
        optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
        self.active = None
        return Slot(name, spec, params, optimizer, nbytes=self.slot_bytes(spec))

    def remove(self, slot: Slot) -> None:
        assert self.model is not None
        if len(self.model.peft_config) == 1:
            raise RuntimeError("the last slot is recycled, never removed")
        with warnings.catch_warnings():  # peft warns when the deleted adapter was the active one; we re-activate
            warnings.simplefilter("ignore", UserWarning)
            self.model.delete_adapter(slot.name)
        slot.params.clear()
        slot.optimizer.state.clear()
        self.active = None

    def activate(self, slot: Slot) -> None:
        """Make ``slot`` the adapter the model runs with and the only one that takes gradients."""
        assert self.model is not None
        if self.active != slot.name:
            self.model.set_adapter(slot.name)
            for p in slot.params.values():
                p.requires_grad_(True)
            self.active = slot.name

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
            p.grad = None
        slot.optimizer.state.clear()
        slot.tenant = tenant
        slot.spec = spec

    @torch.no_grad()
    def restore(self, slot: Slot, tenant: str, snap: TenantSnapshot) -> None:
        weights, m, v, t, g = (snap.part(k) for k in ("w", "m", "v", "t", "g"))
        if set(weights) != set(slot.params):
            raise SkyrlError(400, f"path: saved adapter does not match rank/targets {snap.spec.signature}", "path")
        state = slot.optimizer.state
        for key, p in slot.params.items():
            p.copy_(weights[key], non_blocking=True)
            if key in m:
                old = state.get(p)
                if old and "exp_avg" in old:
                    old["exp_avg"].copy_(m[key], non_blocking=True)
                    old["exp_avg_sq"].copy_(v[key], non_blocking=True)
                    old["step"] = t[key].clone().reshape(())
                else:
                    state[p] = {"step": t[key].clone().reshape(()), "exp_avg": m[key].to(self.device, copy=True),
                                "exp_avg_sq": v[key].to(self.device, copy=True)}
            else:
                state.pop(p, None)
            if key in g:
                if p.grad is None:
                    p.grad = g[key].to(self.device, copy=True)
                else:
                    p.grad.copy_(g[key], non_blocking=True)
            else:
                p.grad = None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        slot.tenant = tenant
        slot.spec = snap.spec

    @torch.no_grad()
    def snapshot(self, slot: Slot, step: int, *, with_optimizer: bool = True, with_grads: bool = True) -> TenantSnapshot:
        tensors: dict[str, torch.Tensor] = {}
        state = slot.optimizer.state
        pin = self.device.type == "cuda"

        def host(x: torch.Tensor) -> torch.Tensor:
            out = self.pool.empty(x.shape, x.dtype)
            out.copy_(x, non_blocking=pin)
            return out

        for key, p in slot.params.items():
            tensors[f"w/{key}"] = host(p)
            st = state.get(p)
            if with_optimizer and st and "exp_avg" in st:
                tensors[f"m/{key}"] = host(st["exp_avg"])
                tensors[f"v/{key}"] = host(st["exp_avg_sq"])
                tensors[f"t/{key}"] = st["step"].detach().to("cpu", copy=True).reshape(1)
            if with_grads and p.grad is not None:
                tensors[f"g/{key}"] = host(p.grad)
        if pin:
            torch.cuda.current_stream(self.device).synchronize()
        return TenantSnapshot(slot.spec, step, tensors)
