"""A new adapter version published as a ready slot image: the trainer lays out its own weights as
one adapter slot of every LoRA layer of a server, so the server neither checks tensor files nor
builds anything before the flip.

The way through files costs an 8B rank-32 version five trips through host memory between
``save_weights_for_sampler`` and the flip (the trainer writes safetensors, the server's check reads
them, a builder reads them and writes an image, the worker reads that): 0.7 s from save to the first
token on the H200 (``bench/results/h200-2026-12-02``). Here the trainer, which holds the weights
anyway, writes the image by the server's own plan (``slot_builder.BuildPlan``, from
``GET /skyrl/v1/slot_plan``) with the same casts and scaling the builder uses, and the worker maps
that file; the plan's digest makes sure both mean the same layout.

A published directory holds ``adapter_config.json`` (the adapter's shape, as peft writes it),
``slot_image.bin`` (the flat image, in the plan's dtype) and ``slot_image.json`` (:class:`ImageManifest`).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from cachetools import LRUCache
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyrl_lora.inference.slot_builder import BuildPlan

T = TypeVar("T")
IMAGE_FILE = "slot_image.bin"
MANIFEST_FILE = "slot_image.json"


class CudaIpcImage(BaseModel):
    """An image left in the trainer's GPU memory for a worker on the same GPU to copy (issue 17: the
    colocated trainer publishes by a GPU copy, no host round trip). The fields are those of torch's
    own CUDA IPC reduction (``torch.multiprocessing.reductions.reduce_tensor`` /
    ``rebuild_cuda_tensor``, torch 2.11 and 2.13), carried as JSON rather than a pickle, so that an
    adapter directory never makes a worker run code it names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_uuid: str
    device: int = Field(ge=0)
    handle: str = Field(description="base64 of the CUDA IPC memory handle")
    storage_size_bytes: int = Field(ge=1)
    storage_offset_bytes: int = Field(ge=0)
    ref_counter_handle: str = Field(description="base64")
    ref_counter_offset: int = Field(ge=0)
    event_handle: str | None = Field(description="base64; the producer's event the copy must wait for")
    event_sync_required: bool
    tensor_offset: int = Field(ge=0)


