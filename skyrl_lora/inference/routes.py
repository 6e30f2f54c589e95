"""Our routes, mounted beside vLLM's in the same app so they reach the engine object directly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from skyrl_lora.errors import ErrorBody, SkyrlError, check_token_ids
from skyrl_lora.inference import vllm_compat as compat
from skyrl_lora.inference.lora_control import LoraController, LoraError, new_request_id
from skyrl_lora.inference.protocol import (
    AbortLoraRequest,
    AbortLoraResponse,
    DiscardLoraResponse,
    GenerateRequest,
    GenerateResponse,
    LoadLoraRequest,
    LoadLoraResponse,
    PauseRequest,
    PauseResponse,
    ResumeRequest,
    ResumeResponse,
    SampleOut,
    ServerState,
    SlotPlanResponse,
    StagedRef,
    StageLoraRequest,
    StageLoraResponse,
    UnloadLoraRequest,
    UnloadLoraResponse,
    UpdateLoraRequest,
    UploadResponse,
    VersionSpan,
    VllmLoadLoraRequest,
)
from skyrl_lora.inference.stitching import find_seam_stop

logger = logging.getLogger(__name__)

PREFIX = "/skyrl/v1"
SEAM_TAIL_TOKENS = 16


def _controller(raw: Request) -> LoraController:
    return cast(LoraController, raw.app.state.skyrl_controller)


def lora_error_response(exc: SkyrlError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=ErrorBody.of_error(exc).model_dump())


class TokenGenerator:
    """Token-in/token-out sampling for RL clients: ids, per-token logprobs, finish reason, versions."""

    def __init__(self, controller: LoraController) -> None:
        self.controller = controller
        self.engine = controller.engine
        self._tokenizer: Any = None

    async def _decode_fn(self) -> Callable[[Sequence[int]], str]:
        if self._tokenizer is None:
            self._tokenizer = await compat.get_tokenizer(self.engine)
        tok = self._tokenizer
        return lambda ids: tok.decode(list(ids), skip_special_tokens=True)

    def validate(self, req: GenerateRequest) -> None:
        vocab = compat.vocab_size(self.engine)
        for field_name, ids in (("prompt_token_ids", req.prompt_token_ids),
                                ("prefix_output_token_ids", req.prefix_output_token_ids),
                                ("sampling_params.stop_token_ids", req.sampling_params.stop_token_ids)):
            check_token_ids(ids, vocab, field_name, LoraError)
        limit = compat.max_model_len(self.engine)
        total = len(req.prompt_token_ids) + len(req.prefix_output_token_ids) + req.sampling_params.max_tokens
        if total > limit:
            raise LoraError(400, f"sampling_params.max_tokens: prompt ({len(req.prompt_token_ids)}) + prefix "
                                 f"({len(req.prefix_output_token_ids)}) + max_tokens ({req.sampling_params.max_tokens}) "
                                 f"= {total} exceeds the model length {limit}", "sampling_params.max_tokens")
        if req.lora_name is not None:
            self.controller.require(req.lora_name)

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        self.validate(req)
        samples = await asyncio.gather(*(self._one(req, i) for i in range(req.num_samples)))
        return GenerateResponse(samples=list(samples))

    async def _one(self, req: GenerateRequest, index: int) -> SampleOut:
        p = req.sampling_params
        seed = None if p.seed is None else (p.seed + index) % (2**63)
        params = compat.make_sampling_params(
            n=1, max_tokens=p.max_tokens, min_tokens=p.min_tokens, temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k, seed=seed, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
            ignore_eos=p.ignore_eos, logprobs=p.logprobs, detokenize=bool(p.stop),
            # the prompt is the same for every sample: its logprobs are computed (and returned) once
            prompt_logprobs=p.prompt_logprobs if index == 0 else None,
        )
        prompt = compat.tokens_prompt(list(req.prompt_token_ids) + list(req.prefix_output_token_ids))
        tail = list(req.prefix_output_token_ids[-SEAM_TAIL_TOKENS:])
        check_seam = bool(p.stop) and bool(tail)
        decode = await self._decode_fn() if check_seam else None
        request_id = new_request_id()
        token_ids: list[int] = []
        logprobs: list[float] = []
        top: list[dict[int, float]] | None = [] if p.logprobs > 0 else None
        spans: list[VersionSpan] = []
        finish: str | None = None
        stop_reason: str | int | None = None
        cached = 0
        prompt_lps: list[float | None] | None = None
        prompt_top: list[dict[int, float] | None] | None = None
        gen = self.controller.generate(prompt, params, request_id, tenant=req.lora_name)
        adm = None
        try:
            async for out in gen:
                if adm is None:
                    adm = self.controller.admission(request_id)
                    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                if index == 0 and p.prompt_logprobs is not None and prompt_lps is None and getattr(out, "prompt_logprobs", None):
                    prompt_lps, prompt_top = _prompt_logprobs(req.prompt_token_ids, out.prompt_logprobs,
                                                              p.prompt_logprobs)
                comp = out.outputs[0]
                new_ids = list(comp.token_ids)
                if new_ids:
                    if adm is not None:
                        adm.tokens += len(new_ids)
                    start = len(token_ids)
                    token_ids.extend(new_ids)
                    for pos, tid in enumerate(new_ids):
                        entry = comp.logprobs[pos] if comp.logprobs is not None else {}
                        lp = entry.get(tid)
                        logprobs.append(float(lp.logprob) if lp is not None else float("nan"))
                        if top is not None:
                            top.append({int(k): float(v.logprob) for k, v in entry.items()})
                    version = self.controller.version_of(adm) if adm is not None else 0
                    if spans and spans[-1].version == version and spans[-1].end == start:
                        spans[-1] = VersionSpan(version=version, start=spans[-1].start, end=len(token_ids))
                    else:
                        spans.append(VersionSpan(version=version, start=start, end=len(token_ids)))
                if check_seam and decode is not None:
                    hit = find_seam_stop(decode, tail, token_ids, p.stop)
                    if hit is not None:
                        keep, stop = hit
                        del token_ids[keep:], logprobs[keep:]
                        if top is not None:
                            del top[keep:]
                        spans = _clip_spans(spans, keep)
                        finish, stop_reason = "stop", stop
                        break
                    if len(decode(token_ids)) >= max(len(s) for s in p.stop):
                        check_seam = False
                if comp.finish_reason is not None:
                    finish, stop_reason = comp.finish_reason, comp.stop_reason
        finally:
            await gen.aclose()
        if finish is None:
            finish = "abort"
        return SampleOut(token_ids=token_ids, logprobs=logprobs, top_logprobs=top, finish_reason=finish,
                         stop_reason=stop_reason, version_spans=spans, num_cached_tokens=cached,
                         prompt_logprobs=prompt_lps, prompt_top_logprobs=prompt_top)


def _prompt_logprobs(prompt: list[int], entries: list[Any], k: int
                     ) -> tuple[list[float | None], list[dict[int, float] | None] | None]:
    """vLLM's per-position dicts -> the prompt token's own logprob (+ top k), for the caller's prompt only."""
    own: list[float | None] = []
    tops: list[dict[int, float] | None] = []
    for pos, tid in enumerate(prompt):
        entry = entries[pos] if pos < len(entries) else None
        if not entry:
            own.append(None)
            tops.append(None)
            continue
        lp = entry.get(tid)
        own.append(float(lp.logprob) if lp is not None else None)
        ranked = sorted(((int(t), float(v.logprob)) for t, v in entry.items()), key=lambda kv: -kv[1])[:k]
        tops.append(dict(ranked))
    return own, (tops if k > 0 else None)


