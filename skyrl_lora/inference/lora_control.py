"""Per-tenant LoRA control inside one vLLM server: gated generation, targeted abort, versioned swaps.

A tenant's adapter is served under a *stable* name (what clients send) backed by *versioned* engine
adapters (``name::vN``, a fresh ``lora_int_id`` each). Why versions:

* vLLM keys prefix-cache blocks by adapter name and path; a new engine adapter per version can never
  reuse KV computed with old weights, while other tenants' cached prefixes are untouched (no global
  prefix-cache reset).
* vLLM's ``load_inplace`` is sticky (every later step reloads the adapter from disk); a versioned swap
  never needs it. The ``inplace`` sync mode hands the engine exactly one in-place request and serves
  later requests with a plain one.
* An old version is unloaded from the engine only when no admitted request still uses it.

Every generation entry point of the server goes through :meth:`LoraController.generate`: our token
route calls it, and vLLM's app is built with :meth:`LoraController.engine_client` (a
``vllm_compat.GatedEngineClient``), so ``/v1/completions`` and ``/v1/chat/completions`` honour a
tenant's pause exactly like our own route. Tenants are listed in vLLM's model registry through its
own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from skyrl_lora.background import BackgroundTasks
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference import vllm_compat as compat
from skyrl_lora.inference.adapter_check import (
    AdapterChecker,
    AdapterCheckError,
    ModelShape,
    read_adapter_config,
    validate_adapter_config,
)
from skyrl_lora.inference.gate import PauseGates
from skyrl_lora.inference.protocol import LoraInfo, ServerState, SlotPlanResponse, SyncTimeline
from skyrl_lora.inference.slot_builder import BuildPlan
from skyrl_lora.inference.slot_image import ImageManifest, plan_digest, read_manifest
from skyrl_lora.inference.stage_channel import NOT_STAGED, Expected, ServerStageChannel, StageCommand
from skyrl_lora.inference.uploads import UploadStore

logger = logging.getLogger(__name__)

VERSION_SEP = "::v"
STAGE_POLL_S = 0.005  # how often staging asks the workers whether the load finished, without notices
STAGE_BACKSTOP_S = 0.2  # with a stage_channel: how long to wait for the workers' notices before asking


class LoraError(SkyrlError):
    """A request about a LoRA that cannot be served; ``status`` is the HTTP status to answer with."""


@dataclass
class TenantAdapter:
    name: str
    version: int
    lora_id: int
    path: str
    engine_request: Any  # LoRARequest (plain, never load_inplace) that new requests carry
    staging_s: float = 0.0  # checking and loading this version before its flip
    timeline: SyncTimeline | None = None  # when its sync's parts happened (this host's time.monotonic)

    @property
    def engine_name(self) -> str:
        return cast(str, self.engine_request.lora_name)


@dataclass
class StagedAdapter:
    """A version loaded and checked on the workers, not yet serving: ``commit`` flips to it."""

    stage_id: str
    name: str
    path: str
    lora_id: int
    request: Any  # the LoRARequest the engine's add_lora gets at commit
    mode: str
    staging_s: float
    on_workers: bool  # loaded on the workers already (False: the engine loads it at the flip)
    expiry: asyncio.TimerHandle | None = None
    armed: bool = False  # the worker flips it in before its next step (no add_lora at the commit)
    checked_at: float | None = None  # time.monotonic() when its checks were done (SyncTimeline)
    staged_at: float | None = None  # ... and when every worker had staged it


@dataclass(eq=False)
class Admission:
    """One request admitted past a tenant's gate; tracked until its generator exits."""

    request_id: str
    tenant: str | None
    version: int
    lora_id: int | None
    epoch: int
    abort_sent: bool = False
    tokens: int = 0  # output tokens seen so far (token route only); for observability and tests


@dataclass
class _TenantRuntime:
    admissions: set[Admission] = field(default_factory=set)
    waiting: int = 0  # requests held at the closed gate
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.drained.set()