class ImageManifest(BaseModel):
    """What the worker needs besides the image: which layout it follows, and each entry's source shape;
    where the image is (``slot_image.bin`` beside it, or the trainer's GPU memory: ``cuda_ipc``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_digest: str = Field(description="sha256 of the plan the image was laid out by (plan_digest)")
    dtype: Literal["bfloat16", "float16", "float32"]
    numel: int = Field(ge=1)
    scaling: float = Field(gt=0, description="lora_alpha / r, folded into every lora_B slot as vLLM folds it")
    shapes: list[list[int]] = Field(description="per plan entry, its source tensor's (rows, cols); [] where none")
    cuda_ipc: CudaIpcImage | None = None


class ImageUnfit(ValueError):
    """The adapter has tensors the plan has no slot for (or bigger than it): publish it as files."""


def plan_digest(plan: BuildPlan) -> str:
    """sha256 of the plan's JSON; remembered per plan object (each publication's manifest names it)."""
    return _per_plan(_DIGESTS, id(plan), plan, lambda: hashlib.sha256(plan.model_dump_json().encode()).hexdigest())


def _per_plan(cache: LRUCache[Any, tuple[BuildPlan, T]], key: Any, plan: BuildPlan, make: Callable[[], T]) -> T:
    """``make()``, remembered in ``cache`` under ``key`` for this plan object. The plan is kept with the
    value, so its id is not reused while cached, and a hit must be the same object."""
    with _CACHE_LOCK:
        cached = cache.get(key)
    if cached is not None and cached[0] is plan:
        return cached[1]
    value = make()
    with _CACHE_LOCK:
        cache[key] = (plan, value)
    return value


_CACHE_LOCK = threading.Lock()  # the caches below are read by a trainer's and a worker's threads
_DIGESTS: LRUCache[int, tuple[BuildPlan, str]] = LRUCache(maxsize=32)


class FlatWeights:
    """Named tensors kept as consecutive segments of one flat buffer, in ``layout`` order, as a
    trainer slot keeps its weights (``training/adapters.py``). A cast of them all is one kernel, and
    an image is laid out from their segments by multi-tensor copies: at 8B rank 32 the 448 per-tensor
    views the way through a dict of tensors made cost more host time than the GPU's work."""

    def __init__(self, flat: Any, layout: Sequence[tuple[str, Sequence[int]]],
                 buffers: ShareBuffers | None = None) -> None:
        self.flat = flat
        self.layout = tuple((name, tuple(shape)) for name, shape in layout)
        self.sizes = [math.prod(shape) for _, shape in self.layout]
        self.buffers = buffers  # where ``flat`` was lent from: its segments are made once
        if sum(self.sizes) != flat.numel():
            raise ValueError(f"the layout holds {sum(self.sizes)} elements; the buffer {flat.numel()}")

    def named(self) -> dict[str, Any]:
        """name -> a view of its segment, in its shape."""
        return dict(zip((name for name, _ in self.layout), flat_views(self.flat, [s for _, s in self.layout])))

    def segments(self) -> list[Any]:
        """Each tensor's segment, one-dimensional (one split, no view per tensor)."""
        if self.buffers is not None:
            return self.buffers.split(self.flat, self.sizes)
        return list(self.flat.split(self.sizes))

    def save(self, path: Path) -> None:
        """Write them as a safetensors file (what peft and vLLM read): the header, then the buffer,
        already in the file's order, in one write from one host copy.

        From a GPU the host copy goes into pinned memory, asynchronously, and this thread waits for
        its event. One 168 MB copy into pageable memory (an 8B rank-32 version's durable copy) held
        up every other thread's CUDA calls for 109 ms on the H200, and so the trainer actor's answer
        to the ``save_weights_for_sampler`` the copy was for; into pinned memory it takes 3.5 ms and
        no call waits over 0.1 ms (``scripts/gpu/persist_lock.py``,
        ``bench/results/h200-2026-12-02-s21/*persist-lock.json``). safetensors' ``save_file`` would
        also copy every tensor into ``bytes`` first (on this CPU: 350 ms against 198 ms for the
        same file, ``bench/persist_stall.py``)."""
        import json
        import struct

        import torch

        flat = self.flat.detach().contiguous()
        if flat.device.type == "cuda":
            host = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
            copied.record(torch.cuda.current_stream(flat.device))
            copied.synchronize()
        else:
            host = flat.to("cpu")
        dtype = _SAFETENSORS_DTYPES.get(str(host.dtype))
        if dtype is None:
            raise ValueError(f"no safetensors name for {host.dtype}")
        header: dict[str, Any] = {}
        offset = 0
        for (name, shape), n in zip(self.layout, self.sizes):
            end = offset + n * host.element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        data: Any = host.view(torch.uint8).numpy()  # the buffer's own bytes, no copy
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.write(memoryview(data))


_SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


def flat_views(flat: Any, shapes: Sequence[Sequence[int]]) -> list[Any]:
    """Views of ``flat`` (one dimension) of the given shapes, one after another from its start."""
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[offset:offset + n].view(*shape))
        offset += n
    return views


class _WholeOrder(NamedTuple):
    """How a :class:`FlatWeights` layout fills a plan where every tensor fills its slot whole."""

    sizes: list[int]  # each entry's numel, in plan order
    sources: list[int]  # per filled entry, its tensor's index in the layout
    filled: list[int]  # entries with a tensor
    scaled: list[int]  # filled lora_B entries
    empty: list[int]  # entries no tensor fills: zeros
    shapes: list[list[int]]  # per entry, its source's (rows, cols); [] where none


# per (plan object, layout): the plan it was made for and its order (``_per_plan``)
_ORDERS: LRUCache[tuple[int, tuple[tuple[str, tuple[int, ...]], ...]], tuple[BuildPlan, _WholeOrder | None]] = \
    LRUCache(maxsize=32)


