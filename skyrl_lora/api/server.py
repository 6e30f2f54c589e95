"""Run the Tinker-compatible service: wire settings, trainer actor and inference servers into an app.

``ApiServer`` serves with uvicorn on its own thread and event loop (tests, the CLI's ``serve``),
so a caller can keep using blocking clients such as the tinker SDK beside it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any, cast

import uvicorn

from skyrl_lora.api.app import create_app
from skyrl_lora.api.db import Database
from skyrl_lora.api.hot_path import SamplingHotPath
from skyrl_lora.api.service import TinkerService
from skyrl_lora.api.settings import ApiSettings
from skyrl_lora.api.trainer_backend import RayTrainer
from skyrl_lora.inference.client import RemoteInferenceClient

logger = logging.getLogger(__name__)


def build_app(settings: ApiSettings, trainer: Any, inference_urls: list[str]) -> tuple[SamplingHotPath, TinkerService]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    service = TinkerService(settings, RayTrainer(trainer), RemoteInferenceClient(inference_urls, token=settings.inference_token),
                            db)
    service.startup()

    async def metrics() -> str:
        return cast(str, await trainer.metrics_text.remote())

    async def close() -> None:
        await service.shutdown()
        db.close()

    return create_app(service, metrics, close), service


class ApiServer:
    def __init__(self, settings: ApiSettings, trainer: Any, inference_urls: list[str], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        app, service = build_app(settings, trainer, inference_urls)
        self._setup(settings, app, service, host, port)

    @classmethod
    def of_app(cls, settings: ApiSettings, app: Any, service: TinkerService, *, host: str = "127.0.0.1",
               port: int = 0) -> ApiServer:
        """Serve an app built elsewhere (over another trainer backend, say a fake in unit tests)."""
        server = cls.__new__(cls)
        server._setup(settings, app, service, host, port)
        return server

    def _setup(self, settings: ApiSettings, app: Any, service: TinkerService, host: str, port: int) -> None:
        self.settings = settings
        self.app, self.service = app, service
        self.host = host
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.port = port
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                     timeout_keep_alive=30))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ApiServer:
        self._thread = threading.Thread(target=self._server.run, name="skyrl-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"API server did not start on {self.url} within {timeout_s} s")
            time.sleep(0.02)
        logger.info("Tinker-compatible API on %s", self.url)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def serve_forever(self) -> None:
        """Serve on the calling thread until SIGINT/SIGTERM (uvicorn installs the handlers)."""
        asyncio.run(self._server.serve())


class ApiServerActor:
    """The API service in its own Ray actor process (its own GIL), as a cluster runs it."""

    def __init__(self, settings: ApiSettings, trainer: Any, inference_urls: list[str], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        logging.basicConfig(level=logging.INFO)
        self.server = ApiServer(settings, trainer, inference_urls, host=host, port=port).start()

    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


def start_api_actor(settings: ApiSettings, trainer: Any, inference_urls: list[str], *, host: str = "127.0.0.1",
                    port: int = 0, num_cpus: float = 0.5, name: str | None = None) -> tuple[Any, str]:
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus}
    if name is not None:
        options["name"] = name
    # Any: ray's typed ActorHandle gives ``.remote`` only to methods decorated with @ray.method
    actor: Any = ray.remote(ApiServerActor).options(**options).remote(settings, trainer, inference_urls, host, port)
    url: str = ray.get(actor.url.remote(), timeout=120)
    return actor, url