def _clip_spans(spans: list[VersionSpan], end: int) -> list[VersionSpan]:
    out = []
    for s in spans:
        if s.start >= end:
            break
        out.append(VersionSpan(version=s.version, start=s.start, end=min(s.end, end)))
    return out


def build_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=_BodyErrorsNamed)

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, raw: Request) -> Any:
        try:
            return await raw.app.state.skyrl_generator.generate(body)
        except LoraError as exc:
            return lora_error_response(exc)
        except Exception as exc:
            if not compat.is_engine_dead_error(exc):
                raise
            # the client continues its samples on another server (or here, once restarted)
            return lora_error_response(SkyrlError(503, "the inference engine died; this server restarts", None))

    @router.post("/abort_lora_requests", response_model=AbortLoraResponse)
    async def abort_lora_requests(body: AbortLoraRequest, raw: Request) -> Any:
        try:
            return AbortLoraResponse(aborted=await _controller(raw).abort_lora_requests(body.lora_name))
        except LoraError as exc:
            return lora_error_response(exc)

    @router.post("/pause", response_model=PauseResponse)
    async def pause(body: PauseRequest, raw: Request) -> Any:
        try:
            aborted, drained = await _controller(raw).pause(body.lora_name, body.owner, body.lease_s)
        except LoraError as exc:
            return lora_error_response(exc)
        return PauseResponse(paused=True, aborted=aborted, drained=drained)

    @router.post("/resume", response_model=ResumeResponse)
    async def resume(body: ResumeRequest, raw: Request) -> Any:
        return ResumeResponse(paused=_controller(raw).resume(body.lora_name, body.owner))

    async def swapped(ctl: LoraController, swap: Awaitable[tuple[Any, int, float]], received: float | None) -> Any:
        """The reply of every route that flips a tenant to a new version (or the refusal). ``received``:
        when the request that brought the version began (None for a commit: its stage request did)."""
        try:
            adapter, aborted, load_s = await swap
        except LoraError as exc:
            return lora_error_response(exc)
        timeline = adapter.timeline  # none of this request's where it flipped nothing (a retried load)
        if timeline is not None and received is not None:
            timeline = timeline.model_copy(update={"received": received}) if timeline.flipped >= received else None
        return LoadLoraResponse(lora=ctl.info(adapter.name), aborted=aborted, load_s=load_s, staging_s=adapter.staging_s,
                                timeline=timeline)

    @router.post("/load_lora_adapter", response_model=LoadLoraResponse)
    async def load_lora_adapter(body: LoadLoraRequest, raw: Request) -> Any:
        ctl = _controller(raw)
        return await swapped(ctl, ctl.load(body.lora_name, body.lora_path, load_inplace=body.load_inplace,
                                           mode=body.mode), time.monotonic())

    @router.post("/update_lora", response_model=LoadLoraResponse)
    async def update_lora(body: UpdateLoraRequest, raw: Request) -> Any:
        ctl = _controller(raw)

        async def swap() -> tuple[Any, int, float]:
            if not body.create:
                ctl.require(body.lora_name)
            if body.load_from is None and body.off_loop is None:
                return await ctl.load(body.lora_name, body.lora_path, load_inplace=True, mode=body.mode)
            return await ctl.update(body.lora_name, body.lora_path, mode=body.mode, load_from=body.load_from,
                                    off_loop=body.off_loop)
        return await swapped(ctl, swap(), time.monotonic())

    @router.post("/stage_lora", response_model=StageLoraResponse)
    async def stage_lora(body: StageLoraRequest, raw: Request) -> Any:
        ctl = _controller(raw)
        try:
            if not body.create:
                ctl.require(body.lora_name)
            staged = await ctl.stage(body.lora_name, body.lora_path, mode=body.mode, load_from=body.load_from,
                                     off_loop=body.off_loop, upload_id=body.upload_id)
            return StageLoraResponse(stage_id=staged.stage_id, lora_name=staged.name, staging_s=staged.staging_s)
        except LoraError as exc:
            return lora_error_response(exc)

    @router.post("/commit_lora", response_model=LoadLoraResponse)
    async def commit_lora(body: StagedRef, raw: Request) -> Any:
        ctl = _controller(raw)
        return await swapped(ctl, ctl.commit(body.stage_id), None)

    @router.post("/discard_lora", response_model=DiscardLoraResponse)
    async def discard_lora(body: StagedRef, raw: Request) -> Any:
        return DiscardLoraResponse(discarded=await _controller(raw).discard(body.stage_id))

    @router.put("/uploads/{upload_id}/{filename}", response_model=UploadResponse)
    async def upload(upload_id: str, filename: str, raw: Request) -> Any:
        """One file of an adapter version, as the request body (for a server on another node)."""
        try:
            size = await _controller(raw).receive_upload(upload_id, filename, raw.stream())
        except SkyrlError as exc:
            return lora_error_response(exc)
        return UploadResponse(upload_id=upload_id, filename=filename, bytes=size)

    @router.post("/unload_lora_adapter", response_model=UnloadLoraResponse)
    async def unload_lora_adapter(body: UnloadLoraRequest, raw: Request) -> Any:
        try:
            await _controller(raw).unload(body.lora_name)
        except LoraError as exc:
            return lora_error_response(exc)
        return UnloadLoraResponse(unloaded=body.lora_name)

    @router.get("/slot_plan", response_model=SlotPlanResponse)
    async def slot_plan(raw: Request) -> Any:
        return await _controller(raw).slot_plan()

    @router.get("/state", response_model=ServerState)
    async def state(raw: Request) -> Any:
        ctl = _controller(raw)
        return ctl.state().model_copy(update={"staged_on_workers": await ctl.staged_on_workers()})

    return router


