"""What the API needs from a trainer, and the one implementation that reaches the trainer actor.

The service speaks to this interface only, so it can be run against a fake trainer in tests as well
as against the real actor through Ray. ``RayTrainer`` maps Ray's failures into the service's errors:
an actor that died while a request ran is a 503 saying to submit it again, and a ``SkyrlError``
raised inside the actor keeps its status and field across the process boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ray.exceptions import RayActorError

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    SamplerWeights,
    SavedState,
    TenantInfo,
)


class TrainerBackend(Protocol):
    async def create_lora(self, tenant: str, spec: LoraSpec) -> TenantInfo: ...
    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str,
                      loss_fn_config: dict[str, float] | None) -> ForwardBackwardOutput: ...
    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str,
                               loss_fn_config: dict[str, float] | None) -> ForwardBackwardOutput: ...
    async def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput: ...
    async def save_state(self, tenant: str, name: str) -> SavedState: ...
    async def load_state(self, tenant: str, path: str, with_optimizer: bool) -> TenantInfo: ...
    async def save_weights_for_sampler(self, tenant: str, name: str) -> SamplerWeights: ...
    async def adapter_files(self, tenant: str) -> dict[str, bytes]: ...
    async def delete_checkpoint(self, path: str) -> bool: ...
    async def durable(self, path: str) -> None: ...
    async def metrics_text(self) -> str: ...


def _cause(exc: BaseException) -> BaseException:
    """Ray wraps an actor's exception; the SkyrlError inside carries the status and field."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


async def call_actor(method: Any, *args: Any) -> Any:
    """``method.remote(*args)``, awaited, with Ray's failures as the service's errors."""
    try:
        return await method.remote(*args)
    except RayActorError as exc:
        raise SkyrlError(503, "trainer: the training process stopped while this request ran; it restarts with "
                              "each model's last saved state (save_state); submit the request again", None) from exc
    except Exception as exc:
        cause = _cause(exc)
        if isinstance(cause, SkyrlError):
            raise SkyrlError(cause.status, cause.message, cause.field) from exc
        raise


class RayTrainer:
    """``TrainerBackend`` over a ``TrainerActor`` handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def create_lora(self, tenant: str, spec: LoraSpec) -> TenantInfo:
        return await call_actor(self.handle.create_lora, tenant, spec)  # type: ignore[no-any-return]

    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str,
                      loss_fn_config: dict[str, float] | None) -> ForwardBackwardOutput:
        return await call_actor(self.handle.forward, tenant, data, loss_fn, loss_fn_config)  # type: ignore[no-any-return]

    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str,
                               loss_fn_config: dict[str, float] | None) -> ForwardBackwardOutput:
        return await call_actor(self.handle.forward_backward, tenant, data, loss_fn,  # type: ignore[no-any-return]
                                loss_fn_config)

    async def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput:
        return await call_actor(self.handle.optim_step, tenant, adam)  # type: ignore[no-any-return]

    async def save_state(self, tenant: str, name: str) -> SavedState:
        return await call_actor(self.handle.save_state, tenant, name)  # type: ignore[no-any-return]

    async def load_state(self, tenant: str, path: str, with_optimizer: bool) -> TenantInfo:
        return await call_actor(self.handle.load_state, tenant, path, with_optimizer)  # type: ignore[no-any-return]

    async def save_weights_for_sampler(self, tenant: str, name: str) -> SamplerWeights:
        return await call_actor(self.handle.save_weights_for_sampler, tenant, name)  # type: ignore[no-any-return]

    async def adapter_files(self, tenant: str) -> dict[str, bytes]:
        return await call_actor(self.handle.adapter_files, tenant)  # type: ignore[no-any-return]

    async def delete_checkpoint(self, path: str) -> bool:
        return await call_actor(self.handle.delete_checkpoint, path)  # type: ignore[no-any-return]

    async def durable(self, path: str) -> None:
        await call_actor(self.handle.durable, path)

    async def metrics_text(self) -> str:
        return await call_actor(self.handle.metrics_text)  # type: ignore[no-any-return]
