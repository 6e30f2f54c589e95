"""Settings of one trainer actor: which base model, where state lives, and how much of it each tier may hold."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from skyrl_lora.inference.protocol import SyncMode

MiB = 1 << 20
SamplerDtype = Literal["float32", "bfloat16", "float16"]


class TrainerSettings(BaseModel):
    """What an operator tunes about the trainer. ``SkyrlConfig.trainer`` is one of these: ``TrainerConfig``
    adds only what one deployment decides (model, rank cap, directories, servers, token)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field("auto", description="'auto' = cuda when present, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_seq_len: int = Field(4096, ge=2)
    resident_budget_bytes: int = Field(512 * MiB, ge=0, description="adapters+optimizer resident in the model")
    cpu_budget_bytes: int = Field(2048 * MiB, ge=0)
    disk_budget_bytes: int | None = Field(None, ge=0, description="None = unbounded")
    sync_mode: SyncMode = "abort"
    sync_timeout_s: float = Field(120.0, gt=0)
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch default)")
    publish_images: bool = Field(True, description="save_weights_for_sampler writes a new version as the servers' "
                                 "ready slot image (inference/slot_image.py) where every server is on the trainer's "
                                 "node and they share one layout: nothing to check or build before the flip; else, "
                                 "and False, as peft files")
    base_weights: Literal["own", "shared", "shared_or_own"] = Field(
        "own", description="'own': load a copy of the base model; 'shared': build it on views of the inference "
        "server's GPU weights (share_from), refusing to start where that is impossible; 'shared_or_own': share where "
        "possible, else load a copy and say why once in the log")
    reshare_poll_s: float = Field(1.0, gt=0, description="how often a trainer on shared base weights asks its server "
                                  "whether it is still the process whose weights it maps (a restarted one is not)")
    reshare_timeout_s: float = Field(900.0, gt=0, description="how long a training call waits for a restarted "
                                     "server's weights before a 503 naming base_weights (a server at 8B starts in "
                                     "about 2.5 minutes on an H200)")


class TrainerConfig(TrainerSettings):
    base_model: str = Field(description="local path of the HF base model (the one the inference servers serve)")
    max_lora_rank: int = Field(64, ge=1, description="cap on a tenant's rank; match the inference servers' "
                               "--max-lora-rank")
    state_dir: Path = Field(description="disk tier, checkpoints (save_state) live under it")
    sampler_root: Path = Field(description="adapter directories for vLLM; must lie inside the servers' adapter roots")
    publish_root: Path | None = Field(None, description="shared memory (e.g. /dev/shm/...) where a new version is "
                                      "written for the servers of this node to load at once, while its durable copy "
                                      "goes to sampler_root beside the sync; None = write to sampler_root only. Must "
                                      "lie inside the servers' adapter roots")
    sampler_dtype: SamplerDtype = Field(
        "bfloat16", description="dtype of save_weights_for_sampler's files: the servers' dtype. vLLM casts every adapter "
        "to it, so float32 files serve the very same bits at twice the bytes to write, check and read on the way to "
        "the first token (8B rank 32: 352 against 176 MB); float32 keeps full-precision sampler files")
    keep_sampler_versions: int = Field(4, ge=1, description="older exported adapter directories of a tenant are deleted")
    inference_urls: tuple[str, ...] = Field((), description="servers that save_weights_for_sampler syncs into")
    inference_token: str | None = Field(None, description="the servers' bearer token, when they require one")
    share_from: str | None = Field(None, description="Ray actor name of the inference server on the trainer's GPU "
                                   "whose weights are shared")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.state_dir) / "checkpoints"

    @property
    def disk_tier_dir(self) -> Path:
        return Path(self.state_dir) / "disk_tier"