def _whole_order(plan: BuildPlan, layout: tuple[tuple[str, tuple[int, ...]], ...]) -> _WholeOrder | None:
    """None where a tensor has no slot or is smaller than its slot, or the plan's entries do not tile
    the image (the dict way handles, or refuses, those)."""
    return _per_plan(_ORDERS, (id(plan), layout), plan, lambda: _plan_order(plan, layout))


def _plan_order(plan: BuildPlan, layout: tuple[tuple[str, tuple[int, ...]], ...]) -> _WholeOrder | None:
    index = {name: i for i, (name, _) in enumerate(layout)}
    if set(index) - {e.source for e in plan.entries}:
        return None
    order = _WholeOrder([], [], [], [], [], [])
    offset = 0
    for k, entry in enumerate(plan.entries):
        i = index.get(entry.source) if entry.source is not None else None
        if entry.offset != offset or (i is not None and layout[i][1] != (entry.rows, entry.cols)):
            return None
        offset += entry.rows * entry.cols
        order.sizes.append(entry.rows * entry.cols)
        order.shapes.append([entry.rows, entry.cols] if i is not None else [])
        if i is None:
            order.empty.append(k)
            continue
        order.sources.append(i)
        order.filled.append(k)
        if entry.scaled:
            order.scaled.append(k)
    return order if offset == plan.numel else None


def assemble(plan: BuildPlan, tensors: Mapping[str, Any] | FlatWeights, scaling: float,
             out: Any = None, out_buffers: ShareBuffers | None = None) -> tuple[Any, list[list[int]]]:
    """The flat image of ``tensors`` (peft names) on their device, and each entry's source shape.
    The builder's operations (``slot_builder.build_image``: cast to the slot dtype, then ``lora_B``
    times the scaling in that dtype, in the top-left corner of a zeroed slot), so the same bits; the
    cast happens in the copy into the slot, and only padding and absent slots are zeroed. Slots a
    tensor fills whole (every slot, where the adapter's rank is the server's) are copied and scaled
    by multi-tensor kernels: one launch per kind of work instead of one per tensor; from
    :class:`FlatWeights` that fill every slot whole, with no view made per tensor either. ``out``:
    a flat buffer of the plan's size, dtype and device to write the image into (else a new one), lent
    by ``out_buffers`` where given (which then splits it once for its life)."""
    import torch

    if isinstance(tensors, FlatWeights):
        order = _whole_order(plan, tensors.layout)
        if order is None:
            return assemble(plan, tensors.named(), scaling, out)
        image = out if out is not None else torch.empty(plan.numel, dtype=getattr(torch, plan.dtype),
                                                          device=tensors.flat.device)
        parts = out_buffers.split(image, order.sizes) if out is not None and out_buffers is not None \
            else image.split(order.sizes)
        segments = tensors.segments()
        torch._foreach_copy_([parts[k] for k in order.filled], [segments[i] for i in order.sources])
        if order.scaled and scaling != 1:
            torch._foreach_mul_([parts[k] for k in order.scaled], scaling)
        if order.empty:
            torch._foreach_zero_([parts[k] for k in order.empty])
        return image, order.shapes
    dtype = getattr(torch, plan.dtype)
    planned = {e.source for e in plan.entries if e.source is not None}
    if set(tensors) - planned:
        raise ImageUnfit(f"tensors the plan has no slot for: {sorted(set(tensors) - planned)[:4]}")
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    image = out if out is not None else torch.empty(plan.numel, dtype=dtype, device=device)
    shapes: list[list[int]] = []
    whole_slots: list[Any] = []
    whole_sources: list[Any] = []
    whole_scaled: list[Any] = []
    for entry in plan.entries:
        tensor = tensors.get(entry.source) if entry.source is not None else None
        whole = entry.view(image)
        if tensor is None:
            whole.zero_()
            shapes.append([])
            continue
        rows, cols = tensor.shape if tensor.dim() == 2 else (-1, -1)
        if not 0 < rows <= entry.rows or not 0 < cols <= entry.cols:
            raise ImageUnfit(f"{entry.source} has shape {list(tensor.shape)}; its slot is [{entry.rows}, {entry.cols}]")
        shapes.append([rows, cols])
        if (rows, cols) == (entry.rows, entry.cols):
            whole_slots.append(whole)
            whole_sources.append(tensor.detach())
            if entry.scaled and scaling != 1:
                whole_scaled.append(whole)
            continue
        slot = whole[:rows, :cols]
        slot.copy_(tensor.detach())  # the cast to the slot dtype (round to nearest even, as .to() does)
        if entry.scaled and scaling != 1:
            slot.mul_(scaling)  # in the slot dtype, as vLLM's optimize() scales lora_B
        whole[rows:].zero_()
        whole[:rows, cols:].zero_()
    if whole_slots:
        torch._foreach_copy_(whole_slots, whole_sources)
    if whole_scaled:
        torch._foreach_mul_(whole_scaled, scaling)
    return image, shapes


