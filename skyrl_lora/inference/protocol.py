"""Messages of the /skyrl/v1 routes: what crosses the HTTP boundary between client and server."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from skyrl_lora.inference.slot_builder import BuildPlan
from skyrl_lora.inference.uploads import UPLOAD_ID_PATTERN

LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
LoraName = Annotated[str, Field(pattern=LORA_NAME_PATTERN, description="tenant-visible adapter name")]
FinishReason = Literal["stop", "length", "abort"]
SyncMode = Literal["abort", "inplace"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingParamsIn(_Frozen):
    """The subset of vLLM's sampling parameters a token-in/token-out RL client needs."""

    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    logprobs: int = Field(0, ge=0, le=20, description="top-k logprobs per token; the sampled token's is always returned")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="None: off; k: each prompt token's logprob "
                                                                        "(and the top k beside it)")

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingParamsIn:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self


class GenerateRequest(_Frozen):
    prompt_token_ids: list[int] = Field(min_length=1)
    # Tokens this request already produced before an abort; the server continues after them and
    # checks stop strings across the seam.
    prefix_output_token_ids: list[int] = Field(default_factory=list)
    sampling_params: SamplingParamsIn = SamplingParamsIn()
    lora_name: LoraName | None = None
    num_samples: int = Field(1, ge=1, le=64)


class VersionSpan(_Frozen):
    """Tokens [start, end) of a sample were produced by adapter version ``version`` (0 = base model)."""

    version: int
    start: int
    end: int


class SampleOut(_Frozen):
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: FinishReason
    stop_reason: str | int | None = None
    version_spans: list[VersionSpan] = Field(default_factory=list)
    num_cached_tokens: int = 0
    # logprob of each prompt token given the ones before it (None for the first), when asked for
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    # requests sent after the first to finish it (``sample_with_retry``: each after an abort cut it,
    # re-reading prompt + tokens so far); 0 from a server
    continuations: int = Field(0, ge=0)


class GenerateResponse(_Frozen):
    samples: list[SampleOut]


class PauseRequest(_Frozen):
    lora_name: LoraName | None = None
    owner: str = Field("anonymous", min_length=1, max_length=256)
    lease_s: float = Field(60.0, gt=0, le=3600)


class PauseResponse(_Frozen):
    paused: bool
    aborted: int
    drained: bool


class ResumeRequest(_Frozen):
    lora_name: LoraName | None = None
    owner: str | None = Field(None, min_length=1, max_length=256, description="None drops every holder")


class ResumeResponse(_Frozen):
    paused: bool


class AbortLoraRequest(_Frozen):
    lora_name: LoraName


class UnloadLoraResponse(_Frozen):
    unloaded: str = Field(description="the tenant whose adapter (every version of it) left this server")


class AbortLoraResponse(_Frozen):
    aborted: int


class LoadLoraRequest(_Frozen):
    lora_name: LoraName
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = True
    mode: SyncMode = "abort"


class VllmLoadLoraRequest(LoadLoraRequest):
    """vLLM's /v1/load_lora_adapter body: same fields, but vLLM's default of not replacing."""

    load_inplace: bool = False


class UnloadLoraRequest(_Frozen):
    lora_name: LoraName


class UpdateLoraRequest(_Frozen):
    """One-call sync of a loaded LoRA on one server. ``abort``: the new version is loaded beside the old
    one, then the name flips to it and the old version's in-flight requests are aborted in one step
    (clients continue them on the new weights). ``inplace``: running requests pick the new weights up."""

    lora_name: LoraName
    lora_path: str = Field(min_length=1, max_length=4096)
    mode: SyncMode = "abort"
    create: bool = Field(False, description="load the LoRA if this server does not have it yet (a first sync)")
    load_from: str | None = Field(None, min_length=1, max_length=4096,
                                  description="read the weights from here now (as stage_lora's load_from)")
    off_loop: bool | None = Field(None, description="as stage_lora's off_loop")


