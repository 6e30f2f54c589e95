"""JSON bodies of the Tinker wire contract (tinker SDK 0.38.0) that the service reads and writes.

Requests tolerate fields we do not use (the SDK adds ``type`` and may grow), but every field we use
is typed and bounded, so bad input is a 4xx naming the field. Responses carry what the SDK's models
require; it ignores extras.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skyrl_lora.api.paths import CHECKPOINT_NAME_PATTERN, CheckpointKind
from skyrl_lora.training.protocol import AdamParams

MAX_TOKENS_PER_REQUEST = 1 << 20


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# ---------------------------------------------------------------- sessions
class CreateSessionIn(_In):
    tags: list[str] = Field(default_factory=list, max_length=64)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = Field(None, max_length=512)


class SessionIdIn(_In):
    session_id: str = Field(min_length=1, max_length=256)


# ---------------------------------------------------------------- models
class LoraConfigIn(_In):
    rank: int = Field(32, ge=1, le=1024)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelIn(_In):
    session_id: str = Field(min_length=1, max_length=256)
    model_seq_id: int = Field(ge=0, le=1 << 30)
    base_model: str = Field(min_length=1, max_length=4096)
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigIn = LoraConfigIn()


class ModelIdIn(_In):
    model_id: str = Field(min_length=1, max_length=512)


class OptimStepIn(_In):
    model_id: str = Field(min_length=1, max_length=512)
    seq_id: int | None = Field(None, ge=0)
    adam_params: AdamParams | None = None  # the training plane's own model: same fields, same bounds
    optimizer_params: dict[str, Any] | None = None


MAX_TTL_S = 10 * 365 * 86400  # the SDK's documented upper bound (ten years)
TtlSeconds = Annotated[int, Field(ge=1, le=MAX_TTL_S, description="the checkpoint expires this long after the save")]
CheckpointName = Annotated[str, Field(min_length=1, max_length=128, pattern=CHECKPOINT_NAME_PATTERN,
                                      description="the checkpoint's name: letters, digits, '.', '_', '-'")]


class SaveWeightsIn(_In):
    model_id: str = Field(min_length=1, max_length=512)
    path: CheckpointName | None = None
    seq_id: int | None = Field(None, ge=0)
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternalIn(_In):
    model_id: str = Field(min_length=1, max_length=512)
    path: CheckpointName
    seq_id: int | None = Field(None, ge=0)
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[Annotated[str, Field(min_length=1, max_length=16384)]] | None = None


class CheckpointTtlIn(_In):
    ttl_seconds: TtlSeconds | None = None


class SaveWeightsForSamplerIn(SaveWeightsIn):
    sampling_session_seq_id: int | None = Field(None, ge=0)
    kind: Literal["snapshot", "inflight"] = "snapshot"


class LoadWeightsIn(_In):
    model_id: str | None = Field(None, min_length=1, max_length=512)
    seq_id: int | None = Field(None, ge=0)
    session_id: str | None = Field(None, min_length=1, max_length=256)
    model_seq_id: int | None = Field(None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str = Field(min_length=1, max_length=4096)
    optimizer: bool = False


# ---------------------------------------------------------------- sampling
class EncodedTextChunkIn(_In):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int] = Field(max_length=MAX_TOKENS_PER_REQUEST)


class ModelInputIn(_In):
    chunks: list[EncodedTextChunkIn] = Field(min_length=1, max_length=4096)

    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.tokens]


class SamplingParamsIn(_In):
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_PER_REQUEST)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(-1, ge=-1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class CreateSamplingSessionIn(_In):
    session_id: str = Field(min_length=1, max_length=256)
    sampling_session_seq_id: int = Field(ge=0, le=1 << 30)
    base_model: str | None = Field(None, max_length=4096)
    model_path: str | None = Field(None, max_length=4096)


class SampleIn(_In):
    sampling_session_id: str | None = Field(None, max_length=512)
    base_model: str | None = None
    model_path: str | None = None
    seq_id: int | None = None
    num_samples: int = Field(1, ge=1, le=64)
    prompt: ModelInputIn
    sampling_params: SamplingParamsIn = SamplingParamsIn()
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0, le=20)
    topk_sample_logprobs: int = Field(0, ge=0, le=20)


class FutureIn(_In):
    request_id: str = Field(min_length=1, max_length=256)
    allow_metadata_only: bool = False


class WeightsInfoIn(_In):
    tinker_path: str = Field(min_length=1, max_length=4096)


# ---------------------------------------------------------------- responses
# Field order is the order on the wire. ``None`` fields are sent as null (FastAPI's default), as before.
class EmptyOut(_Out):
    """``{}``: the reply of a request whose response the SDK ignores (finish, cancel, ttl, delete)."""


class HealthOut(_Out):
    status: Literal["ok", "degraded"]  # degraded: no inference server can serve
    inference_servers_up: int
    inference_servers: int


class ClientConfigOut(_Out):
    """The SDK's ``ClientConfigResponse`` (every field optional there; we set the two that matter)."""

    pjwt_auth_enabled: bool = False
    use_pyqwest_transport: bool = False


class ClientDynamicConfigOut(_Out):
    """The SDK's ``ClientDynamicConfigResponse``: ``{}``, its defaults (no sample cancels) are ours."""


class SupportedModelOut(_Out):
    model_name: str
    trainable: bool = True
    sampleable: bool = True
    max_context_length: int


class ServerCapabilitiesOut(_Out):
    supported_models: list[SupportedModelOut]


class SessionHeartbeatOut(_Out):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionOut(_Out):
    training_run_ids: list[str]
    sampler_ids: list[str]


class SessionsOut(_Out):
    sessions: list[str]


class TelemetryOut(_Out):
    status: Literal["accepted"] = "accepted"


class ModelDataOut(_Out):
    arch: str
    model_name: str
    tokenizer_id: str | None  # null when the base model's name is not one AutoTokenizer can load


class GetInfoOut(_Out):
    model_id: str
    type: Literal["get_info"] = "get_info"
    is_lora: bool = True
    lora_rank: int
    model_name: str
    model_data: ModelDataOut


class SamplerOut(_Out):
    sampler_id: str
    base_model: str
    model_path: str | None


class WeightsInfoOut(_Out):
    base_model: str
    is_lora: bool = True
    lora_rank: int | None
    train_mlp: bool
    train_attn: bool
    train_unembed: bool


class CheckpointOut(_Out):
    checkpoint_id: str
    checkpoint_type: CheckpointKind
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class TrainingRunOut(_Out):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: CheckpointOut | None = None
    last_sampler_checkpoint: CheckpointOut | None = None
    user_metadata: dict[str, str] | None = None


class CursorOut(_Out):
    offset: int
    limit: int
    total_count: int


class TrainingRunsOut(_Out):
    training_runs: list[TrainingRunOut]
    cursor: CursorOut


class CheckpointsOut(_Out):
    checkpoints: list[CheckpointOut]


class UntypedFuture(_Out):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class ExternalWeightsUrlsOut(_Out):
    urls: dict[str, str]
    expires: datetime


class SaveWeightsExternalOut(_Out):
    path: str
    size_bytes: int
    type: Literal["save_weights_external"] = "save_weights_external"


class CreateSessionOut(_Out):
    session_id: str
    type: Literal["create_session"] = "create_session"


class CreateSamplingSessionOut(_Out):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"