def write_image(out_dir: Path, plan: BuildPlan, tensors: Mapping[str, Any] | FlatWeights, scaling: float) -> ImageManifest:
    """Write the image and its manifest into ``out_dir`` (the adapter_config.json is the caller's).
    Raises ImageUnfit where the plan cannot hold the adapter."""
    import torch

    image, shapes = assemble(plan, tensors, scaling)
    data: Any = image.to("cpu").view(torch.uint8).numpy()  # one copy off the device, the image's own bytes
    with open(out_dir / IMAGE_FILE, "wb") as f:
        f.write(memoryview(data))
    return _write_manifest(out_dir, plan, scaling, shapes, None)


def share_image(out_dir: Path, plan: BuildPlan, tensors: Mapping[str, Any] | FlatWeights, scaling: float,
                device_uuid: str, out: Any = None, out_buffers: ShareBuffers | None = None,
                mark: Callable[[str], None] = lambda part: None) -> tuple[ImageManifest, Any]:
    """Lay the image out on the tensors' GPU (into ``out``, a buffer lent by ``out_buffers``, where
    given) and describe it for a worker on that GPU (``cuda_ipc``) in the manifest written to
    ``out_dir``; ``mark`` is told each part's name as it ends (the publication's timeline). Returns
    the manifest and the image, which the caller keeps alive until every worker
    has copied it (the sync has returned). The image is complete when this returns: a worker that
    still has this buffer mapped from an earlier version reads it without opening the handle again,
    and so without waiting for the IPC event that comes with it."""
    import base64

    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    image, shapes = assemble(plan, tensors, scaling, out, out_buffers)
    mark("laid_out")
    if image.device.type != "cuda":
        raise ImageUnfit("the weights are not on a GPU: nothing to share by CUDA IPC")
    torch.cuda.current_stream(image.device).synchronize()
    mark("gpu_done")
    _, args = reduce_tensor(image)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    mark("ipc_handle")
    (_, _, _, offset, _, _, device, handle, size, storage_offset, _, ref_handle, ref_offset, event, sync) = args

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    ipc = CudaIpcImage(device_uuid=device_uuid, device=int(device), handle=b64(handle), storage_size_bytes=size,
                       storage_offset_bytes=storage_offset, ref_counter_handle=b64(ref_handle),
                       ref_counter_offset=ref_offset, event_handle=b64(event) if event else None,
                       event_sync_required=bool(sync), tensor_offset=offset)
    return _write_manifest(out_dir, plan, scaling, shapes, ipc), image


