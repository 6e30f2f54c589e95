"""VLLMServerActor: one inference server per Ray actor, reachable over HTTP by any client."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any

import ray

from skyrl_lora.actor_restart import call_self_after_restart
from skyrl_lora.inference.protocol import ServerIncarnation
from skyrl_lora.inference.server import EmbeddedVLLMServer, ServerConfig, vllm_env

logger = logging.getLogger(__name__)


class VLLMServerActor:
    """Runs vLLM's OpenAI server in-process (our routes beside it) inside a Ray async actor."""

    def __init__(self, config: ServerConfig) -> None:
        logging.basicConfig(level=logging.INFO)
        context = ray.get_runtime_context()
        self.server = EmbeddedVLLMServer(config, key=context.get_actor_id() or "server")
        # a dead engine ends the process: Ray restarts the actor (when it may), which serves again
        self.server.on_engine_death = lambda: os._exit(1)
        self._starting: asyncio.Task[str] | None = None
        # this run of the actor: a restart is another, with the base weights in other GPU memory
        self._incarnation = uuid.uuid4().hex
        if context.was_current_actor_reconstructed:
            # Ray restarted us after a crash: nobody else will call start(), so ask ourselves. With a
            # state_dir the server comes back at its old port with every tenant's current adapter.
            logger.warning("inference server actor restarted; starting the server again")
            self._restart_call = call_self_after_restart("start")

    async def start(self) -> str:
        if self._starting is None:  # idempotent: a restart's own call and a caller's may overlap
            self._starting = asyncio.ensure_future(self.server.start())
        return await asyncio.shield(self._starting)

    def url(self) -> str | None:
        return self.server.url

    def startup_seconds(self) -> float | None:
        return self.server.startup_s

    async def health(self) -> bool:
        if self.server.engine is None:
            return False
        await self.server.engine.check_health()
        return True

    def state(self) -> dict[str, Any]:
        return self.server.controller.state().model_dump() if self.server.controller else {}

    def memory(self) -> dict[str, float]:
        """Resident memory of this server's processes (the actor and vLLM's engine processes), bytes."""
        import psutil

        me = psutil.Process()
        out = {"server": float(me.memory_info().rss)}
        for child in me.children(recursive=True):
            try:
                key = f"child-{child.name()}"
                out[key] = out.get(key, 0.0) + float(child.memory_info().rss)
            except psutil.Error:
                continue
        return out

    def engine_pids(self) -> dict[int, str]:
        """pid -> command line of this server's engine processes (tests kill them)."""
        import psutil

        out: dict[int, str] = {}
        for child in psutil.Process().children(recursive=True):
            try:
                out[child.pid] = " ".join(child.cmdline()) or child.name()
            except psutil.Error:
                continue
        return out

    async def vllm_assumptions(self) -> list[str]:
        """The vLLM internals we rely on that do not hold here (empty when all do)."""
        return await self.server.vllm_assumptions()

    async def slot_digest(self, tenant: str) -> list[str | None]:
        """Per worker, a sha256 of the adapter slot serving the tenant (bit-for-bit comparisons)."""
        return await self.server.slot_digest(tenant)

    async def stage_timings(self) -> dict[str, list[float]]:
        """Recent flips from a slot image (the engine's own cost of a sync), loads and slot images, in ms."""
        return await self.server.stage_timings()

    async def flip_log(self) -> list[dict[str, Any]]:
        """The workers' recent armed flips, with their times (benchmarks)."""
        return await self.server.flip_log()

    def set_armed_flips(self, on: bool) -> None:
        """Armed flips on or off from now on (benchmarks compare both in one run)."""
        self.server.set_armed_flips(on)

    async def share_base_weights(self, path: str) -> dict[str, Any]:
        """CUDA IPC handles of the base weights, for a trainer on this GPU (see ``training/shared_base.py``),
        and which run of this actor they belong to."""
        return {**await self.server.share_weights(path), "incarnation": self._incarnation}

    def incarnation(self) -> ServerIncarnation:
        """Which run of this actor answers, and whether it serves (its engine holds the weights and its
        routes answer): a colocated trainer re-maps the weights when the run changes, once the new run
        serves, so that its next publication finds the routes up (``training/base_watch.py``)."""
        serving = self._starting is not None and self._starting.done() and not self._starting.cancelled() \
            and self._starting.exception() is None  # start() returned: the engine is up and its routes answer
        return ServerIncarnation(incarnation=self._incarnation, started=serving)

    def log_tail(self) -> str:
        return self.server.log_tail()

    async def shutdown(self) -> None:
        await self.server.stop()


def start_server_actor(config: ServerConfig, *, num_gpus: float = 0, num_cpus: float = 1,
                       name: str | None = None, max_restarts: int = 0, scheduling_strategy: Any = None
                       ) -> tuple[Any, str]:
    """Create the actor, start its server and return (handle, url). Raises with vLLM's log tail on failure."""
    actor_cls = ray.remote(VLLMServerActor)
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": max_restarts,
        "max_concurrency": 1000,
        "runtime_env": {"env_vars": vllm_env(config)},
    }
    if name is not None:
        options["name"] = name
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    # Any: ray's typed ActorHandle gives ``.remote`` only to methods decorated with @ray.method
    handle: Any = actor_cls.options(**options).remote(config)
    url: str = ray.get(handle.start.remote(), timeout=config.startup_timeout_s + 60)
    return handle, url
