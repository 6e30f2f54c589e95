"""Settings of the Tinker-compatible service. Plain models, read from no environment: a deployment's come from
``SkyrlConfig.api`` (the ``SKYRL_API__*`` variables), so there is one way in, not two."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiOptions(BaseModel):
    """What an operator tunes about the service. ``SkyrlConfig.api`` is one of these: ``ApiSettings`` adds
    only what one deployment decides (model path, context length, data directory, token)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str | None = Field(None, description="name clients pass as base_model; default: the local path, "
                                                     "which the SDK's get_tokenizer can load offline")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/skyrl_api.db")
    api_keys: dict[str, str] = Field(default_factory=dict, description="tml-... key -> user id (stored hashed)")
    long_poll_s: float = Field(10.0, gt=0, le=40.0, description="a retrieve_future waits this long before try_again")
    future_retention_s: float = Field(3600.0, ge=1.0, description="finished futures (results) are kept this long")
    turn_timeout_s: float = Field(120.0, gt=0)
    default_max_tokens: int = Field(256, ge=1)
    keep_ephemeral_samplers: int = Field(8, ge=1, description="pinned snapshot adapters kept loaded per model")

    @field_validator("api_keys")
    @classmethod
    def _tml_prefix(cls, keys: dict[str, str]) -> dict[str, str]:
        bad = [k[:8] + "…" for k in keys if not k.startswith("tml-") or len(k) < 12]
        if bad:
            raise ValueError(f"api_keys: keys must start with 'tml-' and be at least 12 characters ({bad})")
        return keys


class ApiSettings(ApiOptions):
    base_model: str = Field(description="local path of the served base model (what vLLM and the trainer load)")
    data_dir: Path = Field(Path("skyrl_api_data"), description="database, checkpoints and adapters live here")
    max_context_length: int = Field(2048, ge=16)
    inference_token: str | None = Field(None, description="the inference servers' bearer token, when they require one")

    @property
    def served_name(self) -> str:
        return self.model_name or self.base_model

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(Path(self.data_dir) / 'skyrl_api.db').resolve()}"
