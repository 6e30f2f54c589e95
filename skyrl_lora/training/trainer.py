"""The multi-tenant trainer: one frozen base model, many tenants' LoRAs and optimizers, tiered state.

Plain synchronous code, used by one thread at a time (the actor serialises calls and runs them off
its event loop). A tenant must be *resident* (in an adapter slot of the model) to train; making it
resident may evict the least recently used tenant to CPU, and the CPU tier spills to disk.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.protocol import LORA_NAME_PATTERN
from skyrl_lora.inference.slot_builder import BuildPlan
from skyrl_lora.inference.slot_image import FlatWeights, ShareBuffers, share_image, write_image
from skyrl_lora.training.adapters import AdapterSlots, Slot
from skyrl_lora.training.batching import collate
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.distill import distill_datums
from skyrl_lora.training.losses import LossInputs, resolve, token_logprobs
from skyrl_lora.training.metrics import CacheMetrics
from skyrl_lora.training.protocol import (
    AdamParams,
    Datum,
    DistillPayload,
    DistillStepOutput,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    SavedState,
    TenantInfo,
    TierStats,
    TrainerState,
)
from skyrl_lora.training.shared_base import BaseViews, SharedBase, SharingImpossible, hf_views, model_on_views
from skyrl_lora.training.snapshot import TenantSnapshot, read_snapshot, write_snapshot
from skyrl_lora.training.state_cache import HostAndDiskTiers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageExport(NamedTuple):
    """:meth:`MultiTenantTrainer.export_image`'s result: the directory; the weights in the plan's
    dtype, copied (training may go on), for :meth:`MultiTenantTrainer.persist_tensors`; the shared
    image, which the caller keeps until the sync is over; each part's end (``time.monotonic``)."""

    path: Path
    tensors: FlatWeights
    image: torch.Tensor | None
    parts: dict[str, float]