class ShareBuffers:
    """The colocated trainer's GPU buffers of one kind (its images; its copies for durable files),
    reused version after version: a worker keeps each image buffer mapped (``vllm_compat.worker``),
    so a version costs it no ``cudaIpcOpenMemHandle`` (which under the engine's load took about a step
    at 8B on the H200), and a reused buffer needs no new allocation and keeps its split into segments
    (:meth:`split`: 448 views at 8B rank 32, ~1 ms of host time per version made anew). A buffer is
    lent for one publication and given back once it is free again; one a worker may still be reading
    (its publication failed) is dropped. Thread-safe: exports run on the trainer's thread, syncs on
    its loop, durable copies on threads of their own. At most ``max_free`` wait to be lent again
    (the worker keeps as many image buffers mapped, ``MAPPED_KEPT``): tenants of many adapter shapes
    would otherwise each keep buffers that the caching allocator could give to training."""

    def __init__(self, max_free: int = 4) -> None:
        self.max_free = max_free
        self._free: list[Any] = []
        self._splits: dict[int, tuple[Any, tuple[int, ...], list[Any]]] = {}  # id -> (buffer, sizes, views)
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: Any, device: Any) -> Any:
        import torch

        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() == numel and buf.dtype == dtype and buf.device == device:
                    return self._free.pop(i)
        return torch.empty(numel, dtype=dtype, device=device)

    def give_back(self, buf: Any) -> None:
        with self._lock:
            self._free.append(buf)
            while len(self._free) > self.max_free:  # the least recently given back goes
                self._splits.pop(id(self._free.pop(0)), None)

    def drop(self, buf: Any) -> None:
        """Never lend ``buf`` again (its memory goes once nothing else holds it)."""
        with self._lock:
            self._splits.pop(id(buf), None)

    def split(self, buf: Any, sizes: Sequence[int]) -> list[Any]:
        """``buf.split(sizes)``, made once per buffer and sizes (the entry keeps the buffer, so its id
        is not reused while cached; :meth:`drop` forgets it)."""
        key = tuple(sizes)
        with self._lock:
            cached = self._splits.get(id(buf))
        if cached is not None and cached[0] is buf and cached[1] == key:
            return cached[2]
        views = list(buf.split(list(key)))
        with self._lock:
            self._splits[id(buf)] = (buf, key, views)
        return views


def _write_manifest(out_dir: Path, plan: BuildPlan, scaling: float, shapes: list[list[int]],
                    cuda_ipc: CudaIpcImage | None) -> ImageManifest:
    manifest = ImageManifest.model_validate({"plan_digest": plan_digest(plan), "dtype": plan.dtype, "numel": plan.numel,
                                             "scaling": scaling, "shapes": shapes, "cuda_ipc": cuda_ipc})
    (out_dir / MANIFEST_FILE).write_text(manifest.model_dump_json())
    return manifest


def open_shared_image(manifest: ImageManifest, device: int) -> Any:
    """The trainer's image (``cuda_ipc``) mapped into this process, on its ``device`` (this process's
    index of that GPU, which may differ from the trainer's): a view of its memory, no copy."""
    import base64

    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    ipc = manifest.cuda_ipc
    if ipc is None:
        raise ValueError("the slot image is not in GPU memory")
    dtype = getattr(torch, manifest.dtype)
    event = base64.b64decode(ipc.event_handle) if ipc.event_handle is not None else None
    return rebuild_cuda_tensor(torch.Tensor, torch.Size([manifest.numel]), (1,), ipc.tensor_offset,  # type: ignore[no-untyped-call]
                               torch.storage.TypedStorage, dtype, device, base64.b64decode(ipc.handle),
                               ipc.storage_size_bytes, ipc.storage_offset_bytes, False,
                               base64.b64decode(ipc.ref_counter_handle), ipc.ref_counter_offset, event,
                               ipc.event_sync_required)


def read_manifest(adapter_dir: str | Path) -> ImageManifest | None:
    """The directory's manifest, None where it is a plain peft directory. Raises ValueError for a
    manifest that is not one, or whose image file is missing or of another size."""
    path = Path(adapter_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = ImageManifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ValueError(f"{MANIFEST_FILE} is not a slot image manifest ({exc.error_count()} errors)") from None
    if manifest.cuda_ipc is not None:
        return manifest
    import torch

    want = manifest.numel * getattr(torch, manifest.dtype).itemsize
    image = Path(adapter_dir) / IMAGE_FILE
    size = os.path.getsize(image) if image.is_file() else None
    if size != want:
        raise ValueError(f"{IMAGE_FILE} has {size} bytes; its manifest says {want}")
    return manifest
