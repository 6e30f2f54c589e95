"""Who may call what on an inference server: the deployment's bearer token, and what ``/metrics`` shows.

An ASGI wrapper rather than app middleware: vLLM has built the app's middleware stack by the time
our routes are installed, and Starlette refuses middleware added after that.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from skyrl_lora.errors import ErrorBody

OPEN_PATHS = frozenset({"/health", "/metrics", "/ping"})
# vLLM's lora_requests_info gauge lists the adapters running and waiting by name, i.e. the tenants
ADAPTER_NAME_LABELS = (b"running_lora_adapters=", b"waiting_lora_adapters=", b"lora_name=")


def redact_adapter_names(text: bytes) -> bytes:
    """Prometheus text without the series whose labels name adapters (the counters and histograms,
    summed over all tenants, stay)."""
    return b"\n".join(line for line in text.split(b"\n")
                      if line.startswith(b"#") or not any(label in line for label in ADAPTER_NAME_LABELS))


class AccessGuard:
    """Every route but the health and metrics probes needs the bearer token (when the deployment has
    one). ``/metrics`` is open for scrapers, but the series that name tenants' adapters are only in
    the answer to a caller with the token."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self._expected = None if token is None else token.encode()

    def _authorised(self, scope: dict[str, Any]) -> bool:
        if self._expected is None:
            return False
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, credentials = given.strip().partition(b" ")
        # the scheme is case-insensitive (RFC 9110 §11.1); the token is compared in constant time
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        # vLLM mounts its metrics app on every path that starts with /metrics (no redirect to /metrics/)
        if path.startswith("/metrics") and not self._authorised(scope):
            await self._redacted_metrics(scope, receive, send)
            return
        if path not in OPEN_PATHS and self._expected is not None and not self._authorised(scope):
            response = JSONResponse(status_code=401, content=ErrorBody.of(
                401, "Authorization: missing or wrong bearer token for this inference server", "Authorization").model_dump())
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _redacted_metrics(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def collect(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                text = redact_adapter_names(b"".join(body))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": headers + [(b"content-length", str(len(text)).encode())]})
                await send({"type": "http.response.body", "body": text})

        # ask for plain text: prometheus' app gzips for clients that accept it, and gzip can't be filtered
        plain = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"accept-encoding"]}
        await self.app(plain, receive, collect)