class StageLoraRequest(_Frozen):
    """First half of an all-or-nothing sync: check and load a version beside the serving one, off the
    engine's step loop; nothing serves it until ``commit_lora``."""

    lora_name: LoraName
    lora_path: str = Field(min_length=1, max_length=4096)
    mode: SyncMode = "abort"
    create: bool = Field(False, description="allow a LoRA this server does not have yet (a first sync)")
    load_from: str | None = Field(None, min_length=1, max_length=4096,
                                  description="read the weights from here now (e.g. shared memory); lora_path is where "
                                  "they are kept for good, which the engine and a restarted server reload from")
    off_loop: bool | None = Field(None, description="load on the workers before the flip (default: the server's "
                                  "setting); False = inside the engine's add_lora at the flip (benchmarks)")
    upload_id: str | None = Field(None, pattern=UPLOAD_ID_PATTERN,
                                  description="stage the files sent to this server under this id (PUT /skyrl/v1/"
                                  "uploads/...; a server on another node than the trainer); they are then where "
                                  "this server keeps the version, and lora_path only names the trainer's copy")

    @model_validator(mode="after")
    def _one_source(self) -> StageLoraRequest:
        if self.load_from is not None and self.upload_id is not None:
            raise ValueError("load_from and upload_id: give at most one place to read the weights from")
        return self


class UploadResponse(_Frozen):
    upload_id: str
    filename: str
    bytes: int


class StageLoraResponse(_Frozen):
    stage_id: str
    lora_name: str
    staging_s: float


class StagedRef(_Frozen):
    stage_id: str = Field(min_length=1, max_length=128)


class DiscardLoraResponse(_Frozen):
    discarded: bool


class LoraInfo(_Frozen):
    name: str
    version: int
    path: str
    in_flight: int
    in_flight_tokens: int = 0
    waiting: int = 0
    paused_by: dict[str, float]


class SyncTimeline(_Frozen):
    """When one server did each part of a sync, in ``time.monotonic`` of its host (one clock for every
    process of a Linux host): a publication lined up end to end, trainer to worker
    (``bench.publish_latency``). None: a part this sync had not (the staging of a version the engine
    loads at the flip)."""

    received: float | None = Field(None, description="the route began on the request that brought the version "
                                   "(None on commit_lora's reply: a two-phase sync's stage_lora brought it)")
    checked: float | None = Field(None, description="paths, adapter config and slot image manifest checked")
    staged: float | None = Field(None, description="every worker reported it staged (armed: it serves from the "
                                 "engine's next step)")
    flipped: float = Field(description="the tenant's record points at the new version")


class LoadLoraResponse(_Frozen):
    lora: LoraInfo
    aborted: int = 0
    load_s: float = Field(0.0, description="the engine's time on it at the flip (every tenant waits for this)")
    staging_s: float = Field(0.0, description="checking and loading it before the flip (nobody waits)")
    timeline: SyncTimeline | None = None


class SlotPlanResponse(_Frozen):
    """The server's adapter slot layout, by which a trainer writes new versions as ready images
    (``slot_image``); both None where it has none (CPU-less layouts, tensor parallelism)."""

    plan: BuildPlan | None
    digest: str | None


class ServerIncarnation(_Frozen):
    """Which run of a server actor answers (a restart is another run, with its weights in other GPU
    memory), and whether it serves yet: what a colocated trainer follows (``training/base_watch``)."""

    incarnation: str
    started: bool = Field(description="the run's start() has returned: its engine is up and its routes answer")


class ServerState(_Frozen):
    loras: list[LoraInfo]
    engine_paused_by: dict[str, float]
    in_flight: int
    staged: int = Field(0, description="versions staged and not yet committed or discarded")
    staged_on_workers: int = Field(0, description="staged adapter copies the engine's workers hold")
    stage_asks: int = Field(0, description="status calls to the workers through the engine's loop while staging, "
                            "since start (0 while the stage channel carries everything)")
    stage_commands: int = Field(0, description="stagings sent to the workers directly (stage_channel), since start")
    stage_notices: int | None = Field(None, description="finished stagings the workers reported (stage_channel) "
                                      "since start; None where there is no channel and they are asked on a timer")
    node: str = Field("", description="the server's node (skyrl_lora.node_identity): a trainer on another node sends "
                      "new versions' files instead of a path")
