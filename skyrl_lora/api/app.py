"""The FastAPI app: Tinker's routes under /api/v1, API-key auth, errors that name the field."""

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from skyrl_lora.api import schemas as S
from skyrl_lora.api.hot_path import SamplingHotPath, error_body, first_error
from skyrl_lora.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from skyrl_lora.api.proto_conv import PROTO
from skyrl_lora.api.service import TinkerService
from skyrl_lora.errors import SkyrlError

Reply = TypeVar("Reply", bound=BaseModel)
logger = logging.getLogger(__name__)
MAX_BODY = 256 << 20


async def _user(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> str:
    """The caller's user id from its X-API-Key (checked against the hashed keys)."""
    service: TinkerService = request.app.state.service
    return await service.authenticate(x_api_key)


User = Annotated[str, Depends(_user)]


def _error(status: int, message: str, field: str | None = None) -> Response:
    return Response(error_body(status, message, field), status_code=status, media_type="application/json")


def create_app(service: TinkerService, metrics: Callable[[], Awaitable[str]] | None = None,
               on_shutdown: Callable[[], Awaitable[None]] | None = None) -> SamplingHotPath:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title="skyrl_lora Tinker-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(SkyrlError)
    async def _skyrl(_: Request, exc: SkyrlError) -> Response:
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        field, message = first_error(list(exc.errors()), skip=("body", "query", "path", "header"))
        return _error(400, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:  # e.g. a body that does not parse
        if exc.status_code == 400:
            return _error(400, f"body: {exc.detail}", "body")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:  # never a bare 500 page
        logger.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    v1 = "/api/v1"

    async def once(request: Request, user: str, submit: Callable[[], Awaitable[Reply]], reply: type[Reply]) -> Reply:
        """Apply a POST the SDK may resend (same ``X-Idempotency-Key``) at most once."""
        return await service.idempotency.once(user, request.headers.get(IDEMPOTENCY_HEADER), request.url.path,
                                              await request.body(), submit, reply)

    # ---------------------------------------------------------------- unauthenticated
    @app.get(f"{v1}/healthz")
    async def healthz() -> S.HealthOut:
        """ "degraded" while no inference server can serve (say, its engine died and it is restarting)."""
        up = await service.inference.healthy()
        return S.HealthOut(status="ok" if any(up) else "degraded", inference_servers_up=sum(up),
                           inference_servers=len(up))

    @app.post(f"{v1}/client/config")
    async def client_config() -> S.ClientConfigOut:
        # Plain httpx, not the SDK's default pyqwest transport: measured on the 2-core box
        # (bench/api_overhead.py) pyqwest saved the client ~1.4 ms of CPU per sample but added ~10-30 ms
        # to every sample's latency at concurrency 1 (c1 ratio 1.12-1.27 against 1.04 with httpx).
        return S.ClientConfigOut(pjwt_auth_enabled=False, use_pyqwest_transport=False)

    @app.post(f"{v1}/client/dynamic_config")
    async def dynamic_config() -> S.ClientDynamicConfigOut:
        return S.ClientDynamicConfigOut()

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = await metrics() if metrics is not None else ""
        return Response(text, media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- sessions
    @app.get(f"{v1}/get_server_capabilities")
    async def capabilities(u: User) -> S.ServerCapabilitiesOut:
        return service.models.capabilities()

    @app.post(f"{v1}/create_session")
    async def create_session(req: S.CreateSessionIn, u: User, request: Request) -> S.CreateSessionOut:
        return await once(request, u, lambda: service.models.create_session(u, req), S.CreateSessionOut)

    @app.post(f"{v1}/session_heartbeat")
    async def heartbeat(req: S.SessionIdIn, u: User) -> S.SessionHeartbeatOut:
        return await service.models.heartbeat(u, req.session_id)

    @app.post(f"{v1}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, u: User) -> S.EmptyOut:
        return await service.models.finish_session(u, session_id)

    @app.get(f"{v1}/sessions/{{session_id}}")
    async def get_session(session_id: str, u: User) -> S.SessionOut:
        return await service.models.get_session(u, session_id)

    @app.get(f"{v1}/sessions")
    async def list_sessions(u: User) -> S.SessionsOut:
        return await service.models.list_sessions(u)

    @app.post(f"{v1}/telemetry")
    async def telemetry(u: User) -> S.TelemetryOut:
        return S.TelemetryOut()

    # ---------------------------------------------------------------- training
    @app.post(f"{v1}/create_model")
    async def create_model(req: S.CreateModelIn, u: User, request: Request) -> S.UntypedFuture:
        return await once(request, u, lambda: service.models.create_model(u, req), S.UntypedFuture)

    @app.post(f"{v1}/get_info")
    async def get_info(req: S.ModelIdIn, u: User) -> S.GetInfoOut:
        return await service.models.get_info(u, req.model_id)

    @app.post(f"{v1}/forward_backward")
    async def forward_backward(request: Request, u: User) -> S.UntypedFuture:
        if "protobuf" not in request.headers.get("content-type", ""):
            raise SkyrlError(415, "body: forward_backward takes application/x-protobuf (tinker_public.ForwardBackwardRequest)",
                             "body")
        if request.headers.get("content-encoding", "").lower() not in ("", "identity"):
            raise SkyrlError(415, "Content-Encoding: compressed bodies are not accepted", "Content-Encoding")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise SkyrlError(413, f"body: {len(body)} bytes is over {MAX_BODY}", "body")
        return await once(request, u, lambda: service.training.forward_backward(u, body), S.UntypedFuture)

    @app.post(f"{v1}/optim_step")
    async def optim_step(req: S.OptimStepIn, u: User, request: Request) -> S.UntypedFuture:
        return await once(request, u, lambda: service.training.optim_step(u, req), S.UntypedFuture)

    @app.post(f"{v1}/save_weights")
    async def save_weights(req: S.SaveWeightsIn, u: User, request: Request) -> S.UntypedFuture:
        return await once(request, u, lambda: service.training.save_weights(u, req), S.UntypedFuture)

    @app.post(f"{v1}/save_weights_for_sampler")
    async def save_for_sampler(req: S.SaveWeightsForSamplerIn, u: User, request: Request) -> S.UntypedFuture:
        return await once(request, u, lambda: service.training.save_weights_for_sampler(u, req), S.UntypedFuture)

    @app.post(f"{v1}/save_weights_external")
    async def save_weights_external(req: S.SaveWeightsExternalIn, u: User, request: Request) -> S.UntypedFuture:
        return await once(request, u, lambda: service.training.save_weights_external(u, req), S.UntypedFuture)

    @app.post(f"{v1}/load_weights")
    async def load_weights(req: S.LoadWeightsIn, u: User, request: Request) -> S.UntypedFuture:
        return await once(request, u, lambda: service.training.load_weights(u, req), S.UntypedFuture)

    # ---------------------------------------------------------------- sampling
    # (asample is not made idempotent: the SDK sends it without retries, a resend gets a new key)
    @app.post(f"{v1}/create_sampling_session")
    async def create_sampling_session(req: S.CreateSamplingSessionIn, u: User,
                                      request: Request) -> S.CreateSamplingSessionOut:
        return await once(request, u, lambda: service.sampling.create_sampling_session(u, req), S.CreateSamplingSessionOut)

    @app.get(f"{v1}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str, u: User) -> S.SamplerOut:
        return await service.sampling.get_sampler(u, sampler_id)

    @app.post(f"{v1}/cancel_future")
    async def cancel_future(u: User) -> S.EmptyOut:  # sample cancels are off (dynamic config): never sent
        return S.EmptyOut()

    # ---------------------------------------------------------------- runs and checkpoints
    @app.get(f"{v1}/training_runs")
    async def training_runs(u: User, limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                            offset: Annotated[int, Query(ge=0)] = 0) -> S.TrainingRunsOut:
        return await service.checkpoints.training_runs(u, limit, offset)

    @app.get(f"{v1}/training_runs/{{run_id}}")
    async def training_run(run_id: str, u: User) -> S.TrainingRunOut:
        return await service.checkpoints.training_run(u, run_id)

    @app.get(f"{v1}/training_runs/{{run_id}}/checkpoints")
    async def run_checkpoints(run_id: str, u: User) -> S.CheckpointsOut:
        return await service.checkpoints.checkpoints(u, run_id)

    @app.get(f"{v1}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}/external_weights_urls")
    async def external_weights_urls(run_id: str, checkpoint_id: str, u: User, request: Request) -> S.ExternalWeightsUrlsOut:
        return await service.checkpoints.external_weights_urls(u, run_id, checkpoint_id, str(request.base_url))

    @app.put(f"{v1}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}/ttl")
    async def checkpoint_ttl(run_id: str, checkpoint_id: str, req: S.CheckpointTtlIn, u: User) -> S.EmptyOut:
        return await service.checkpoints.set_checkpoint_ttl(u, run_id, checkpoint_id, req.ttl_seconds)

    @app.get(f"{v1}/external_weights/{{run_id}}/{{name}}/{{filename}}")
    async def external_weights_file(run_id: str, name: str, filename: str, expires: int, signature: str) -> FileResponse:
        """A signed URL from external_weights_urls: fetched without an API key (the SDK uses plain urllib)."""
        path = await service.checkpoints.external_file(run_id, name, filename, expires, signature)
        return FileResponse(path, media_type="application/octet-stream", filename=filename)

    @app.delete(f"{v1}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}")
    async def delete_checkpoint(run_id: str, checkpoint_id: str, u: User) -> S.EmptyOut:
        return await service.checkpoints.delete_checkpoint(u, run_id, checkpoint_id)

    @app.get(f"{v1}/checkpoints")
    async def user_checkpoints(u: User) -> S.CheckpointsOut:
        return await service.checkpoints.checkpoints(u, None)

    @app.post(f"{v1}/weights_info")
    async def weights_info(req: S.WeightsInfoIn, u: User) -> S.WeightsInfoOut:
        return await service.checkpoints.weights_info(u, req.tinker_path)

    return SamplingHotPath(app, service, v1)  # asample and retrieve_future skip FastAPI's per-request work


__all__ = ["create_app", "PROTO"]
