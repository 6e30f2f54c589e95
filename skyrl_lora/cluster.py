"""Bring skyrl_lora's inference servers up on Ray (an existing cluster or a local one) and down again."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from skyrl_lora.api.settings import ApiOptions, ApiSettings
from skyrl_lora.config import SkyrlConfig, settings_of
from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.server import ServerConfig, ServerSettings
from skyrl_lora.training.config import SamplerDtype, TrainerConfig, TrainerSettings

logger = logging.getLogger(__name__)

NAMESPACE = "skyrl_lora"


@dataclass
class InferenceCluster:
    """Running servers: their actors, their URLs and the bearer token they require (None = none)."""

    actors: list[Any] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    token: str | None = None

    def client(self, **kwargs: Any) -> RemoteInferenceClient:
        """A client of these servers carrying their token: how our own code reaches them, never through
        the environment."""
        return RemoteInferenceClient(self.urls, token=self.token, **kwargs)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a running cluster when one is there (``ray start --head`` / ``ray job submit``), else start one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, namespace=NAMESPACE)
        return
    try:
        ray.init(address="auto", log_to_driver=False, namespace=NAMESPACE)
    except (ConnectionError, RuntimeError):
        start_local_ray(num_cpus)


def start_local_ray(num_cpus: int | None = None, namespace: str | None = NAMESPACE) -> None:
    """A single-node Ray of this process's own (never one a ``ray start`` left running)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False, namespace=namespace)


@contextmanager
def inference_servers(model: str, loras: Mapping[str, str], *, num_servers: int = 1, num_gpus_per_server: float = 0,
                      **config: Any) -> Iterator[InferenceCluster]:
    """Start ``num_servers`` vLLM server actors with the given LoRAs; stop them on exit."""
    connect_ray()
    server_config = ServerConfig(model=model, loras=dict(loras), **config)
    cluster = InferenceCluster(token=server_config.control_token)
    try:
        for i in range(num_servers):
            actor, url = start_server_actor(server_config, num_gpus=num_gpus_per_server, num_cpus=1)
            cluster.actors.append(actor)
            cluster.urls.append(url)
            logger.info("inference server %d at %s", i, url)
        yield cluster
    finally:
        stop_servers(cluster.actors)


def stop_servers(actors: list[Any]) -> None:
    """Shut each server actor down (its engine and uvicorn), then kill it whatever happened."""
    for actor in actors:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        except Exception:
            logger.warning("server actor did not shut down cleanly", exc_info=True)
        ray.kill(actor)


TRAINER_NAME = "skyrl-trainer"
API_NAME = "skyrl-api"


def server_name(i: int) -> str:
    return f"skyrl-vllm-{i}"


@dataclass
class SkyrlSystem:
    """Handles of a running system: inference servers, the trainer, and (when served) the API."""

    config: SkyrlConfig
    model: str
    inference: InferenceCluster
    trainer: Any
    api: Any = None
    api_url: str | None = None
    placement_group: Any = None


def init_ray(config: SkyrlConfig) -> None:
    """Join or start Ray as the configuration says ('auto', 'local' or an address); idempotent."""
    if ray.is_initialized():
        return
    if config.ray_address == "local":
        start_local_ray()
    else:
        connect_ray(None if config.ray_address == "auto" else config.ray_address)


@dataclass(frozen=True)
class Deployment:
    """What one bring-up decides and no user sets: the model's local path, the servers' bearer token, the
    resolved data directory and the shared-memory root the trainer publishes to. With a ``SkyrlConfig`` it is
    all each component's config is made of (``server_config``, ``trainer_config``, ``api_settings``)."""

    model: str
    token: str
    data_dir: Path
    publish_root: Path | None = None


def server_config(config: SkyrlConfig, deployment: Deployment) -> ServerConfig:
    """Every server's config: the ``server`` section as it is, the shared values, this deployment's paths."""
    publish = deployment.publish_root
    return ServerConfig(**settings_of(config.server, ServerSettings, host=config.server_host()),
                        model=deployment.model, max_lora_rank=config.max_lora_rank, max_model_len=config.max_model_len,
                        adapter_roots=config.roots() + ((str(publish),) if publish else ()),
                        control_token=deployment.token, state_dir=str(deployment.data_dir / "servers"))


def trainer_config(config: SkyrlConfig, deployment: Deployment, inference_urls: Sequence[str], *,
                   serve_api: bool) -> TrainerConfig:
    """The trainer's config: the ``trainer`` section as it is, the shared values, the servers it syncs into.
    Behind the API every exported version stays (a sampler may be pinned to any); a bare run keeps 4."""
    data = deployment.data_dir
    return TrainerConfig(**settings_of(config.trainer, TrainerSettings), base_model=deployment.model,
                         max_lora_rank=config.max_lora_rank, state_dir=data / "trainer", sampler_root=data / "adapters",
                         publish_root=deployment.publish_root, keep_sampler_versions=1_000_000 if serve_api else 4,
                         inference_urls=tuple(inference_urls), inference_token=deployment.token,
                         share_from=server_name(0), sampler_dtype=sampler_dtype(config.server.dtype))


