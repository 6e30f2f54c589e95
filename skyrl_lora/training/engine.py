"""One interface over where training runs: our Ray trainer actor, or any Tinker-compatible service.

RL loops (the demo, the examples) are written against :class:`TrainingEngine`; configuration picks
``local`` (a :class:`~skyrl_lora.training.actor.TrainerActor`) or ``remote`` (the official ``tinker``
SDK pointed at a base URL, e.g. our own API service or Tinker itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from skyrl_lora.errors import SkyrlError
from skyrl_lora.lora_targets import ATTENTION_MODULES, MLP_MODULES, UNEMBED_MODULES
from skyrl_lora.training.protocol import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    TensorIn,
)

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from skyrl_lora.training.protocol import Number


@runtime_checkable
class TrainingEngine(Protocol):
    """What an RL or SFT loop needs from a trainer; paths returned are whatever the backend names."""

    async def create_lora(self, tenant: str, spec: LoraSpec) -> None: ...
    async def delete_lora(self, tenant: str) -> None: ...
    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                      loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput: ...
    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                               loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput: ...
    async def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput: ...
    async def save_state(self, tenant: str, name: str) -> str: ...
    async def load_state(self, tenant: str, path: str, with_optimizer: bool = True) -> None: ...
    async def save_weights_for_sampler(self, tenant: str, name: str) -> str: ...


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["local", "remote"] = "local"
    base_url: str | None = Field(None, description="remote: the Tinker-compatible service")
    api_key: str | None = Field(None, description="remote: a tml- key (else TINKER_API_KEY)")
    base_model: str | None = Field(None, description="remote: the model name the service trains")


class LocalTrainingEngine:
    """Our TrainerActor over Ray; sampler saves also sync the tenant into the inference servers."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def create_lora(self, tenant: str, spec: LoraSpec) -> None:
        await self.actor.create_lora.remote(tenant, spec)

    async def delete_lora(self, tenant: str) -> None:
        await self.actor.delete_lora.remote(tenant)

    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                      loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        return cast(ForwardBackwardOutput, await self.actor.forward.remote(tenant, list(data), loss_fn, loss_fn_config))

    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                               loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        out = await self.actor.forward_backward.remote(tenant, list(data), loss_fn, loss_fn_config)
        return cast(ForwardBackwardOutput, out)

    async def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput:
        return cast(OptimStepOutput, await self.actor.optim_step.remote(tenant, adam))

    async def save_state(self, tenant: str, name: str) -> str:
        return cast(str, (await self.actor.save_state.remote(tenant, name)).path)

    async def load_state(self, tenant: str, path: str, with_optimizer: bool = True) -> None:
        await self.actor.load_state.remote(tenant, path, with_optimizer)

    async def save_weights_for_sampler(self, tenant: str, name: str) -> str:
        path = cast(str, (await self.actor.save_weights_for_sampler.remote(tenant, name)).path)
        await self.actor.durable.remote(path)  # the path this returns can be read at once
        return path


class RemoteTrainingEngine:
    """The official ``tinker`` SDK as a training engine: one LoRA training client per tenant."""

    def __init__(self, config: EngineConfig) -> None:
        import tinker

        if not config.base_model:
            raise SkyrlError(400, "base_model: the remote engine needs the model name to train", "base_model")
        self.config = config
        self.base_model: str = config.base_model
        self.service = tinker.ServiceClient(base_url=config.base_url, api_key=config.api_key)
        self.clients: dict[str, Any] = {}

    def _client(self, tenant: str) -> Any:
        client = self.clients.get(tenant)
        if client is None:
            raise SkyrlError(404, f"tenant: no LoRA named '{tenant}' on this engine", "tenant")
        return client

    async def create_lora(self, tenant: str, spec: LoraSpec) -> None:
        targets = set(spec.target_modules)
        self.clients[tenant] = await self.service.create_lora_training_client_async(
            base_model=self.base_model, rank=spec.rank, seed=spec.seed, train_mlp=bool(targets & set(MLP_MODULES)),
            train_attn=bool(targets & set(ATTENTION_MODULES)), train_unembed=bool(targets & set(UNEMBED_MODULES)),
            user_metadata={"tenant": tenant})

    async def delete_lora(self, tenant: str) -> None:
        self.clients.pop(tenant, None)

    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                      loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        future = await self._client(tenant).forward_async(_to_tinker(data), loss_fn, loss_fn_config)
        return _from_tinker(await future.result_async())

    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                               loss_fn_config: dict[str, float] | None = None) -> ForwardBackwardOutput:
        future = await self._client(tenant).forward_backward_async(_to_tinker(data), loss_fn, loss_fn_config)
        return _from_tinker(await future.result_async())

    async def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput:
        import tinker

        future = await self._client(tenant).optim_step_async(tinker.types.AdamParams(**adam.model_dump()))
        result = await future.result_async()
        return OptimStepOutput(metrics=dict(result.metrics or {}), step=-1)

    async def save_state(self, tenant: str, name: str) -> str:
        return cast(str, (await (await self._client(tenant).save_state_async(name)).result_async()).path)

    async def load_state(self, tenant: str, path: str, with_optimizer: bool = True) -> None:
        client = self._client(tenant)
        load = client.load_state_with_optimizer_async if with_optimizer else client.load_state_async
        await (await load(path)).result_async()

    async def save_weights_for_sampler(self, tenant: str, name: str) -> str:
        future = await self._client(tenant).save_weights_for_sampler_async(name)
        return cast(str, (await future.result_async()).path)


def _two_d(values: TensorIn) -> TypeIs[list[list[Number]]]:
    return bool(values) and isinstance(values[0], list)


def _to_tinker(data: Sequence[Datum]) -> list[Any]:
    import tinker

    out = []
    for d in data:
        inputs = {}
        for key, values in d.loss_fn_inputs.items():
            flat: list[Number]
            if _two_d(values):
                flat, shape = [x for row in values for x in row], [len(values), len(values[0])]
            else:
                flat, shape = list(values), [len(values)]
            dtype: Literal["int64", "float32"] = "int64" if key in {"target_tokens", "teacher_topk_ids"} else "float32"
            inputs[key] = tinker.types.TensorData(data=flat, dtype=dtype, shape=shape)
        out.append(tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(d.model_input), loss_fn_inputs=inputs))
    return out


def _from_tinker(result: Any) -> ForwardBackwardOutput:
    outputs = [{k: [float(x) for x in v.data] for k, v in record.items()} for record in result.loss_fn_outputs]
    return ForwardBackwardOutput(loss_fn_output_type=result.loss_fn_output_type, loss_fn_outputs=outputs,
                                 metrics=dict(result.metrics))


def make_training_engine(config: EngineConfig, *, actor: Any = None) -> TrainingEngine:
    if config.kind == "local":
        if actor is None:
            raise SkyrlError(400, "kind: the local engine needs a running TrainerActor", "kind")
        return LocalTrainingEngine(actor)
    return RemoteTrainingEngine(config)
