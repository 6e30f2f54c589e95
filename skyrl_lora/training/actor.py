"""TrainerActor: the multi-tenant trainer as a Ray actor, and the targeted sync of a tenant into inference.

Training calls run one at a time in a worker thread (one model, one device), so the actor's event
loop stays free: a tenant's sampler sync (``save_weights_for_sampler``) holds the training lock only
while it writes the adapter; the fan-out to the inference servers runs beside other tenants' steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch

from skyrl_lora.actor_restart import call_self_after_restart
from skyrl_lora.background import BackgroundTasks
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.client import FanOutError, InferenceError, RemoteInferenceClient
from skyrl_lora.inference.protocol import ServerIncarnation
from skyrl_lora.inference.slot_builder import BuildPlan
from skyrl_lora.inference.slot_image import ImageUnfit
from skyrl_lora.node_identity import node_identity
from skyrl_lora.training.base_watch import ServerDown, SharedBaseWatch
from skyrl_lora.training.config import TrainerConfig
from skyrl_lora.training.durable_copies import DurableCopies
from skyrl_lora.training.protocol import (
    AdamParams,
    Datum,
    DistillPayload,
    DistillStepOutput,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    PublishTimeline,
    SamplerWeights,
    SavedState,
    SharedBaseInfo,
    TenantInfo,
    TrainerState,
)
from skyrl_lora.training.shared_base import checksum, map_server_weights
from skyrl_lora.training.trainer import MultiTenantTrainer

logger = logging.getLogger(__name__)
T = TypeVar("T")


class TrainerActor:
    def __init__(self, config: TrainerConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = config
        self.trainer = MultiTenantTrainer(config)
        if config.base_weights != "own" and config.share_from:
            self.trainer.weights_source = functools.partial(map_server_weights, config.share_from)
        self._lock: asyncio.Lock | None = None
        self._client: RemoteInferenceClient | None = None
        self._image_plan: BuildPlan | None = None  # every server's slot layout, while they agree on one
        self._gpu_copies = True  # the colocated trainer publishes by a GPU copy until that fails once
        self._durable = DurableCopies()  # published versions' copies in sampler_root, written after the call
        self._cleanups = BackgroundTasks("trainer actor")  # shared-memory exports removed once copied
        # the colocated trainer follows its server across restarts (base_watch); made once the base is mapped
        self._base_watch: SharedBaseWatch | None = None
        self._server: Any = None  # the server actor's handle (Any: Ray's handles are untyped)
        self._watching = BackgroundTasks("shared base watch")
        context = ray.get_runtime_context()
        # After a crash Ray restarts us with empty memory: every tenant comes back from its last saved
        # state (save_state) before any request runs; the restart itself triggers it, not a caller.
        self._restore_pending = bool(context.was_current_actor_reconstructed)
        if self._restore_pending:
            logger.warning("trainer actor restarted; restoring every tenant's last saved state")
            self._restart_call = call_self_after_restart("ready")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread, one call at a time; on a colocated trainer only while its base is
        mapped (a restarting server's is not: the call waits for the new run's, up to ``reshare_timeout_s``)."""
        deadline = time.monotonic() + self.config.reshare_timeout_s
        while True:
            watch = self._base_watch
            if watch is not None:
                await watch.wait_ready(max(0.0, deadline - time.monotonic()))
            async with self._training_lock():
                if watch is None or watch.ready:  # (released while this call waited for the lock: wait again)
                    result = await self._in_thread(fn, *args, **kwargs)
                    break
        if self._base_watch is None and self.trainer.shared is not None:
            self._follow_server(self.trainer.shared.incarnation)
        return result

    def _training_lock(self) -> asyncio.Lock:
        if self._lock is None:  # created on the actor's own loop
            self._lock = asyncio.Lock()
        return self._lock

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._restore_pending:
            self._restore_pending = False
            await asyncio.to_thread(self._restore_saved_states)
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ the server whose weights are shared
    def _follow_server(self, incarnation: str | None) -> None:
        assert self.config.share_from is not None  # a shared base came from it
        self._base_watch = SharedBaseWatch(self.config.share_from, incarnation, probe=self._probe_server,
                                           release=self._release_base, reshare=self._reshare_base,
                                           poll_s=self.config.reshare_poll_s)
        self._watching.spawn(self._base_watch.run(), name="follow-server")

    async def _probe_server(self) -> ServerIncarnation:
        from ray.exceptions import RayActorError

        try:
            if self._server is None:
                self._server = await asyncio.to_thread(ray.get_actor, str(self.config.share_from))
            answer: ServerIncarnation = await self._server.incarnation.remote()
            return answer
        except (RayActorError, ValueError) as exc:  # dead, restarting, or no actor of that name any more
            self._server = None  # looked up by name again: a server made anew under it is another actor
            raise ServerDown(str(exc)) from exc

    async def _release_base(self) -> None:
        async with self._training_lock():
            await asyncio.to_thread(self.trainer.release_shared_base)

    async def _reshare_base(self) -> str:
        async with self._training_lock():
            shared = await asyncio.to_thread(self.trainer.reshare_base)
        # the new run maps the trainer's buffers afresh and may lay its slots out anew: ask again
        self._gpu_copies, self._image_plan = True, None
        return str(shared.incarnation)

    def _restore_saved_states(self) -> None:
        self.trainer.load()
        for tenant_dir in sorted(p for p in self.config.checkpoint_dir.glob("*") if p.is_dir()):
            saved = sorted(tenant_dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
            if not saved:
                continue
            try:
                self.trainer.load_state(tenant_dir.name, str(saved[-1]), with_optimizer=True)
                logger.info("restored tenant %s from %s", tenant_dir.name, saved[-1].name)
            except Exception:  # one unreadable file must not keep the other tenants down
                logger.exception("could not restore tenant %s from %s", tenant_dir.name, saved[-1])

    def _inference(self) -> RemoteInferenceClient | None:
        if not self.config.inference_urls:
            return None
        if self._client is None:
            self._client = RemoteInferenceClient(list(self.config.inference_urls), timeout_s=self.config.sync_timeout_s,
                                                 token=self.config.inference_token)
        return self._client

    # ------------------------------------------------------------------ lifecycle
    async def ready(self) -> TrainerState:
        """Load the base model (once, however many callers arrive first) and report the state."""
        await self._run(self.trainer.load)
        return self.trainer.state()

    async def state(self) -> TrainerState:
        return await self._run(self.trainer.state)

    async def metrics_text(self) -> str:
        return self.trainer.metrics.render()

    # ------------------------------------------------------------------ tenants
    async def create_lora(self, tenant: str, spec: LoraSpec) -> TenantInfo:
        return await self._run(self.trainer.create_lora, tenant, spec)

    async def delete_lora(self, tenant: str, *, unload_from_inference: bool = True) -> None:
        await self._durable.wait_tenant(tenant)  # a copy still being written would bring the directory back
        await self._run(self.trainer.delete_lora, tenant)
        client = self._inference()
        if client is not None and unload_from_inference:
            try:
                await client.unload_lora_adapter(tenant)
            except (FanOutError, InferenceError) as exc:  # never synced, or already gone: nothing to unload
                logger.info("unload of %s after delete: %s", tenant, exc)

    async def info(self, tenant: str) -> TenantInfo:
        return await self._run(self.trainer.info, tenant)

    # ------------------------------------------------------------------ training
    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                      loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        return await self._run(self.trainer.forward, tenant, list(data), loss_fn, loss_fn_config)

    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                               loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        return await self._run(self.trainer.forward_backward, tenant, list(data), loss_fn, loss_fn_config)

    async def optim_step(self, tenant: str, adam: AdamParams = AdamParams()) -> OptimStepOutput:
        return await self._run(self.trainer.optim_step, tenant, adam)

    async def distill_step(self, payload: DistillPayload) -> DistillStepOutput:
        return await self._run(self.trainer.distill_step, payload)

    async def save_state(self, tenant: str, name: str) -> SavedState:
        return await self._run(self.trainer.save_state, tenant, name)

    async def load_state(self, tenant: str, path: str, with_optimizer: bool = True) -> TenantInfo:
        return await self._run(self.trainer.load_state, tenant, path, with_optimizer=with_optimizer)

    async def adapter_files(self, tenant: str) -> dict[str, bytes]:
        return await self._run(self.trainer.adapter_files, tenant)

    async def delete_checkpoint(self, path: str) -> bool:
        with contextlib.suppress(SkyrlError):  # written or failed: either way it can go now
            await self._durable.wait(path)
        self._durable.forget(path)
        return await asyncio.to_thread(self.trainer.delete_checkpoint, path)

    async def durable(self, path: str) -> None:
        """Return once the version ``save_weights_for_sampler`` named ``path`` is in ``sampler_root``
        (its copy is written after the call returns); a 500 naming the path if writing it failed."""
        await self._durable.wait(path)

    async def save_weights_for_sampler(self, tenant: str, name: str, *, sync: bool = True) -> SamplerWeights:
        """Export the tenant's adapter and swap it into every inference server, pausing only that tenant.

        The servers load the new version beside the old one, then flip the tenant's name to it and
        abort only that tenant's in-flight requests, which their clients continue on the new weights.
        Where the servers read it from shared memory, the returned path (the durable copy) is written
        after this returns: :meth:`durable` waits for it.
        """
        called = time.monotonic()
        client = self._inference()
        publish = self.config.publish_root if client is not None and sync else None
        plan = await self._plan_for_images(client) if client is not None and publish is not None else None
        if plan is not None and client is not None and publish is not None:
            try:
                return await self._publish_image(client, tenant, name, publish, plan, called)
            except ImageUnfit as exc:
                logger.info("%s is published as files: %s", tenant, exc)
            except SkyrlError as exc:  # e.g. a server restarted with another layout: files once, and ask again
                logger.warning("publishing %s as a slot image failed (%s); as files instead", tenant, exc.message)
                self._image_plan = None
        t_export = time.perf_counter()
        export = await self._run(self.trainer.export_for_sampler, tenant, name, publish,
                                 getattr(torch, self.config.sampler_dtype))
        export_s = time.perf_counter() - t_export
        step = self.trainer.steps.get(tenant, 0)
        if client is None or not sync:
            return SamplerWeights(tenant=tenant, path=str(export), step=step, synced=False, export_s=export_s)
        # From shared memory the servers of this node load the new version at once (servers on other
        # nodes get the files sent); the durable copy (what a tinker:// path names, and what a
        # restarted server reloads) is written beside the sync.
        path = self.trainer.durable_path(export) if publish is not None else export
        persist = functools.partial(self.trainer.persist_export, export) if publish is not None else None
        return await self._sync(client, tenant, path, export if publish is not None else None, persist, step, export_s,
                                called)

    async def _plan_for_images(self, client: RemoteInferenceClient) -> BuildPlan | None:
        """The slot layout every server shares, where every server is on this node (they read this
        node's shared memory); None otherwise, and then versions go as files."""
        if not self.config.publish_images:
            return None
        if self._image_plan is None:
            try:
                states, plans = await client.state(), await client.slot_plans()
            except (FanOutError, InferenceError) as exc:
                logger.info("no slot plan from the servers (%s); publishing files", exc)
                return None
            here = node_identity()
            digests = {p.digest for p in plans}
            if all(st.node == here for st in states) and len(digests) == 1 and None not in digests:
                self._image_plan = plans[0].plan
        return self._image_plan

    async def _publish_image(self, client: RemoteInferenceClient, tenant: str, name: str, publish: Path,
                             plan: BuildPlan, called: float) -> SamplerWeights:
        # The colocated trainer (its base is the one server's weights, on this GPU) leaves the image in
        # GPU memory for that server to copy; otherwise it goes through shared memory as a file.
        shared = self.trainer.shared
        share_on = (shared.device_uuid if shared is not None and len(self.config.inference_urls) == 1
                    and self._gpu_copies else None)
        t_export = time.perf_counter()
        export, tensors, image, parts = await self._run(self.trainer.export_image, tenant, name, publish, plan,
                                                        share_on)
        export_s = time.perf_counter() - t_export
        persist = functools.partial(self.trainer.persist_tensors, export, tensors)
        try:
            synced = await self._sync(client, tenant, self.trainer.durable_path(export), export, persist,
                                      self.trainer.steps.get(tenant, 0), export_s, called, parts)
        except SkyrlError:
            if share_on is not None:
                logger.warning("publishing by a GPU copy failed; versions go through shared memory from now on")
                self._gpu_copies = False
            if image is not None:  # dropped, not reused: a worker may still be reading it
                self.trainer.share_buffers.drop(image)
            raise
        if image is not None:  # every server has copied it: the next version is written into it
            self.trainer.share_buffers.give_back(image)
        return synced

    async def _sync(self, client: RemoteInferenceClient, tenant: str, path: Path, load_from: Path | None,
                    persist: Callable[[], Path] | None, step: int, export_s: float, called: float,
                    export_parts: dict[str, float] | None = None) -> SamplerWeights:
        """Stage and flip ``path`` on every server (read from ``load_from`` now, when given), while
        ``persist`` writes the durable copy; that goes on after this returns (``DurableCopies``), and
        ``load_from`` is removed once both are done. ``called``: when the publication began
        (``time.monotonic``), for its timeline, with the export's ``export_parts``."""
        exported = time.monotonic()
        persisted = self._durable.start(tenant, path, persist) if persist is not None else None
        t0 = time.perf_counter()
        try:
            replies = await asyncio.wait_for(
                client.update_lora(tenant, str(path), mode=self.config.sync_mode, create=True,
                                   load_from=str(load_from) if load_from is not None else None,
                                   source_node=node_identity() if load_from is not None else None),
                timeout=self.config.sync_timeout_s)
        except FanOutError as exc:
            raise SkyrlError(502, f"sync of '{tenant}' into inference failed: {exc}", "name") from exc
        except TimeoutError as exc:
            raise SkyrlError(504, f"sync of '{tenant}' into inference took over {self.config.sync_timeout_s} s", "name") from exc
        finally:
            sync_s, synced = time.perf_counter() - t0, time.monotonic()
            if load_from is not None:  # every server has read it (or given up); the copy may still need it
                self._remove_when_copied(load_from, persisted)
        last = max((r.timeline for r in replies if r.timeline is not None), key=lambda t: t.flipped, default=None)
        return SamplerWeights(tenant=tenant, path=str(path), step=step, synced=True, sync_s=sync_s, export_s=export_s,
                              versions=[r.lora.version for r in replies],
                              staging_s=max(r.staging_s for r in replies), flip_s=max(r.load_s for r in replies),
                              timeline=PublishTimeline(called=called, exported=exported, synced=synced,
                                                       server=last, export_parts=export_parts or {}))

    def _remove_when_copied(self, export: Path, persisted: asyncio.Task[Path] | None) -> None:
        async def remove() -> None:
            if persisted is not None:
                await asyncio.wait([persisted])
            await asyncio.to_thread(shutil.rmtree, export, True)

        self._cleanups.spawn(remove(), name=f"remove-{export.name}")

    # ------------------------------------------------------------------ tests and benchmarks
    async def profile_exports(self, out_dir: str, count: int) -> None:
        """Profile the next ``count`` exports of ``save_weights_for_sampler`` into ``out_dir``
        (``MultiTenantTrainer.profile_exports``)."""
        await self._run(self.trainer.profile_exports, Path(out_dir), count)

    async def snapshot_tensors(self, tenant: str) -> dict[str, Any]:
        snap = await self._run(self.trainer.snapshot, tenant)
        return {k: v.clone() for k, v in snap.tensors.items()}

    async def shared_base_checksum(self) -> dict[str, int] | None:
        """The shared base's fingerprint (None with an own copy): equal before and after training."""
        shared = self.trainer.shared
        return None if shared is None else await asyncio.to_thread(checksum, shared.server_tensors)

    async def shared_base_info(self) -> SharedBaseInfo:
        """Which run of the server the base maps now, and how often it was mapped again (restarts)."""
        shared, watch = self.trainer.shared, self._base_watch
        return SharedBaseInfo(mapped=shared is not None, incarnation=shared.incarnation if shared else None,
                              reshares=watch.reshares if watch else 0,
                              tensors=len(shared.server_tensors) if shared else 0)

    async def shared_base_bytes(self) -> int:
        """Bytes of the server's weights this trainer uses without a copy (0 with an own copy)."""
        shared = self.trainer.shared
        return 0 if shared is None else sum(t.numel() * t.element_size() for t in shared.server_tensors.values())

    async def cuda_memory(self) -> dict[str, int]:
        """This process's CUDA allocations, bytes (the colocated trainer's footprint beside the server's)."""
        import torch

        if not torch.cuda.is_available():
            return {}
        return {"allocated": torch.cuda.memory_allocated(), "max_allocated": torch.cuda.max_memory_allocated(),
                "reserved": torch.cuda.memory_reserved()}

    async def shutdown(self) -> None:
        await self._durable.drain()
        await self._watching.cancel_all()  # the watch never ends by itself
        await self._cleanups.drain()
        if self._client is not None:
            await self._client.aclose()


def start_trainer_actor(config: TrainerConfig, *, num_gpus: float | None = None, num_cpus: float = 1,
                        name: str | None = None, max_restarts: int = 0, ready_timeout_s: float = 600.0,
                        scheduling_strategy: Any = None) -> Any:
    """Create the actor (one GPU when the cluster has one), load the base model, return the handle."""
    if num_gpus is None:
        # ray.cluster_resources is unannotated
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0  # type: ignore[no-untyped-call]
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": max_restarts,
                               "max_concurrency": 64}
    if name is not None:
        options["name"] = name
    if scheduling_strategy is not None:  # e.g. the placement-group bundle of the server whose GPU it shares
        options["scheduling_strategy"] = scheduling_strategy
    # Any: ray's typed ActorHandle gives ``.remote`` only to methods decorated with @ray.method
    handle: Any = ray.remote(TrainerActor).options(**options).remote(config)
    ray.get(handle.ready.remote(), timeout=ready_timeout_s)
    return handle