def _hf_config(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    return cast("PretrainedConfig", AutoConfig.from_pretrained(path))


def _check_name(value: str, field: str) -> str:
    if not re.fullmatch(LORA_NAME_PATTERN, value or ""):
        raise SkyrlError(400, f"{field}: '{value}' must match {LORA_NAME_PATTERN}", field)
    return value


class MultiTenantTrainer:
    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        want = config.device
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if want == "auto" else want)
        self.dtype = _DTYPES.get(config.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.metrics = CacheMetrics()
        self.model: torch.nn.Module | None = None
        self.slots: AdapterSlots | None = None
        self.vocab_size = 0
        self.specs: dict[str, LoraSpec] = {}
        self.steps: dict[str, int] = {}
        self.resident: OrderedDict[str, Slot] = OrderedDict()
        self.free: list[Slot] = []
        self._pending_elsewhere: dict[str, bool] = {}  # has an evicted tenant unapplied gradients?
        self.tiers = HostAndDiskTiers(config.cpu_budget_bytes, config.disk_budget_bytes, config.disk_tier_dir, self.metrics)
        self._load_lock = threading.Lock()
        self.loads = 0  # how many times the base model was loaded (once, however many first callers)
        # where a shared base comes from (config.base_weights): the actor maps the server's GPU weights
        self.weights_source: Callable[[], SharedBase] | None = None
        self.shared: SharedBase | None = None
        self._base_views: BaseViews | None = None  # the base's parameters, views of `shared`
        self.share_buffers = ShareBuffers()  # images left on the GPU for the one server to copy (export_image)
        self.copy_buffers = ShareBuffers()  # their weights, copied for the durable copy (persist_tensors)
        self._adapter_configs: dict[LoraSpec, bytes] = {}  # adapter_config.json per adapter shape
        self._export_profiles: tuple[Path, int] | None = None  # where, and how many exports left (profile_exports)

    # ------------------------------------------------------------------ base model
    def load(self) -> None:
        """Load the base model once; concurrent first callers wait for the one load."""
        with self._load_lock:
            if self.model is not None:
                return
            from transformers import AutoModelForCausalLM

            if self.config.num_threads:
                torch.set_num_threads(self.config.num_threads)
            path = Path(self.config.base_model)
            if not (path / "config.json").is_file():
                raise SkyrlError(400, f"base_model: no HF model at '{path}' (config.json missing)", "base_model")
            t0 = time.perf_counter()
            # a transformers PreTrainedModel: its config (read below) is untyped
            model: Any = self._shared_model(path) if self.config.base_weights != "own" else None
            if model is None:
                loaded = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
                # transformers wraps PreTrainedModel.to with functools.wraps, which mypy reads as unbound
                model = loaded.to(self.device)  # type: ignore[arg-type]
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.vocab_size = int(model.config.vocab_size)
            self.slots = AdapterSlots(model, self.device)
            self.model = model
            self.loads += 1
            logger.info("base model %s loaded on %s (%s) in %.1f s", path, self.device, self.dtype, time.perf_counter() - t0)

    def _shared_model(self, path: Path) -> torch.nn.Module | None:
        """The base built on the server's weights, or None (fall back to a copy) where that is
        impossible and the config allows it; a 409 naming ``base_weights`` where it does not."""
        try:
            if self.weights_source is None:
                raise SharingImpossible("no inference server to share weights with (share_from)")
            shared = self.weights_source()
            config = _hf_config(path)
            model = model_on_views(config, hf_views(shared.server_tensors, config))
        except SharingImpossible as exc:
            if self.config.base_weights == "shared":
                raise SkyrlError(409, f"base_weights: 'shared' is impossible here: {exc}", "base_weights") from exc
            logger.warning("base_weights=shared_or_own: loading a copy of the base model, because %s", exc)
            return None
        self.shared = shared
        self._base_views = BaseViews(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        logger.info("base model on %d shared tensors of the inference server (%s, %s): no copy",
                    len(shared.server_tensors), shared.architecture, self.dtype)
        return model

    def release_shared_base(self) -> None:
        """The server whose weights the base is built on died (its restart loads them anew, elsewhere):
        let go of its memory at once, so the old weights are not kept alive beside the new ones, and
        take no step until :meth:`reshare_base`. Tenants' slots and optimizer states stay."""
        if self.shared is None or self._base_views is None:
            return
        self._base_views.detach()
        self.shared = None
        gc.collect()  # the mapped storages go with their last reference; their IPC handles are closed

    def reshare_base(self) -> SharedBase:
        """Build the base on the (restarted) server's weights again: the same model and slots, each
        frozen parameter a view of the new mapping (``BaseViews.rebind``)."""
        if self._base_views is None or self.weights_source is None:
            raise SkyrlError(409, "base_weights: this trainer's base is its own copy; there is nothing to share "
                                  "again", "base_weights")
        self.release_shared_base()
        t0 = time.perf_counter()
        try:
            shared = self.weights_source()
            self._base_views.rebind(hf_views(shared.server_tensors, _hf_config(Path(self.config.base_model))))
        except SharingImpossible as exc:
            raise SkyrlError(503, f"base_weights: the inference server's weights cannot be shared again yet: {exc}",
                             "base_weights") from exc
        self.shared = shared
        logger.info("base model on the inference server's weights again (%s, %d tensors) in %.2f s",
                    shared.incarnation, len(shared.server_tensors), time.perf_counter() - t0)
        return shared

    # ------------------------------------------------------------------ tenants
    def create_lora(self, tenant: str, spec: LoraSpec) -> TenantInfo:
        self.load()
        _check_name(tenant, "tenant")
        if tenant in self.specs:
            raise SkyrlError(409, f"tenant: '{tenant}' already has a LoRA; delete it first", "tenant")
        if spec.rank > self.config.max_lora_rank:
            raise SkyrlError(400, f"rank: {spec.rank} exceeds the inference servers' max LoRA rank "
                                  f"{self.config.max_lora_rank}", "rank")
        assert self.slots is not None
        self.slots.check_targets(spec)
        need = self.slots.slot_bytes(spec)
        if not self.tiers.can_admit(need, max(0, self.config.resident_budget_bytes - self._resident_bytes())):
            raise SkyrlError(507, "tenant: no room for another tenant in the state cache budgets", "tenant")
        slot = self._slot_for(spec)
        self.slots.initialise(slot, tenant, spec)
        self.resident[tenant] = slot
        self.specs[tenant] = spec
        self.steps[tenant] = 0
        self._publish()
        return self.info(tenant)

    def delete_lora(self, tenant: str) -> None:
        self._spec(tenant)
        slot = self.resident.pop(tenant, None)
        if slot is not None:
            for buffer in slot.flat.values():
                buffer.zero_()
            slot.has_grads = False
            slot.tenant = None
            self.free.append(slot)
        self.tiers.drop(tenant)
        del self.specs[tenant], self.steps[tenant]
        self._pending_elsewhere.pop(tenant, None)
        shutil.rmtree(self.config.sampler_root / tenant, ignore_errors=True)
        self._publish()

    def tenants(self) -> list[str]:
        return sorted(self.specs)

    def info(self, tenant: str) -> TenantInfo:
        spec = self._spec(tenant)
        tier: str | None
        if tenant in self.resident:
            slot = self.resident[tenant]
            tier, nbytes = "resident", slot.nbytes
            pending = slot.has_grads
        else:
            tier, nbytes = self.tiers.tier_of(tenant), self.tiers.size_of(tenant)
            pending = self._pending_elsewhere.get(tenant, False)
        return TenantInfo(tenant=tenant, spec=spec, step=self.steps[tenant], tier=tier, nbytes=nbytes,
                          has_pending_grads=pending)

    def state(self) -> TrainerState:
        tiers = [TierStats(tier="resident", tenants=len(self.resident), nbytes=self._resident_bytes(),
                           budget_bytes=self.config.resident_budget_bytes),
                 TierStats(tier="cpu", tenants=self.tiers.count("cpu"), nbytes=self.tiers.nbytes("cpu"),
                           budget_bytes=self.config.cpu_budget_bytes),
                 TierStats(tier="disk", tenants=self.tiers.count("disk"), nbytes=self.tiers.nbytes("disk"),
                           budget_bytes=self.config.disk_budget_bytes)]
        return TrainerState(base_model=self.config.base_model, device=str(self.device), loaded=self.model is not None,
                            tenants=[self.info(t) for t in self.tenants()], tiers=tiers)

    # ------------------------------------------------------------------ training
    def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        return self._run(tenant, data, loss_fn, loss_fn_config or {}, backward=False)

    def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        return self._run(tenant, data, loss_fn, loss_fn_config or {}, backward=True)

    def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput:
        slot = self._activate(tenant)
        if not slot.has_grads:
            raise SkyrlError(409, f"tenant: '{tenant}' has no accumulated gradients; call forward_backward first", "tenant")
        grads = slot.flat["g"]
        norm = float(torch.linalg.vector_norm(grads))
        if not math.isfinite(norm):
            grads.zero_()
            slot.has_grads = False
            raise SkyrlError(422, f"tenant: gradient norm is {norm}; the step was skipped and the gradients dropped", "tenant")
        if adam.grad_clip_norm > 0:  # torch's clip_grad_norm_ rule, on the one flat buffer
            grads.mul_(min(1.0, adam.grad_clip_norm / (norm + 1e-6)))
        group = slot.optimizer.param_groups[0]
        group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay)
        slot.optimizer.step()
        grads.zero_()
        slot.has_grads = False
        self.steps[tenant] += 1
        return OptimStepOutput(metrics={"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate},
                               step=self.steps[tenant])

    def distill_step(self, payload: DistillPayload) -> DistillStepOutput:
        s = payload.settings
        if payload.lora_id not in self.specs:
            self.create_lora(payload.lora_id, LoraSpec(rank=s.rank, alpha=s.alpha))
        elif self.specs[payload.lora_id].alpha != s.alpha:
            raise SkyrlError(409, f"settings.alpha: tenant '{payload.lora_id}' was created with alpha "
                                  f"{self.specs[payload.lora_id].alpha}, not {s.alpha}", "settings.alpha")
        data = distill_datums(payload, self.vocab_size)
        fb = self.forward_backward(payload.lora_id, data, "distill", {"kl_weight": s.kl_weight, "clip": s.clip})
        opt = self.optim_step(payload.lora_id, AdamParams(learning_rate=s.lr, grad_clip_norm=s.max_grad_norm))
        return DistillStepOutput(forward_backward=fb, optim=opt)

    # ------------------------------------------------------------------ state on disk
    def save_state(self, tenant: str, name: str) -> SavedState:
        _check_name(name, "name")
        slot = self._activate(tenant)
        assert self.slots is not None
        snap = self.slots.snapshot(slot, self.steps[tenant], with_grads=False)
        path = self.config.checkpoint_dir / tenant / f"{name}.safetensors"
        nbytes = write_snapshot(snap, path, {"tenant": tenant})
        return SavedState(tenant=tenant, path=str(path), step=snap.step, nbytes=nbytes)

    def load_state(self, tenant: str, path: str, *, with_optimizer: bool = True) -> TenantInfo:
        """Restore a saved state into ``tenant`` (created if new). Only this trainer's checkpoints load."""
        self.load()
        _check_name(tenant, "tenant")
        real = Path(path).resolve()
        root = self.config.checkpoint_dir.resolve()
        if not real.is_relative_to(root):
            raise SkyrlError(403, f"path: '{path}' is outside this trainer's checkpoints", "path")
        snap = read_snapshot(real)
        if not with_optimizer:
            snap = snap.weights_only()
        if tenant in self.specs and self.specs[tenant].signature != snap.spec.signature:
            self.delete_lora(tenant)
        if tenant not in self.specs:
            self.create_lora(tenant, snap.spec)
        slot = self._activate(tenant)
        assert self.slots is not None
        self.slots.restore(slot, tenant, snap)
        self.specs[tenant] = snap.spec
        self.steps[tenant] = snap.step
        return self.info(tenant)

    def export_for_sampler(self, tenant: str, name: str, root: Path | None = None,
                           dtype: torch.dtype = torch.float32) -> Path:
        """Write the tenant's adapter as a peft directory vLLM loads; each export is a new directory.

        ``root``: where to write it instead of the durable ``sampler_root`` (shared memory, for the
        servers of this node to load at once; :meth:`persist_export` then keeps a durable copy).
        ``dtype``: of the files (``TrainerConfig.sampler_dtype`` for the servers); cast on the
        trainer's device, so only those bytes cross to the host."""
        from safetensors.torch import save_file

        slot = self._activate(tenant)
        tensors = {k: p.detach().to(dtype).to("cpu").contiguous() for k, p in slot.params.items()}
        out = self._new_export(tenant, name, root, lambda d: save_file(tensors, str(d / "adapter_model.safetensors")))
        if (root or self.config.sampler_root) == self.config.sampler_root:
            self._prune_exports(out.parent)
        return out

    def export_image(self, tenant: str, name: str, root: Path, plan: BuildPlan,
                     share_on: str | None = None) -> ImageExport:
        """The tenant's adapter laid out as the servers' slot image (``inference/slot_image.py``):
        nothing for a server to check or build before the flip. ``share_on``: the uuid of this GPU,
        which the one server shares (the colocated trainer): the image stays in GPU memory for the
        server to copy (issue 17's GPU copy); otherwise it is written beside the config. Raises
        ImageUnfit where the plan cannot hold this adapter."""
        with self._export_profiler():
            return self._export_image(tenant, name, root, plan, share_on)

    def profile_exports(self, out_dir: Path, count: int) -> None:
        """Profile the next ``count`` exports with torch's profiler (host and CUDA): a Chrome trace and
        a table of the host's time per operation each, in ``out_dir``. For benchmarks: where a
        publication's export spends its time inside the trainer's process."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self._export_profiles = (out_dir, count) if count > 0 else None

    @contextlib.contextmanager
    def _export_profiler(self) -> Iterator[None]:
        pending = self._export_profiles
        if pending is None:
            yield
            return
        out_dir, left = pending
        self._export_profiles = (out_dir, left - 1) if left > 1 else None
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, with_stack=True) as prof:
            yield
        stem = out_dir / f"export-{uuid.uuid4().hex[:8]}"
        prof.export_chrome_trace(f"{stem}.trace.json")
        stem.with_suffix(".txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))

    def _export_image(self, tenant: str, name: str, root: Path, plan: BuildPlan, share_on: str | None) -> ImageExport:
        parts = {"began": time.monotonic()}

        def mark(part: str) -> None:
            parts[part] = time.monotonic()

        slot = self._activate(tenant)
        spec = self.specs[tenant]
        dtype = getattr(torch, plan.dtype)
        scaling = spec.alpha / spec.rank
        # a copy (training may go on while it is published): the slot's weights are one flat buffer
        weights = slot.flat["w"]
        if share_on is None:
            tensors = FlatWeights(weights.to(dtype, copy=True), slot.layout)
            mark("cast")
            out = self._new_export(tenant, name, root, lambda d: write_image(d, plan, tensors, scaling), mark)
            return ImageExport(out, tensors, None, parts)
        # the colocated trainer's copy and image are lent: the copy comes back once the durable copy is
        # written (persist_tensors), the image once every server has copied it (the actor)
        copy = self.copy_buffers.take(weights.numel(), dtype, weights.device)
        copy.copy_(weights.detach())
        tensors = FlatWeights(copy, slot.layout, self.copy_buffers)
        mark("cast")
        buffer = self.share_buffers.take(plan.numel, dtype, weights.device)
        try:
            out = self._new_export(tenant, name, root, lambda d: share_image(
                d, plan, tensors, scaling, share_on, out=buffer, out_buffers=self.share_buffers, mark=mark), mark)
        except BaseException:  # no server has heard of either buffer: both are free again
            self.share_buffers.give_back(buffer)
            self.copy_buffers.give_back(copy)
            raise
        return ImageExport(out, tensors, buffer, parts)

    def _new_export(self, tenant: str, name: str, root: Path | None, write: Callable[[Path], Any],
                    mark: Callable[[str], None] = lambda part: None) -> Path:
        """A new export directory of the tenant under ``root`` (default ``sampler_root``): its
        adapter_config.json and what ``write`` puts there, seen whole or not at all. ``mark``: told
        each part's name as it ends (the publication's timeline)."""
        _check_name(name, "name")
        root = (root or self.config.sampler_root) / tenant
        out = root / f"{name}-s{self.steps[tenant]}-{uuid.uuid4().hex[:8]}"
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            (tmp / "adapter_config.json").write_bytes(self._adapter_config(self.specs[tenant]))
            mark("configured")
            write(tmp)
            tmp.rename(out)
            mark("renamed")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _adapter_config(self, spec: LoraSpec) -> bytes:
        """adapter_config.json of ``spec`` as peft writes it, made once per shape: peft's
        ``save_pretrained`` took ~1 ms of every publication's critical path."""
        cached = self._adapter_configs.get(spec)
        if cached is None:
            from peft import LoraConfig

            with tempfile.TemporaryDirectory(prefix="skyrl-config-") as tmp:
                # peft annotates lora_alpha as int, but takes (and scales by) a float
                LoraConfig(r=spec.rank, lora_alpha=spec.alpha,  # type: ignore[arg-type]
                           target_modules=list(spec.target_modules), lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(self.config.base_model)
                           ).save_pretrained(tmp)
                cached = self._adapter_configs[spec] = (Path(tmp) / "adapter_config.json").read_bytes()
        return cached

    def adapter_files(self, tenant: str) -> dict[str, bytes]:
        """The tenant's adapter as the files of a peft directory (name -> bytes), for a download.

        Written to a temporary directory and read back, so the export is exactly what vLLM and
        peft load; nothing of it stays on the trainer's disk."""
        with tempfile.TemporaryDirectory(prefix="skyrl-adapter-") as tmp:
            out = self.export_for_sampler(tenant, "external", Path(tmp))
            return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.is_file()}

    def delete_checkpoint(self, path: str) -> bool:
        """Remove a saved state file or a sampler export (a deleted or expired checkpoint).

        Only paths under this trainer's own roots; a tenant's newest export stays, because it is
        the version the servers serve and reload after a restart (it goes with the next prune).
        Returns whether anything was removed."""
        real = Path(path).resolve()
        roots = (self.config.checkpoint_dir.resolve(), self.config.sampler_root.resolve())
        if not any(real.is_relative_to(r) and real != r for r in roots):
            raise SkyrlError(403, f"path: '{path}' is outside this trainer's checkpoints", "path")
        if real.is_file():
            real.unlink()
            return True
        if real.is_dir():
            if real == self._exports(real.parent)[-1]:
                return False
            shutil.rmtree(real, ignore_errors=True)
            return True
        return False

    def durable_path(self, export: Path) -> Path:
        """Where :meth:`persist_export` keeps an export written elsewhere."""
        return self.config.sampler_root / export.parent.name / export.name

    def persist_export(self, export: Path) -> Path:
        """Copy an export written to shared memory into ``sampler_root`` (atomically: a reader sees the
        whole directory or none). Runs off the training lock; the caller drops the shared-memory copy
        once the servers have loaded it."""
        return self._persist(export, lambda tmp: shutil.copytree(export, tmp))

    def persist_tensors(self, export: Path, tensors: FlatWeights) -> Path:
        """The durable copy of an image export (:meth:`export_image`): a peft directory of
        ``tensors`` in ``sampler_root``, which a restarted server reloads and a tinker:// path names.
        Runs off the training lock, like :meth:`persist_export`."""

        def write(tmp: Path) -> None:
            tmp.mkdir()
            shutil.copyfile(export / "adapter_config.json", tmp / "adapter_config.json")
            tensors.save(tmp / "adapter_model.safetensors")  # one copy off the device, one write

        try:
            return self._persist(export, write)
        finally:  # off the device or failed: either way the lent buffer is free
            if tensors.buffers is not None:
                tensors.buffers.give_back(tensors.flat)

    def _persist(self, export: Path, write: Callable[[Path], Any]) -> Path:
        """The durable directory of ``export`` in ``sampler_root``, as ``write`` fills a new directory
        (its argument, not yet made), seen whole or not at all; older versions pruned."""
        out = self.durable_path(export)
        tmp = out.parent / f".tmp-{uuid.uuid4().hex}"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune_exports(out.parent)
        return out

    @staticmethod
    def _exports(root: Path) -> list[Path]:
        """A tenant's finished export directories (not the hidden ones being written), oldest first."""
        return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: d.stat().st_mtime_ns)

    def _prune_exports(self, root: Path) -> None:
        for old in self._exports(root)[: -self.config.keep_sampler_versions]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ inspection (tests, benchmarks)
    def snapshot(self, tenant: str) -> TenantSnapshot:
        """A copy of the tenant's full state wherever it lives, without moving it between tiers."""
        self._spec(tenant)
        assert self.slots is not None
        if tenant in self.resident:
            return self.slots.snapshot(self.resident[tenant], self.steps[tenant])
        snap = self.tiers.peek(tenant)
        assert snap is not None
        return TenantSnapshot(snap.spec, snap.step, snap.layout, {k: v.clone() for k, v in snap.tensors.items()})

    def make_resident(self, tenant: str) -> str:
        """Bring a tenant into a slot; returns the tier it came from (benchmarks time this)."""
        tier = "resident" if tenant in self.resident else (self.tiers.tier_of(tenant) or "?")
        self._activate(tenant)
        return tier

    def evict(self, tenant: str) -> str:
        """Push a resident tenant out to the CPU tier (or disk, if CPU cannot hold it)."""
        self._spec(tenant)
        slot = self.resident.pop(tenant, None)
        if slot is None:
            return self.tiers.tier_of(tenant) or "?"
        tier = self._evict(tenant, slot)
        self.free.append(slot)
        self._publish()
        return tier

    # ------------------------------------------------------------------ internals
    def _spec(self, tenant: str) -> LoraSpec:
        spec = self.specs.get(tenant)
        if spec is None:
            raise SkyrlError(404, f"tenant: no LoRA named '{tenant}'", "tenant")
        return spec

    def _resident_bytes(self) -> int:
        return sum(s.nbytes for s in self.resident.values()) + sum(s.nbytes for s in self.free)

    def _evict(self, tenant: str, slot: Slot) -> str:
        assert self.slots is not None
        snap = self.slots.snapshot(slot, self.steps[tenant])
        self._pending_elsewhere[tenant] = snap.has_grads
        slot.tenant = None
        self.metrics.evictions.labels(tier="resident").inc()
        return self.tiers.put(tenant, snap)

    def _slot_for(self, spec: LoraSpec) -> Slot:
        """A slot for ``spec`` within the resident budget, evicting least recently used tenants."""
        assert self.slots is not None
        need = self.slots.slot_bytes(spec)
        budget = self.config.resident_budget_bytes
        if need > budget:
            raise SkyrlError(507, f"rank: an adapter of rank {spec.rank} on {list(spec.target_modules)} needs {need} "
                                  f"bytes resident, over the resident budget of {budget}", "rank")
        for slot in self.free:
            if slot.spec.signature == spec.signature:
                self.free.remove(slot)
                return slot
        used = self._resident_bytes()
        retired: list[Slot] = []
        found: Slot | None = None
        while used + need > budget:
            if self.free:
                slot = self.free.pop(0)
            elif self.resident:
                tenant, slot = self.resident.popitem(last=False)
                self._evict(tenant, slot)
                if slot.spec.signature == spec.signature:
                    found = slot
                    used -= slot.nbytes
                    break
            else:  # pragma: no cover - need <= budget guarantees room once everything is out
                break
            retired.append(slot)
            used -= slot.nbytes
        slot = found or self.slots.add(spec)
        for old in retired:  # peft keeps at least one adapter, so new slots come before old ones go
            self.slots.remove(old)
        return slot

    def _activate(self, tenant: str) -> Slot:
        self._spec(tenant)
        assert self.slots is not None
        slot = self.resident.get(tenant)
        if slot is not None:
            self.resident.move_to_end(tenant)
            self.metrics.hits.labels(tier="resident").inc()
            self.slots.activate(slot)
            return slot
        self.metrics.misses.labels(tier="resident").inc()
        t0 = time.perf_counter()
        taken = self.tiers.take(tenant)
        if taken is None:  # pragma: no cover - a known tenant is always in some tier
            raise SkyrlError(500, f"tenant: state of '{tenant}' was lost", "tenant")
        snap, tier = taken
        try:
            slot = self._slot_for(snap.spec)
        except BaseException:
            self.tiers.put(tenant, snap)
            raise
        self.slots.restore(slot, tenant, snap)  # synchronous: the host buffers are free afterwards
        self.slots.pool.give(snap.tensors.values())
        self.resident[tenant] = slot
        self.slots.activate(slot)
        self.metrics.switch.labels(tier=tier).observe(time.perf_counter() - t0)
        self._publish()
        return slot

    def _run(self, tenant: str, data: Sequence[Datum], loss_fn: str, cfg: dict[str, float], *, backward: bool
             ) -> ForwardBackwardOutput:
        self._spec(tenant)
        loss_spec, config = resolve(loss_fn, cfg)
        batch = collate(data, loss_spec, self.vocab_size, self.config.max_seq_len, self.device)
        slot = self._activate(tenant)
        assert self.slots is not None and self.slots.model is not None
        outputs: list[dict[str, list[float]]] = []
        sums: dict[str, float] = {}
        with torch.set_grad_enabled(backward):
            logits = self.slots.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            total = torch.zeros((), device=self.device)
            for i, item in enumerate(batch.items):
                n = item.length
                row = logits[i, :n]
                lp = token_logprobs(row, item.target_tokens)
                result = loss_spec.fn(LossInputs(lp, item.inputs, config, row if loss_spec.needs_logits else None))
                total = total + result.loss
                out = {"logprobs": lp.detach().float().cpu().tolist()}
                out.update({k: v.float().cpu().tolist() for k, v in result.outputs.items()})
                outputs.append(out)
                for key, value in result.metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            if not torch.isfinite(total):
                raise SkyrlError(422, f"data: the loss is {float(total)}; check the inputs (nothing was accumulated)", "data")
            if backward:
                total.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                slot.has_grads = True
        metrics = {"loss:sum": float(total.detach())}
        n_datums = len(batch.items)
        metrics.update({k: (v / n_datums if k.endswith(":mean") else v) for k, v in sums.items()})
        return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=metrics)

    def _publish(self) -> None:
        self.metrics.bytes.labels(tier="resident").set(self._resident_bytes())
        self.metrics.tenants.labels(tier="resident").set(len(self.resident))