def sampler_dtype(server_dtype: str) -> SamplerDtype:
    """The servers' dtype for the trainer's sampler files, float32 where it is not named ('auto')."""
    named: dict[str, SamplerDtype] = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16",
                                      "float32": "float32", "float": "float32"}
    return named.get(server_dtype, "float32")


def api_settings(config: SkyrlConfig, deployment: Deployment) -> ApiSettings:
    """The API's settings: the ``api`` section as it is (less where it listens), the shared values."""
    return ApiSettings(**settings_of(config.api, ApiOptions), base_model=deployment.model,
                       data_dir=deployment.data_dir / "api", max_context_length=config.max_model_len,
                       inference_token=deployment.token)


@contextmanager
def skyrl_system(config: SkyrlConfig, *, serve_api: bool = False) -> Iterator[SkyrlSystem]:
    """Bring the whole system up on Ray and tear it down: checks first, then servers, trainer, API.

    With GPUs the servers and the trainer are placed through one placement group (a bundle each,
    spread over nodes), so a multi-node cluster gets one server per GPU slot it has room for.
    The driver's own clients come from ``system.inference.client()``, which carries the token.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from skyrl_lora.training.actor import start_trainer_actor

    config.check()  # the model path, before Ray is even touched
    init_ray(config)
    config.check(ray.cluster_resources())  # type: ignore[no-untyped-call]  # ray.cluster_resources is unannotated
    data = Path(config.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    # One bearer token per deployment: only the trainer, the API service and this driver may sample
    # from the servers directly, pause a tenant or load adapters; tenants go through the API.
    token = config.inference_token or secrets.token_urlsafe(24)
    shutil.rmtree(data / "servers", ignore_errors=True)  # restart manifests of an earlier deployment
    deployment = Deployment(model=config.model_path(), token=token, data_dir=data,
                            publish_root=shared_memory_root(token))
    system = SkyrlSystem(config=config, model=deployment.model, inference=InferenceCluster(token=token), trainer=None)
    servers, trainer = config.server, config.trainer
    gpu_bundles = [{"GPU": servers.gpus, "CPU": 1}] * servers.count if servers.gpus else []
    sharing = trainer.base_weights != "own" and bool(gpu_bundles) and trainer.gpus > 0
    if sharing and servers.gpus + trainer.gpus <= 1:  # the trainer joins server 0's GPU
        gpu_bundles[0] = {"GPU": servers.gpus + trainer.gpus, "CPU": 2}
    try:
        strategy = None
        if gpu_bundles:
            system.placement_group = placement_group(gpu_bundles, strategy="SPREAD")
            ray.get(system.placement_group.ready(), timeout=600)
        each_server = server_config(config, deployment)
        for i in range(servers.count):
            if system.placement_group is not None:
                strategy = PlacementGroupSchedulingStrategy(system.placement_group, placement_group_bundle_index=i)
            actor, url = start_server_actor(each_server, num_gpus=servers.gpus, num_cpus=1, name=server_name(i),
                                            scheduling_strategy=strategy, max_restarts=servers.max_restarts)
            system.inference.actors.append(actor)
            system.inference.urls.append(url)
            logger.info("inference server %d at %s", i, url)
        trainer_strategy = None
        if sharing and gpu_bundles[0]["GPU"] <= 1 and system.placement_group is not None:
            trainer_strategy = PlacementGroupSchedulingStrategy(system.placement_group, placement_group_bundle_index=0)
        system.trainer = start_trainer_actor(trainer_config(config, deployment, system.inference.urls,
                                                            serve_api=serve_api),
                                             num_gpus=trainer.gpus, name=TRAINER_NAME,
                                             max_restarts=trainer.max_restarts, scheduling_strategy=trainer_strategy)
        if serve_api:
            from skyrl_lora.api.server import start_api_actor

            system.api, system.api_url = start_api_actor(api_settings(config, deployment), system.trainer,
                                                         system.inference.urls, host=config.api.host,
                                                         port=config.api.port, name=API_NAME)
        yield system
    finally:
        _teardown(system)
        if deployment.publish_root is not None:
            shutil.rmtree(deployment.publish_root, ignore_errors=True)


def shared_memory_root(deployment: str) -> Path | None:
    """Where the trainer writes new adapter versions for the servers of its node to load: RAM
    (tmpfs), so a sync never waits for a disk. None where the machine has no /dev/shm."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return None
    import hashlib

    root = shm / "skyrl_lora" / hashlib.sha256(deployment.encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    return root


def _teardown(system: SkyrlSystem) -> None:
    from ray.util.placement_group import remove_placement_group

    if system.api is not None:
        try:
            ray.get(system.api.stop.remote(), timeout=30)
        except Exception:
            logger.warning("API actor did not stop cleanly", exc_info=True)
        ray.kill(system.api)
    if system.trainer is not None:
        ray.kill(system.trainer)
    stop_servers(system.inference.actors)
    if system.placement_group is not None:
        remove_placement_group(system.placement_group)
