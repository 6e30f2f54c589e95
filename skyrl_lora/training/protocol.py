"""Messages of the training plane: what crosses the boundary between callers and the trainer actor.

The shapes follow Tinker's training client (Datum, AdamParams, ForwardBackwardOutput with metric keys
``name:reduction``), so the Tinker-compatible API converts its wire types into these one to one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyrl_lora.inference.protocol import LORA_NAME_PATTERN, SyncTimeline
from skyrl_lora.lora_targets import PROJECTION_MODULES

TenantId = Annotated[str, Field(pattern=LORA_NAME_PATTERN, description="tenant (LoRA) name")]

Number = float | int
TensorIn = list[Number] | list[list[Number]]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSpec(_Frozen):
    """A tenant's adapter shape. Tenants on one base model may all differ in it."""

    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    target_modules: tuple[str, ...] = Field(PROJECTION_MODULES, min_length=1, validate_default=True)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="initialises lora_A; same seed, same start")

    @field_validator("target_modules")
    @classmethod
    def _sorted_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not m or not m.replace("_", "").isalnum() for m in v):
            raise ValueError("target_modules must be module names such as 'q_proj'")
        return tuple(sorted(set(v)))

    @property
    def signature(self) -> tuple[int, float, tuple[str, ...]]:
        """Adapters with one signature have identical parameter shapes, so they can share a slot."""
        return (self.rank, self.alpha, self.target_modules)


class Datum(_Frozen):
    """One sequence. Position i of ``model_input`` predicts ``loss_fn_inputs['target_tokens'][i]``."""

    model_input: list[int] = Field(min_length=1)
    loss_fn_inputs: dict[str, TensorIn] = Field(default_factory=dict)


LossName = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "distill"]


class ForwardBackwardInput(_Frozen):
    data: list[Datum] = Field(min_length=1)
    loss_fn: LossName = "cross_entropy"
    loss_fn_config: dict[str, float] = Field(default_factory=dict)


class ForwardBackwardOutput(_Frozen):
    """Per-datum outputs (``logprobs`` always) and metrics keyed ``name:reduction`` as Tinker's SDK expects."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, list[float]]]
    metrics: dict[str, float]

    @property
    def loss(self) -> float:
        return self.metrics["loss:sum"]


class AdamParams(_Frozen):
    """Tinker's AdamParams (torch AdamW semantics, decoupled weight decay; grad_clip_norm 0 = off)."""

    learning_rate: float = Field(1e-4, ge=0.0, le=10.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-12, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    grad_clip_norm: float = Field(0.0, ge=0.0)


class OptimStepOutput(_Frozen):
    metrics: dict[str, float]
    step: int


class TenantInfo(_Frozen):
    tenant: TenantId
    spec: LoraSpec
    step: int
    tier: Literal["resident", "cpu", "disk"]
    nbytes: int
    has_pending_grads: bool


class SavedState(_Frozen):
    tenant: TenantId
    path: str
    step: int
    nbytes: int


class PublishTimeline(_Frozen):
    """A ``save_weights_for_sampler`` that synced, in ``time.monotonic`` of the trainer's host (which
    the servers of its node share): the trainer's parts and the last server's (``SyncTimeline``)."""

    called: float
    exported: float
    synced: float
    server: SyncTimeline | None = Field(None, description="the server that flipped last")
    export_parts: dict[str, float] = Field(default_factory=dict, description="the export's parts in the order "
                                           "they ended, each's end (a slot image's: began, cast, configured, "
                                           "laid_out, gpu_done, ipc_handle, renamed)")


class SamplerWeights(_Frozen):
    """An adapter directory vLLM can load, and what the sync into inference did with it."""

    tenant: TenantId
    path: str
    step: int
    synced: bool
    sync_s: float | None = None
    export_s: float | None = Field(None, description="writing the adapter out (to shared memory when publishing), "
                                   "before the sync starts")
    versions: list[int] = Field(default_factory=list, description="the adapter version now served, per server")
    staging_s: float | None = Field(None, description="the slowest server's check and staging, inside sync_s")
    flip_s: float | None = Field(None, description="the slowest server's flip (the engine's add_lora round trip), "
                                 "inside sync_s")
    timeline: PublishTimeline | None = Field(None, description="when each part happened (benchmarks)")


class TierStats(_Frozen):
    tier: Literal["resident", "cpu", "disk"]
    tenants: int
    nbytes: int
    budget_bytes: int | None


class TrainerState(_Frozen):
    base_model: str
    device: str
    loaded: bool
    tenants: list[TenantInfo]
    tiers: list[TierStats]


# ---------------------------------------------------------------- self-distillation payload


class DistillSettings(_Frozen):
    lr: float = Field(1e-4, ge=0.0, le=10.0)
    alpha: float = Field(32.0, gt=0, description="LoRA alpha of a tenant created by this step; must match an existing one")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank of a tenant created by this step")
    clip: float = Field(10.0, gt=0, description="per-token KL is clamped to this, so one wild token cannot dominate")
    max_grad_norm: float = Field(1.0, ge=0.0)
    kl_weight: float = Field(1.0, ge=0.0)
    teacher_top_k: int = Field(20, ge=1, le=1024)


class DistillSample(_Frozen):
    """One response scored by a teacher (e.g. the model conditioned on feedback), top-k per response token."""

    prompt: str = ""
    response: str = ""
    feedback: str = ""
    prompt_token_ids: list[int] = Field(min_length=1)
    response_token_ids: list[int] = Field(min_length=1)
    teacher_topk_ids: list[list[int]]
    teacher_topk_logprobs: list[list[float]]

    @model_validator(mode="after")
    def _aligned(self) -> DistillSample:
        n = len(self.response_token_ids)
        if len(self.teacher_topk_ids) != n or len(self.teacher_topk_logprobs) != n:
            raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs need one row per response token ({n})")
        if any(len(a) != len(b) or not a for a, b in zip(self.teacher_topk_ids, self.teacher_topk_logprobs)):
            raise ValueError("teacher_topk_ids and teacher_topk_logprobs rows must be non-empty and of equal length")
        return self


class DistillPayload(_Frozen):
    lora_id: TenantId
    settings: DistillSettings = DistillSettings()
    samples: list[DistillSample] = Field(min_length=1)


class DistillStepOutput(_Frozen):
    forward_backward: ForwardBackwardOutput
    optim: OptimStepOutput


class SharedBaseInfo(_Frozen):
    """A colocated trainer's base: whether it maps its server's weights now, which run of the server
    they belong to, and how often it mapped a restarted server's weights again (``base_watch``)."""

    mapped: bool
    incarnation: str | None
    reshares: int
    tensors: int
