"""The system's configuration: one pydantic-settings model, from a YAML file and ``SKYRL_*`` variables
(``SKYRL_SERVER__MAX_LORAS=16`` for a section's key).

It is made of the settings models the components take (``ServerSettings``, ``TrainerSettings``,
``ApiOptions``), so nothing is copied from it field by field and a shared value lives in one place.
Everything that can be checked before anything starts is checked here (``check``): the model path,
tenants' ranks against the servers' max LoRA rank, GPUs asked for against GPUs the cluster has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from skyrl_lora.api.settings import ApiOptions
from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.server import ServerSettings
from skyrl_lora.training.config import TrainerSettings

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


class ServerSection(ServerSettings):
    """The servers' part of ``SkyrlConfig``: ``ServerSettings``, handed to every server as they are, plus how a
    deployment places them. Its defaults leave room for more tenants than a lone server a test starts."""

    count: int = Field(1, ge=1, le=64, description="inference servers, one Ray actor each")
    gpus: float = Field(0, ge=0, description="GPUs per server (a fraction shares a GPU)")
    max_restarts: int = Field(3, ge=0, description="Ray restarts a crashed server this often; it comes back at its "
                              "address with every tenant's current adapter")
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int | None = Field(32, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)


class TrainerSection(TrainerSettings):
    """The trainer's part of ``SkyrlConfig``: ``TrainerSettings``, handed on as they are, plus its placement."""

    gpus: float = Field(0, ge=0)
    max_restarts: int = Field(3, ge=0, description="Ray restarts a crashed trainer this often; each tenant comes "
                              "back from its last save_state")


