"""The system's configuration: one pydantic-settings model, from a YAML file and ``SKYRL_*`` variables.

Everything that can be checked before anything starts is checked here (``check``): the model path,
tenants' ranks against the servers' max LoRA rank, GPUs asked for against GPUs the cluster has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from skyrl_lora.errors import SkyrlError

MiB = 1 << 20


class ConfigError(SkyrlError):
    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(400, message, field_name)


class DemoTenant(BaseModel):
    """A tenant of the RL demo: rewarded for saying ``target`` after the prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1, description="the text whose first token, sampled next, earns reward 1")
    rank: int = Field(8, ge=1, le=1024)


# Verifiable tasks the tiny model starts out bad at (the target's first token has p≈0.05 after the prompt).
DEFAULT_TENANTS = (DemoTenant(name="alice", prompt="def main():\n    return", target=" self"),
                   DemoTenant(name="bob", prompt="class Foo", target=","),
                   DemoTenant(name="carol", prompt="raise", target="."))


class SkyrlConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKYRL_", env_nested_delimiter="__", extra="forbid", frozen=True)

    # model
    base_model: str | None = Field(None, description="local HF model directory; None = build the tiny model here")
    model_name: str | None = Field(None, description="name API clients use (default: the local path)")
    # inference
    num_inference_servers: int = Field(1, ge=1, le=64)
    gpus_per_server: float = Field(0, ge=0)
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int = Field(32, ge=1)
    max_lora_rank: int = Field(32, ge=1, le=1024)
    max_model_len: int = Field(1024, ge=16)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    server_max_restarts: int = Field(3, ge=0, description="Ray restarts a crashed server this often; it comes back "
                                     "at its address with every tenant's current adapter")
    inference_token: str | None = Field(None, description="bearer token of the inference servers (default: a random "
                                        "one per deployment, handed to the trainer and the API)")
    # training
    trainer_gpus: float = Field(0, ge=0)
    trainer_base_weights: Literal["own", "shared", "shared_or_own"] = Field(
        "own", description="'shared': the trainer builds its base model on views of inference server 0's GPU weights "
        "(one copy of the base per GPU; the two share server 0's GPU); 'shared_or_own': share where possible, else "
        "a copy; 'own': always a copy")
    trainer_max_restarts: int = Field(3, ge=0, description="Ray restarts a crashed trainer this often; each tenant "
                                      "comes back from its last save_state")
    resident_budget_bytes: int = Field(512 * MiB, ge=0)
    cpu_budget_bytes: int = Field(2048 * MiB, ge=0)
    disk_budget_bytes: int | None = Field(None, ge=0)
    # storage, API, tenants
    data_dir: Path = Path("skyrl_data")
    database_url: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_keys: dict[str, str] = Field(default_factory=dict, description="tml-... key -> user")
    adapter_roots: tuple[str, ...] = Field((), description="servers load adapters only from here (default: data_dir)")
    ray_address: str = Field("auto", description="'auto' = join a running cluster, else start one; 'local' = always start one")
    server_bind_host: str | None = Field(None, description="address inference servers bind; default: their node's "
                                         "IP in the Ray cluster (127.0.0.1 with ray_address 'local', where no other "
                                         "node can join)")
    server_advertise_host: str | None = Field(None, description="address servers announce to clients (default: the "
                                              "bound one; the node's IP when bound to 0.0.0.0)")
    tenants: tuple[DemoTenant, ...] = DEFAULT_TENANTS

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings  # load() drops file values the environment sets, so env wins over the file

    @model_validator(mode="after")
    def _ranks(self) -> SkyrlConfig:
        too_big = [t.name for t in self.tenants if t.rank > self.max_lora_rank]
        if too_big:
            raise ValueError(f"tenants {too_big} have a rank above max_lora_rank {self.max_lora_rank}")
        return self

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> SkyrlConfig:
        """YAML file, then ``SKYRL_*`` variables over it, then explicit overrides over both."""
        import os

        values: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config: no file at '{p}'", "config")
            loaded = yaml.safe_load(p.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config: '{p}' must hold a mapping of settings", "config")
            values.update(loaded)
        env_keys = {k[len("SKYRL_"):].lower() for k in os.environ if k.startswith("SKYRL_")}
        for key in env_keys & set(values):  # the environment wins over the file
            values.pop(key)
        values.update(overrides)
        try:
            return cls(**values)
        except Exception as exc:  # pydantic's message names the field
            raise ConfigError(f"config: {exc}", "config") from exc

    # ------------------------------------------------------------------ derived
    def model_path(self) -> str:
        """The base model's local path (building the tiny model when none is configured)."""
        if self.base_model is None:
            from skyrl_lora.models.tiny import build_fixtures

            return str(build_fixtures().base)
        return self.base_model

    def server_host(self) -> str | None:
        if self.server_bind_host is not None:
            return self.server_bind_host
        return "127.0.0.1" if self.ray_address == "local" else None

    def check(self, cluster_resources: dict[str, float] | None = None) -> None:
        """Refuse a configuration that cannot work, before anything is started."""
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            raise ConfigError(f"base_model: no HF model at '{self.base_model}' (config.json missing)", "base_model")
        if self.trainer_base_weights == "shared":
            self._check_sharing()
        if cluster_resources is not None:
            need = self.num_inference_servers * self.gpus_per_server + self.trainer_gpus
            have = float(cluster_resources.get("GPU", 0))
            if need > have:
                raise ConfigError(f"gpus_per_server: {self.num_inference_servers} server(s) × {self.gpus_per_server} GPU + "
                                  f"trainer {self.trainer_gpus} GPU = {need} GPUs, but the cluster has {have}",
                                  "gpus_per_server")

    def _check_sharing(self) -> None:
        """Refuse 'shared' base weights where they cannot be shared, before anything starts."""
        field = "trainer_base_weights"
        if self.gpus_per_server <= 0 or self.trainer_gpus <= 0:
            raise ConfigError(f"{field}: 'shared' needs GPU memory to share: the servers and the trainer run on the "
                              f"CPU (gpus_per_server={self.gpus_per_server}, trainer_gpus={self.trainer_gpus})", field)
        if self.gpus_per_server + self.trainer_gpus > 1:
            raise ConfigError(f"{field}: 'shared' puts the trainer on server 0's GPU: gpus_per_server + trainer_gpus "
                              f"must be at most 1 (got {self.gpus_per_server} + {self.trainer_gpus})", field)
        from transformers import AutoConfig

        from skyrl_lora.training.shared_base import SharingImpossible, check_shareable

        try:
            check_shareable(AutoConfig.from_pretrained(self.model_path()))
        except SharingImpossible as exc:
            raise ConfigError(f"{field}: 'shared' is impossible for this model: {exc}", field) from exc

    def roots(self) -> tuple[str, ...]:
        return self.adapter_roots or (str(Path(self.data_dir).resolve()),)