class _BodyErrorsNamed(APIRoute):
    """A body that is not JSON at all (FastAPI answers a bare ``{"detail"}``) gets our error shape,
    naming the body: vLLM's app has built its exception handlers before our routes arrive."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Any:
            try:
                return await handler(request)
            except HTTPException as exc:
                if exc.status_code != 400:
                    raise
                return JSONResponse(status_code=400, content=ErrorBody.of(400, f"body: {exc.detail}", "body").model_dump())
        return handle


def install_routes(app: FastAPI, controller: LoraController) -> None:
    """Mount our routes and route vLLM's own adapter routes through the controller.

    vLLM's /v1/load_lora_adapter would register an adapter the controller does not know (ungated,
    sticky in-place reloads); the same paths now answer with the controller's versioned loads.
    """
    app.state.skyrl_controller = controller
    app.state.skyrl_generator = TokenGenerator(controller)
    compat.replace_routes(app, {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
    router = build_router()
    app.include_router(router)

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(body: VllmLoadLoraRequest, raw: Request) -> Any:
        try:
            await controller.load(body.lora_name, body.lora_path, load_inplace=body.load_inplace, mode=body.mode)
        except LoraError as exc:
            return lora_error_response(exc)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(body: UnloadLoraRequest, raw: Request) -> Any:
        try:
            await controller.unload(body.lora_name)
        except LoraError as exc:
            return lora_error_response(exc)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