class ApiSection(ApiOptions):
    """The API's part of ``SkyrlConfig``: ``ApiOptions``, handed on as they are, plus where it listens."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


def settings_of(section: BaseModel, settings: type[BaseModel], **derived: Any) -> dict[str, Any]:
    """The component's own settings out of its section (not its placement), ready to construct its config
    from; ``derived`` replaces values a deployment works out from the user's own (a bind host's default)."""
    return {**{name: getattr(section, name) for name in settings.model_fields}, **derived}


# Settings of the flat layout before the sections (and ApiSettings' own SKYRL_API_* variables), refused with
# their new place named: silently ignoring SKYRL_API_KEYS would serve an API nobody can log in to.
MOVED = {"model_name": "api.model_name", "num_inference_servers": "server.count", "gpus_per_server": "server.gpus",
         "max_loras": "server.max_loras", "max_cpu_loras": "server.max_cpu_loras",
         "gpu_memory_utilization": "server.gpu_memory_utilization", "server_max_restarts": "server.max_restarts",
         "server_bind_host": "server.host", "server_advertise_host": "server.advertise_host",
         "trainer_gpus": "trainer.gpus", "trainer_base_weights": "trainer.base_weights",
         "trainer_max_restarts": "trainer.max_restarts", "resident_budget_bytes": "trainer.resident_budget_bytes",
         "cpu_budget_bytes": "trainer.cpu_budget_bytes", "disk_budget_bytes": "trainer.disk_budget_bytes",
         "database_url": "api.database_url", "api_keys": "api.api_keys", "api_host": "api.host", "api_port": "api.port",
         **{f"api_{name}": f"api.{name}" for name in ApiOptions.model_fields},
         "api_base_model": "base_model", "api_max_context_length": "max_model_len", "api_data_dir": "data_dir",
         "api_inference_token": "inference_token"}


SECTIONS = ("server", "trainer", "api")


def env_name(dotted: str) -> str:
    return "SKYRL_" + dotted.replace(".", "__").upper()


class SkyrlConfig(BaseSettings):
    """A deployment's settings: one section per component (``server``, ``trainer``, ``api``), each the
    settings model that component takes (plus where Ray places it), and at the top what is deployment-wide
    or shared. ``load`` reads a file and the environment; ``SkyrlConfig(...)`` is exactly its arguments.

    A value several components need is set once, at the top, and no section has a field for it:

    * ``base_model`` (its path) is ``ServerConfig.model``, ``TrainerConfig.base_model``, ``ApiSettings.base_model``;
    * ``max_lora_rank`` is the servers' and the trainer's ``max_lora_rank`` (and bounds the tenants' ranks);
    * ``max_model_len`` is the servers' ``max_model_len`` and the API's ``max_context_length``;
    * ``inference_token`` is the servers' ``control_token`` and the trainer's and the API's ``inference_token``;
    * ``data_dir`` holds the servers' ``state_dir``, the trainer's directories and the API's ``data_dir``.

    ``cluster.server_config`` / ``trainer_config`` / ``api_settings`` build each component's config from
    its section and these, nothing else.
    """

    model_config = SettingsConfigDict(env_prefix="SKYRL_", env_nested_delimiter="__", extra="forbid", frozen=True)

    # shared by the components
    base_model: str | None = Field(None, description="local HF model directory; None = build the tiny model here")
    max_lora_rank: int = Field(32, ge=1, le=1024)
    max_model_len: int = Field(1024, ge=16)
    inference_token: str | None = Field(None, description="bearer token of the inference servers (default: a random "
                                        "one per deployment, handed to the trainer and the API)")
    # deployment-wide
    data_dir: Path = Path("skyrl_data")
    adapter_roots: tuple[str, ...] = Field((), description="servers load adapters only from here (default: data_dir)")
    ray_address: str = Field("auto", description="'auto' = join a running cluster, else start one; 'local' = always start one")
    tenants: tuple[DemoTenant, ...] = DEFAULT_TENANTS
    # the components
    server: ServerSection = Field(default_factory=ServerSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    api: ApiSection = Field(default_factory=ApiSection)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what is passed: load() reads the environment itself, so that it can put it between the file and
        # the overrides key by key; pydantic-settings would merge a dict-valued setting (api_keys) given both
        # ways instead of replacing it. SkyrlConfig(...) is exactly its arguments, whatever the environment.
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        moved = [f"'{k}' is now '{MOVED[k]}'" for k in data if k in MOVED] if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"settings moved into sections: {', '.join(moved)}")
        return data

    @model_validator(mode="after")
    def _ranks(self) -> SkyrlConfig:
        too_big = [t.name for t in self.tenants if t.rank > self.max_lora_rank]
        if too_big:
            raise ValueError(f"tenants {too_big} have a rank above max_lora_rank {self.max_lora_rank}")
        return self

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> SkyrlConfig:
        """YAML file, then ``SKYRL_*`` variables over it, then explicit overrides over both; key by key inside
        a section, so ``SKYRL_SERVER__MAX_LORAS`` or ``server={"max_loras": 4}`` leaves the file's other
        server settings standing."""
        import os

        values: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config: no file at '{p}'", "config")
            loaded = yaml.safe_load(p.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config: '{p}' must hold a mapping of settings", "config")
            values = loaded
        stale = [f"{env_name(old)} is now {env_name(new)}" for old, new in MOVED.items() if env_name(old) in os.environ]
        if stale:
            raise ConfigError(f"config: settings moved into sections: {', '.join(stale)}", "config")
        try:
            return cls(**_merged(_merged(values, EnvSettingsSource(cls)()), overrides))
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
        """Where servers bind: a Ray of this process's own ('local') has no other node to be reached from."""
        if self.server.host is not None:
            return self.server.host
        return "127.0.0.1" if self.ray_address == "local" else None

    def check(self, cluster_resources: dict[str, float] | None = None) -> None:
        """Refuse a configuration that cannot work, before anything is started."""
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            raise ConfigError(f"base_model: no HF model at '{self.base_model}' (config.json missing)", "base_model")
        if self.trainer.base_weights == "shared":
            self._check_sharing()
        if cluster_resources is not None:
            server, trainer = self.server, self.trainer
            need = server.count * server.gpus + trainer.gpus
            have = float(cluster_resources.get("GPU", 0))
            if need > have:
                raise ConfigError(f"server.gpus: {server.count} server(s) × {server.gpus} GPU + trainer "
                                  f"{trainer.gpus} GPU = {need} GPUs, but the cluster has {have}", "server.gpus")

    def _check_sharing(self) -> None:
        """Refuse 'shared' base weights where they cannot be shared, before anything starts."""
        field = "trainer.base_weights"
        server_gpus, trainer_gpus = self.server.gpus, self.trainer.gpus
        if server_gpus <= 0 or trainer_gpus <= 0:
            raise ConfigError(f"{field}: 'shared' needs GPU memory to share: the servers and the trainer run on the "
                              f"CPU (server.gpus={server_gpus}, trainer.gpus={trainer_gpus})", field)
        if server_gpus + trainer_gpus > 1:
            raise ConfigError(f"{field}: 'shared' puts the trainer on server 0's GPU: server.gpus + trainer.gpus "
                              f"must be at most 1 (got {server_gpus} + {trainer_gpus})", field)
        from transformers import AutoConfig

        from skyrl_lora.training.shared_base import SharingImpossible, check_shareable

        try:
            check_shareable(AutoConfig.from_pretrained(self.model_path()))
        except SharingImpossible as exc:
            raise ConfigError(f"{field}: 'shared' is impossible for this model: {exc}", field) from exc

    def roots(self) -> tuple[str, ...]:
        return self.adapter_roots or (str(Path(self.data_dir).resolve()),)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``, key by key inside a section (a section given in both keeps ``base``'s other keys);
    any other value, a dict-valued setting too, is replaced whole."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if key in SECTIONS and isinstance(old, dict) and isinstance(value, dict):
            out[key] = {**old, **value}
        else:
            out[key] = value
    return out
