"""``asample`` and ``retrieve_future`` served as plain ASGI, ahead of the FastAPI app.

Every sample is two exchanges with the service, so these two routes are nearly all of its traffic.
Profiled under 32 concurrent samples (``bench/api_overhead.py``), FastAPI's per-request machinery
(middleware stack, dependency solving, response encoding) cost more of the service's CPU than the
sampling work itself, and a single service process then became the queue in front of vLLM. Here a
request is one body read, one pydantic parse and one write. Authentication, the error shape
(status + message naming the field) and the reply bodies are the same as on every other route.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import ValidationError

from skyrl_lora.api import schemas as S
from skyrl_lora.api.futures import Result
from skyrl_lora.api.service import TinkerService
from skyrl_lora.errors import ErrorBody, SkyrlError

logger = logging.getLogger(__name__)
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_JSON_BODY = 64 << 20


class ClientGone(Exception):
    """The client closed the connection before its request body arrived."""


def error_body(status: int, message: str, field: str | None = None) -> bytes:
    """The one error shape of every plane (``skyrl_lora.errors.ErrorBody``), as bytes."""
    return ErrorBody.of(status, message, field).model_dump_json().encode()


def first_error(errors: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """(field, message) of a validation failure's first error; ``body`` when no field is to blame."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = list(first.get("loc", ()))
    if loc and loc[0] in skip:  # where FastAPI found it (body, query, ...), not a field: a field may be named "path"
        loc = loc[1:]
    field = ".".join(str(x) for x in loc) or "body"
    return field, f"{field}: {first.get('msg', 'invalid')}"


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise SkyrlError(413, f"body: over {MAX_JSON_BODY} bytes", "body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _require_json(scope: Scope) -> None:
    """These routes take JSON, as FastAPI's routes check for every other one."""
    given = next((v for k, v in scope["headers"] if k == b"content-type"), b"").decode("latin-1")
    if given.split(";", 1)[0].strip().lower() not in ("application/json", ""):
        raise SkyrlError(400, f"Content-Type: expected application/json, got '{given}'", "Content-Type")


async def _reply(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SamplingHotPath:
    """ASGI app: answers ``POST /api/v1/asample`` and ``/api/v1/retrieve_future``, hands the rest to ``app``."""

    def __init__(self, app: Any, service: TinkerService, prefix: str = "/api/v1") -> None:
        self.app = app
        self.service = service
        self._routes = {f"{prefix}/asample": self._asample, f"{prefix}/retrieve_future": self._retrieve}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            user = await self._user(scope)
            _require_json(scope)
            status, body, content_type = await handler(user, await _read_body(receive))
        except ClientGone:
            return
        except SkyrlError as exc:
            status, body, content_type = exc.status, error_body(exc.status, exc.message, exc.field), b"application/json"
        except ValidationError as exc:
            field, message = first_error([dict(e) for e in exc.errors(include_url=False)])
            status, body, content_type = 400, error_body(400, message, field), b"application/json"
        except Exception as exc:  # never a bare 500 page
            logger.exception("unhandled error on %s", scope.get("path"))
            message = f"internal error: {type(exc).__name__}: {exc}"
            status, body, content_type = 500, error_body(500, message), b"application/json"
        await _reply(send, status, body, content_type)

    async def _user(self, scope: Scope) -> str:
        key = next((v for k, v in scope["headers"] if k == b"x-api-key"), None)
        return await self.service.authenticate(None if key is None else key.decode("latin-1"))

    async def _asample(self, user: str, body: bytes) -> tuple[int, bytes, bytes]:
        future = await self.service.sampling.sample(user, S.SampleIn.model_validate_json(body))
        return 200, future.model_dump_json().encode(), b"application/json"

    async def _retrieve(self, user: str, body: bytes) -> tuple[int, bytes, bytes]:
        request = S.FutureIn.model_validate_json(body)
        out = await self.service.futures.retrieve(user, request.request_id)
        if isinstance(out, Result):
            return 200, out.body, out.content_type.encode()
        return 200, orjson.dumps(out), b"application/json"