class LoraController:
    """Owns the tenant registry, the pause gates and the engine's generate entry point."""

    _ids = itertools.count(10_000)  # far from vLLM's own counter, which starts at 1

    def __init__(self, engine: Any, *, adapter_roots: list[str] | None = None, drain_timeout_s: float = 30.0,
                 on_change: Callable[[str, str | None], Awaitable[None]] | None = None,
                 stage_timeout_s: float = 120.0, staged_ttl_s: float = 120.0, stage_off_loop: bool = True,
                 uploads: UploadStore | None = None, node: str = "", channel: ServerStageChannel | None = None,
                 checker: AdapterChecker | None = None, armed_flips: bool = True) -> None:
        self.engine = engine
        # where adapters are checked before staging (processes of their own, or a thread of this one)
        self.checker = checker or AdapterChecker(0)
        self.channel = channel  # staging commands and notices around the engine's loop (None: collective_rpc)
        # told (tenant, path or None) after every adapter change, e.g. to keep a restart manifest
        self.on_change = on_change
        self.uploads = uploads
        self.node = node  # where this server runs (skyrl_lora.node_identity), reported in its state
        self.adapter_roots = [Path(r).resolve() for r in (adapter_roots or [])]
        if uploads is not None and self.adapter_roots:
            self.adapter_roots.append(uploads.root.resolve())
        self.drain_timeout_s = drain_timeout_s
        self._background = BackgroundTasks("lora controller")
        self.gates = PauseGates(on_reopen=self._on_reopen)
        self.tenants: dict[str, TenantAdapter] = {}
        self._by_engine_name: dict[str, str] = {}
        self._runtime: dict[str | None, _TenantRuntime] = {}
        self._by_request: dict[str, Admission] = {}
        # engine lora id -> a version replaced but maybe still in use (its tenant, and its path to free)
        self._retiring: dict[int, TenantAdapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._serving_models: Any = None
        self._inner_generate = engine.generate
        self._lora_cfg = compat.lora_config(engine)
        self._model_shape = ModelShape.from_hf_config(compat.hf_config(engine))
        self.stage_timeout_s = stage_timeout_s
        self.staged_ttl_s = staged_ttl_s  # a version staged but never committed or discarded is freed then
        # False: the engine reads the adapter inside add_lora, on its step loop (the old way; benchmarks)
        self.stage_off_loop = stage_off_loop
        self._staged: dict[str, StagedAdapter] = {}
        self.stage_asks = 0  # status calls to the workers while staging (each one between two engine steps)
        self._slot_plan: SlotPlanResponse | None = None  # the workers' layout does not change while they live
        # an in-place update of one tenant on a one-worker server is flipped by the worker before its
        # next step (``vllm_compat/worker.py``) instead of by the engine's add_lora
        self.armed_flips = armed_flips

    # ------------------------------------------------------------------ wiring
    def engine_client(self) -> compat.GatedEngineClient:
        """What vLLM's app is built with: the engine, with generation gated by this controller."""
        return compat.GatedEngineClient(self.engine, self.generate, lambda name: name in self.tenants)

    def attach_serving_models(self, serving_models: Any) -> None:
        """Keep vLLM's OpenAI model list in step, so /v1/models and model resolution see tenants."""
        self._serving_models = serving_models

    async def _list_name(self, adapter: TenantAdapter) -> None:
        if self._serving_models is not None:
            await compat.list_served_name(self._serving_models, adapter.name, adapter.path)

    async def _unlist_name(self, name: str) -> None:
        if self._serving_models is not None:
            await compat.unlist_served_name(self._serving_models, name)

    # ------------------------------------------------------------------ lookup
    def tenant_of(self, lora_name: str) -> str | None:
        if lora_name in self.tenants:
            return lora_name
        return self._by_engine_name.get(lora_name)

    def require(self, name: str) -> TenantAdapter:
        adapter = self.tenants.get(name)
        if adapter is None:
            raise LoraError(404, f"unknown LoRA '{name}'", "lora_name")
        return adapter

    def _rt(self, tenant: str | None) -> _TenantRuntime:
        rt = self._runtime.get(tenant)
        if rt is None:
            rt = self._runtime[tenant] = _TenantRuntime()
        return rt

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def version_of(self, adm: Admission) -> int:
        """Version producing this request's tokens *now* (an in-place load keeps the engine id)."""
        if adm.tenant is None:
            return 0
        current = self.tenants.get(adm.tenant)
        if current is not None and current.lora_id == adm.lora_id:
            return current.version
        return adm.version

    # ------------------------------------------------------------------ generation
    async def admit(self, lora_name: str | None) -> tuple[Admission, Any]:
        """Wait at the tenant's gate, then register the request before anything can await."""
        tenant = None if lora_name is None else self.tenant_of(lora_name)
        if lora_name is not None and tenant is None:
            raise LoraError(404, f"unknown LoRA '{lora_name}'", "lora_name")
        while tenant is not None and self.gates.is_paused(tenant):
            rt = self._rt(tenant)
            rt.waiting += 1
            try:
                await self.gates.wait_open(tenant)
            finally:
                rt.waiting -= 1
            if tenant not in self.tenants:
                raise LoraError(404, f"LoRA '{tenant}' was unloaded while the request waited", "lora_name")
        adapter = self.tenants.get(tenant) if tenant is not None else None
        adm = Admission(
            request_id="",
            tenant=tenant,
            version=adapter.version if adapter else 0,
            lora_id=adapter.lora_id if adapter else None,
            epoch=self.gates.epoch(tenant),
        )
        rt = self._rt(tenant)
        rt.admissions.add(adm)
        rt.drained.clear()
        return adm, (adapter.engine_request if adapter else None)

    def admission(self, request_id: str) -> Admission | None:
        return self._by_request.get(request_id)

    def release(self, adm: Admission) -> None:
        self._by_request.pop(adm.request_id, None)
        rt = self._rt(adm.tenant)
        rt.admissions.discard(adm)
        if not rt.admissions:
            rt.drained.set()
        if adm.lora_id in self._retiring and not any(a.lora_id == adm.lora_id for a in rt.admissions):
            self._background.spawn(self._remove_engine_lora(adm.lora_id), name=f"remove-lora-{adm.lora_id}")

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       lora_request: Any = None, tenant: str | None = None,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        """The engine's generate, behind the tenant's gate and with the tenant's current version.
        The tenant is ``tenant`` (our routes) or named by ``lora_request`` (vLLM's routes, which
        resolve a model name through the registry)."""
        adm, engine_lora = await self.admit(tenant if lora_request is None else lora_request.lora_name)
        adm.request_id = request_id
        self._by_request[request_id] = adm
        try:
            async for out in self._inner_generate(prompt, sampling_params, request_id, *args,
                                                  lora_request=engine_lora, **kwargs):
                # Registered too late for the pause's abort sweep: stop it at its first output.
                if adm.tenant is not None and not adm.abort_sent and adm.epoch != self.gates.epoch(adm.tenant):
                    adm.abort_sent = True
                    await compat.abort_external(self.engine, request_id)
                yield out
        finally:
            self.release(adm)

    # ------------------------------------------------------------------ abort / pause / resume
    def _abort_sweep(self, tenant: str, lora_id: int | None = None) -> list[str]:
        """Internal ids of every engine request of this tenant (all n>1 children), of one engine
        version when ``lora_id`` is given, else of all; marks their admissions as told to stop."""
        if lora_id is None:
            names = {a_name for a_name, t in self._by_engine_name.items() if t == tenant}
        else:
            names = {self._engine_name(tenant, lora_id)}
        ids = [rid for rid, st in compat.request_states(self.engine).items() if compat.state_lora_name(st) in names]
        for adm in self._rt(tenant).admissions:
            if lora_id is None or adm.lora_id == lora_id:
                adm.abort_sent = True
        return ids

    async def abort_lora_requests(self, name: str) -> int:
        self.require(name)
        ids = self._abort_sweep(name)
        await compat.abort_internal(self.engine, ids)
        return len(ids)

    async def _wait_drained(self, tenant: str | None) -> bool:
        try:
            await asyncio.wait_for(self._rt(tenant).drained.wait(), self.drain_timeout_s)
            return True
        except TimeoutError:
            logger.error("requests of %r did not drain within %.0f s", tenant, self.drain_timeout_s)
            return False

    async def pause(self, name: str | None, owner: str, lease_s: float) -> tuple[int, bool]:
        """Close the gate and abort in-flight requests in one loop step; returns (aborted, drained)."""
        if name is None:
            if self.gates.close(None, owner, lease_s):
                await compat.pause_engine(self.engine)
            return 0, True
        self.require(name)
        self.gates.close(name, owner, lease_s)
        ids = self._abort_sweep(name)  # no await between closing the gate and this sweep
        await compat.abort_internal(self.engine, ids)
        return len(ids), await self._wait_drained(name)

    def resume(self, name: str | None, owner: str | None) -> bool:
        """Returns whether the gate is still closed (other owners hold it)."""
        if name is not None and name not in self.tenants:
            return False
        return not self.gates.open(name, owner)

    def _on_reopen(self, key: str | None) -> None:
        if key is None:
            self._background.spawn(compat.resume_engine(self.engine), name="resume-engine")

    # ------------------------------------------------------------------ adapters
    def _check_path(self, path: str, *, must_exist: bool = True) -> str:
        real = Path(path).resolve()
        if self.adapter_roots and not any(real.is_relative_to(root) for root in self.adapter_roots):
            raise LoraError(403, f"lora_path '{path}' is outside the configured adapter roots", "lora_path")
        if not must_exist:
            return str(real)
        try:
            read_adapter_config(real)  # a missing or unreadable config is refused before anything else
        except AdapterCheckError as exc:
            raise LoraError(exc.status, exc.message, exc.field) from exc
        return str(real)

    def _read_version(self, path: str, load_from: str | None, max_rank: int | None
                      ) -> tuple[str, str, ImageManifest | None]:
        """(path, where to read it now, its slot image manifest or None for peft files) of a version
        :meth:`stage` was given, each path resolved inside the adapter roots and the adapter config
        read once (a missing or unreadable one is refused before anything else; an image's is
        checked whole). Blocking: runs off the loop. Raises LoraError naming ``lora_path``."""
        real = self._check_path(path, must_exist=False)
        source = self._check_path(load_from, must_exist=False) if load_from is not None else real
        try:
            config = read_adapter_config(Path(source))
            manifest = read_manifest(Path(source))
            if manifest is not None:
                validate_adapter_config(Path(source), config, self._model_shape, max_rank)
        except ValueError as exc:
            raise LoraError(400, f"lora_path '{source}': {exc}", "lora_path") from exc
        except AdapterCheckError as exc:
            raise LoraError(exc.status, exc.message, exc.field) from exc
        return real, source, manifest

    # ------------------------------------------------------------------ staging (off the engine loop)
    async def stage(self, name: str, path: str, *, mode: str = "abort", load_from: str | None = None,
                    off_loop: bool | None = None, upload_id: str | None = None, arm: bool = False) -> StagedAdapter:
        """Check the adapter and load it on every worker off the engine's step loop; nothing serves it
        until :meth:`commit`. A bad adapter is refused here (400 naming ``lora_path``) and freed.
        ``load_from``: the same adapter somewhere faster to read now (shared memory); ``path`` is
        where it is kept for good, which the engine (after an eviction) and the manifest use.
        ``upload_id``: files sent to this server (``uploads.py``); this server keeps the version there.
        ``arm``: the caller commits it at once, holding the tenant's lock (:meth:`update`): an in-place
        version is then armed on a one-worker server (flipped in before the next step once staged)."""
        if upload_id is not None:
            try:
                path = str(self._upload_store().path(upload_id))
            except SkyrlError as exc:
                raise LoraError(exc.status, exc.message, exc.field) from exc
        t0 = time.perf_counter()
        max_rank = getattr(self._lora_cfg, "max_lora_rank", None)
        # the paths, the config and a slot image's manifest in one trip off the loop: a ready image's
        # shape is the plan's, and the workers check its values, so its config is all there is to check
        real, source, manifest = await asyncio.to_thread(self._read_version, path, load_from, max_rank)
        try:
            if manifest is None:
                await self.checker.check(Path(source), self._model_shape, max_rank)
            elif manifest.plan_digest != (await self.slot_plan()).digest:
                raise AdapterCheckError(source, "the slot image was laid out for another server layout "
                                        "(GET /skyrl/v1/slot_plan gives this server's)")
        except AdapterCheckError as exc:
            raise LoraError(exc.status, exc.message, exc.field) from exc
        old = self.tenants.get(name)
        if old is not None and mode == "inplace":
            lora_id, engine_name = old.lora_id, old.engine_name
            request = compat.make_lora_request(engine_name, lora_id, real, load_inplace=True)
        else:
            lora_id = next(self._ids)
            engine_name = self._engine_name(name, lora_id)
            request = compat.make_lora_request(engine_name, lora_id, real)
        on_workers = self.stage_off_loop if off_loop is None else off_loop
        checked_at = time.monotonic()
        if manifest is not None and not on_workers:
            raise LoraError(400, "off_loop: a slot image is staged on the workers; the engine's own load reads "
                            "peft files", "off_loop")
        armed = arm and on_workers and request.load_inplace and self._can_arm()
        if on_workers:
            await self._stage_on_workers(name, lora_id, engine_name, real, source, armed)
            staged_at: float | None = time.monotonic()
        else:
            staged_at = None
            request = compat.make_lora_request(engine_name, lora_id, source, load_inplace=request.load_inplace)
        staged = StagedAdapter(new_request_id("stage"), name, real, lora_id, request, mode, time.perf_counter() - t0,
                               on_workers, armed=armed, checked_at=checked_at, staged_at=staged_at)
        staged.expiry = asyncio.get_running_loop().call_later(
            self.staged_ttl_s, lambda: self._background.spawn(self.discard(staged.stage_id), name="staged-expiry"))
        self._staged[staged.stage_id] = staged
        logger.info("LoRA %s staged from %s in %.3f s (%s)", name, source, staged.staging_s, staged.stage_id)
        return staged

    async def slot_plan(self) -> SlotPlanResponse:
        if self._slot_plan is None:
            raw = await compat.slot_plan(self.engine)
            plan = BuildPlan.model_validate_json(raw) if raw is not None else None
            self._slot_plan = SlotPlanResponse(plan=plan, digest=plan_digest(plan) if plan is not None else None)
        return self._slot_plan

    def _can_arm(self) -> bool:
        """Whether versions may be armed: switched on, and one worker (several would each flip at their own next
        step, which need not be the same one), known through the stage channel."""
        return self.armed_flips and self.channel is not None and len(self.channel.workers) == 1

    async def _stage_on_workers(self, name: str, lora_id: int, engine_name: str, real: str, source: str,
                                arm: bool = False) -> None:
        with self.channel.expect(lora_id) if self.channel is not None else contextlib.nullcontext() as expected:
            await self._stage_and_wait(name, lora_id, engine_name, real, source, expected, arm)

    async def _stage_and_wait(self, name: str, lora_id: int, engine_name: str, real: str, source: str,
                              expected: Expected | None, arm: bool = False) -> None:
        """Every ``collective_rpc`` is answered by the engine core between two steps. With a stage
        channel the command goes to the workers directly and their notices say when it is done, so
        the engine's loop is not involved; the workers are asked only if the notices are late."""
        channel = self.channel
        command = StageCommand(lora_int_id=lora_id, lora_name=engine_name, lora_path=real, source=source, arm=arm)
        direct = channel is not None and channel.direct and channel.send(command)
        if not direct:
            await compat.stage_lora(self.engine, lora_id, engine_name, real, source, arm)
        deadline = time.monotonic() + self.stage_timeout_s
        while True:
            outcome, heard = None, False
            if expected is not None and channel is not None:
                try:
                    await asyncio.wait_for(expected.event.wait(),
                                           min(STAGE_BACKSTOP_S, max(0.0, deadline - time.monotonic())))
                    heard = True
                except TimeoutError:
                    pass
                expected.event.clear()
                outcome = expected.outcome(real, len(channel.workers))
            if outcome is None and not heard:  # no channel, or the notices are late: ask the workers
                self.stage_asks += 1
                statuses = await compat.stage_status(self.engine, lora_id, real)
                if direct and NOT_STAGED in statuses:  # a command datagram was lost: send it the engine's way
                    direct = False
                    await compat.stage_lora(self.engine, lora_id, engine_name, real, source, arm)
                    continue
                failed = [st for st in statuses if st not in (None, "ok")]
                outcome = failed[0] if failed else "ok" if all(st == "ok" for st in statuses) else None
            if outcome is not None and outcome != "ok":
                await compat.discard_staged(self.engine, lora_id, real)
                raise LoraError(400, f"lora_path: LoRA '{name}' failed to load from '{source}': {outcome}", "lora_path")
            if outcome == "ok":
                return
            if time.monotonic() > deadline:
                await compat.discard_staged(self.engine, lora_id, real)
                raise LoraError(504, f"lora_path: staging '{real}' took over {self.stage_timeout_s:.0f} s", "lora_path")
            if expected is None:
                await asyncio.sleep(STAGE_POLL_S)

    async def discard(self, stage_id: str) -> bool:
        """Free a staged version that will not be committed; False if there is none by that id."""
        staged = self._staged.pop(stage_id, None)
        if staged is None:
            return False
        if staged.expiry is not None:
            staged.expiry.cancel()
        if staged.on_workers:
            await compat.discard_staged(self.engine, staged.lora_id, staged.path)
        self._free_upload(staged.path)
        return True

    async def _engine_add(self, request: Any, name: str) -> None:
        try:
            ok = await self.engine.add_lora(request)
        except Exception as exc:  # vLLM raises plain exceptions for bad adapters
            raise LoraError(400, f"lora_path: LoRA '{name}' failed to load from '{request.lora_path}': {exc}",
                            "lora_path") from exc
        if ok is False:
            raise LoraError(400, f"lora_path: LoRA '{name}' failed to load from '{request.lora_path}'", "lora_path")

    def _free_upload(self, path: str | None) -> None:
        """An uploaded version nothing serves or stages any more is freed (other paths are not ours)."""
        if self.uploads is not None and path is not None and path not in self.paths_in_use():
            self.uploads.remove(path)

    def paths_in_use(self) -> set[str]:
        return ({a.path for a in self.tenants.values()} | {s.path for s in self._staged.values()}
                | {a.path for a in self._retiring.values()})

    def _upload_store(self) -> UploadStore:
        if self.uploads is None:
            raise LoraError(400, "upload_id: this server takes no uploads", "upload_id")
        return self.uploads

    async def receive_upload(self, upload_id: str, filename: str, chunks: AsyncIterator[bytes]) -> int:
        return await self._upload_store().receive(upload_id, filename, chunks, self.paths_in_use())

    async def _remove_engine_lora(self, lora_id: int) -> None:
        retired = self._retiring.pop(lora_id, None)
        if retired is None:
            return
        self._free_upload(retired.path)
        self._by_engine_name.pop(retired.engine_name, None)
        try:
            await self.engine.remove_lora(lora_id)
        except Exception:  # an engine that already evicted it is fine
            logger.debug("remove_lora(%d) failed", lora_id, exc_info=True)

    def _engine_name(self, name: str, lora_id: int) -> str:
        return f"{name}{VERSION_SEP}{lora_id}"

    async def load(self, name: str, path: str, *, load_inplace: bool = True,
                   mode: str = "abort") -> tuple[TenantAdapter, int, float]:
        """Load or replace a tenant's adapter: :meth:`stage`, then :meth:`commit`.
        Returns (adapter, aborted, seconds the engine spent on it at the flip)."""
        real = await asyncio.to_thread(self._check_path, path)  # reads the config: off the loop
        old = self.tenants.get(name)
        if old is not None and not load_inplace and old.path == real:
            return old, 0, 0.0  # a retried create of what is already there: nothing to do
        if old is not None and not load_inplace:
            raise LoraError(409, f"LoRA '{name}' is already loaded; pass load_inplace=true to replace it", "lora_name")
        return await self.update(name, real, mode=mode)

    async def update(self, name: str, path: str, *, mode: str = "abort", load_from: str | None = None,
                     off_loop: bool | None = None) -> tuple[TenantAdapter, int, float]:
        """:meth:`stage`, then :meth:`commit` (one server's whole sync). An in-place version of a
        tenant is staged and committed under the tenant's lock, so that it can be armed: nothing
        else changes the tenant between the worker arming it and the commit recording it."""
        if mode == "inplace" and name in self.tenants and self._can_arm():
            async with self._lock(name):
                staged = await self.stage(name, path, mode=mode, load_from=load_from, off_loop=off_loop, arm=True)
                return await self._flip(self._take_staged(staged.stage_id))
        staged = await self.stage(name, path, mode=mode, load_from=load_from, off_loop=off_loop)
        return await self.commit(staged.stage_id)

    def _take_staged(self, stage_id: str) -> StagedAdapter:
        staged = self._staged.pop(stage_id, None)
        if staged is None:
            raise LoraError(404, f"stage_id '{stage_id}' is unknown (never staged, expired or already used)", "stage_id")
        if staged.expiry is not None:
            staged.expiry.cancel()
        return staged

    async def commit(self, stage_id: str) -> tuple[TenantAdapter, int, float]:
        """Flip a tenant to a staged version. Returns (adapter, aborted, seconds the engine spent).

        ``abort``: the new version is registered beside the old one, then in one loop step the tenant's
        name points at it and every request still on the old version is aborted (its client continues
        it on the new weights). ``inplace``: one in-place engine load under the same engine id;
        running requests pick the new weights up mid-generation; an armed version is flipped in by
        the worker before its next step (the engine's loop sees no call).
        """
        staged = self._take_staged(stage_id)
        async with self._lock(staged.name):
            return await self._flip(staged)

    async def _flip(self, staged: StagedAdapter) -> tuple[TenantAdapter, int, float]:
        """:meth:`commit`'s work, the tenant's lock held."""
        name, real = staged.name, staged.path
        old = self.tenants.get(name)
        t0 = time.perf_counter()
        if old is not None and staged.mode == "inplace" and old.lora_id == staged.lora_id:
            if not staged.armed:
                await self._engine_add(staged.request, name)
            load_s = time.perf_counter() - t0
            new = TenantAdapter(name, old.version + 1, old.lora_id, real,
                                compat.make_lora_request(old.engine_name, old.lora_id, real), staged.staging_s,
                                _timeline(staged))
            self.tenants[name] = new
            self._free_upload(old.path)
            await self._changed(name, real)
            return new, 0, load_s
        request = staged.request
        if getattr(request, "load_inplace", False):  # staged in place, but the tenant changed since
            if staged.on_workers:
                await compat.discard_staged(self.engine, staged.lora_id, staged.path)
            self._free_upload(staged.path)
            raise LoraError(409, f"LoRA '{name}' changed since this version was staged in place", "stage_id")
        engine_name = request.lora_name
        await self._engine_add(request, name)
        load_s = time.perf_counter() - t0
        new = TenantAdapter(name, (old.version + 1) if old else 1, staged.lora_id, real, request, staged.staging_s,
                            _timeline(staged))
        # --- one loop step: flip the name, sweep the old version's requests
        self._by_engine_name[engine_name] = name
        self.tenants[name] = new
        aborted = 0
        if old is not None:
            self._retiring[old.lora_id] = old
            ids = self._abort_sweep(name, old.lora_id)
            aborted = len(ids)
            # ---
            await compat.abort_internal(self.engine, ids)
            if not any(a.lora_id == old.lora_id for a in self._rt(name).admissions):
                # not awaited: the engine answers it between two steps, and the new version serves
                # already (under load that wait was a step, ~20 ms at 8B, on every sync's reply);
                # the task sends it on the loop's next turn, ahead of any later sync's calls
                self._background.spawn(self._remove_engine_lora(old.lora_id), name=f"remove-lora-{old.lora_id}")
        else:  # a new tenant: its name goes into vLLM's model list (later versions keep the name)
            await self._list_name(new)
        logger.info("LoRA %s -> v%d (%s), %d requests moved to the new version", name, new.version, real, aborted)
        await self._changed(name, real)
        return new, aborted, load_s

    async def unload(self, name: str) -> None:
        adapter = self.require(name)
        async with self._lock(name):
            self.gates.close(name, "unload", 60.0)
            ids = self._abort_sweep(name)
            await compat.abort_internal(self.engine, ids)
            await self._wait_drained(name)
            del self.tenants[name]
            self._free_upload(adapter.path)
            await self._unlist_name(name)
            for engine_name in [n for n, t in self._by_engine_name.items() if t == name]:
                del self._by_engine_name[engine_name]
            for lora_id in [i for i, a in self._retiring.items() if a.name == name] + [adapter.lora_id]:
                retired = self._retiring.pop(lora_id, None)
                if retired is not None:
                    self._free_upload(retired.path)
                try:
                    await self.engine.remove_lora(lora_id)
                except Exception:
                    logger.debug("remove_lora(%d) failed", lora_id, exc_info=True)
            self.gates.forget(name)
            await self._changed(name, None)

    async def _changed(self, name: str, path: str | None) -> None:
        if self.on_change is None:
            return
        try:
            await self.on_change(name, path)
        except Exception:  # bookkeeping must never fail the change itself
            logger.exception("recording the change of LoRA %s failed", name)

    # ------------------------------------------------------------------ state
    def info(self, name: str) -> LoraInfo:
        a = self.require(name)
        rt = self._rt(name)
        admissions = rt.admissions
        return LoraInfo(name=a.name, version=a.version, path=a.path, in_flight=len(admissions), waiting=rt.waiting,
                        in_flight_tokens=sum(adm.tokens for adm in admissions), paused_by=self.gates.owners(name))

    def state(self) -> ServerState:
        return ServerState(
            loras=[self.info(n) for n in sorted(self.tenants)],
            engine_paused_by=self.gates.owners(None),
            in_flight=sum(len(rt.admissions) for rt in self._runtime.values()),
            staged=len(self._staged),
            stage_asks=self.stage_asks,
            stage_notices=self.channel.received if self.channel is not None else None,
            stage_commands=self.channel.commands if self.channel is not None else 0,
            node=self.node,
        )

    async def staged_on_workers(self) -> int:
        """Versions the workers hold staged (nothing once every stage was committed or discarded)."""
        return await compat.staged_count(self.engine)


def new_request_id(prefix: str = "skyrl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _timeline(staged: StagedAdapter) -> SyncTimeline:
    """The sync of ``staged``, flipped now (the route that received it adds when)."""
    return SyncTimeline(checked=staged.checked_at, staged=staged.staged_at, flipped=time.monotonic())
