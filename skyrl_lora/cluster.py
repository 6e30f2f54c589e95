"""Bring skyrl_lora's inference servers up on Ray (an existing cluster or a local one) and down again."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig

logger = logging.getLogger(__name__)


@dataclass
class InferenceCluster:
    actors: list[Any] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def client(self, **kwargs: Any) -> RemoteInferenceClient:
        return RemoteInferenceClient(self.urls, **kwargs)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a running cluster when one is there (``ray start --head`` / ``ray job submit``), else start one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    try:
        ray.init(address="auto", log_to_driver=False)
    except (ConnectionError, RuntimeError):
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)


@contextmanager
def inference_servers(model: str, loras: Mapping[str, str], *, num_servers: int = 1, num_gpus_per_server: float = 0,
                      **config: Any) -> Iterator[InferenceCluster]:
    """Start ``num_servers`` vLLM server actors with the given LoRAs; stop them on exit."""
    connect_ray()
    cluster = InferenceCluster()
    server_config = ServerConfig(model=model, loras=dict(loras), **config)
    try:
        for i in range(num_servers):
            actor, url = start_server_actor(server_config, num_gpus=num_gpus_per_server, num_cpus=1)
            cluster.actors.append(actor)
            cluster.urls.append(url)
            logger.info("inference server %d at %s", i, url)
        yield cluster
    finally:
        for actor in cluster.actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception:
                logger.warning("server actor did not shut down cleanly", exc_info=True)
            ray.kill(actor)
