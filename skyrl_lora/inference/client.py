"""RemoteInferenceClient: sampling, seamless continuation after aborts, and LoRA control over many servers.

The pause gate lives in the servers, so this client keeps no pause state of its own: any number of
clients, in any processes, see the same pause. HTTP connections belong to the event loop that made
them, so the client keeps one httpx pool per running loop and works across many ``asyncio.run`` calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
import weakref
import zlib
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import BaseModel

from skyrl_lora.inference.protocol import (
    GenerateRequest,
    GenerateResponse,
    LoadLoraResponse,
    SampleOut,
    SamplingParamsIn,
    ServerState,
    SyncMode,
)
from skyrl_lora.inference.stitching import StitchedSample, continuation_params

logger = logging.getLogger(__name__)


class InferenceError(Exception):
    """A server refused or failed a request; carries the server URL, HTTP status and its message."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.url = url
        self.status = status
        self.message = message


class FanOutError(Exception):
    """Some servers of a fanned-out call failed; every failure is listed with its URL."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        lines = "; ".join(f"{url}: {exc}" for url, exc in errors.items())
        super().__init__(f"{len(errors)} server(s) failed: {lines}")
        self.errors = errors


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RemoteInferenceClient:
    def __init__(self, urls: Sequence[str] | str, *, timeout_s: float = 600.0, owner: str | None = None,
                 transport_retries: int = 3) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("urls: at least one server URL is needed")
        self.timeout_s = timeout_s
        self.owner = owner or default_owner()
        self.transport_retries = transport_retries
        self._outstanding: dict[str, int] = {u: 0 for u in self.urls}
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ transport
    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
            client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0), limits=limits)
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def _post(self, url: str, path: str, body: BaseModel | dict[str, Any] | None = None) -> Any:
        payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        resp = await self._http().post(url + path, json=payload)
        return _decode(url, resp)

    async def _get(self, url: str, path: str) -> Any:
        return _decode(url, await self._http().get(url + path))

    async def _fan_out(self, path: str, body: BaseModel | dict[str, Any] | None) -> list[Any]:
        results = await asyncio.gather(*(self._post(u, path, body) for u in self.urls), return_exceptions=True)
        errors = {u: r for u, r in zip(self.urls, results) if isinstance(r, BaseException)}
        if errors:
            raise FanOutError(errors)
        return list(results)

    def pick_server(self, session_id: str | None = None) -> str:
        """Least outstanding work; a session sticks to one server (its prefix cache) unless that
        server carries clearly more than the least loaded one."""
        least = min(self.urls, key=lambda u: self._outstanding.get(u, 0))
        if session_id is None:
            return least
        home = self.urls[zlib.crc32(session_id.encode()) % len(self.urls)]
        if self._outstanding.get(home, 0) <= self._outstanding.get(least, 0) + 4:
            return home
        return least

    # ------------------------------------------------------------------ sampling
    async def sample(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParamsIn | dict[str, Any] | None = None,
                     lora_name: str | None = None, num_samples: int = 1, *, prefix_output_token_ids: Sequence[int] = (),
                     session_id: str | None = None, url: str | None = None) -> list[SampleOut]:
        """One round trip; a sample may come back with ``finish_reason == "abort"`` and partial tokens."""
        params = _params(sampling_params)
        request = GenerateRequest(prompt_token_ids=list(prompt_token_ids), prefix_output_token_ids=list(prefix_output_token_ids),
                                  sampling_params=params, lora_name=lora_name, num_samples=num_samples)
        last_exc: Exception | None = None
        tried: list[str] = []
        for _ in range(max(1, self.transport_retries)):
            target = url or self.pick_server(session_id)
            if target in tried and len(tried) < len(self.urls):
                target = next(u for u in self.urls if u not in tried)
            tried.append(target)
            self._outstanding[target] = self._outstanding.get(target, 0) + num_samples
            try:
                data = await self._post(target, "/skyrl/v1/generate", request)
                return GenerateResponse.model_validate(data).samples
            except httpx.TransportError as exc:  # server gone: the caller's tokens so far are safe with us
                last_exc = exc
                logger.warning("server %s unreachable (%s); trying another", target, exc)
            finally:
                self._outstanding[target] -= num_samples
        raise InferenceError(tried[-1], 503, f"no server reachable: {last_exc!r}")

    async def sample_with_retry(self, prompt_token_ids: Sequence[int],
                                sampling_params: SamplingParamsIn | dict[str, Any] | None = None,
                                lora_name: str | None = None, num_samples: int = 1, *, session_id: str | None = None,
                                max_segments: int = 10_000) -> list[SampleOut]:
        """Like :meth:`sample`, but an aborted sample is continued from ``prompt + tokens so far`` until it
        finishes for another reason; tokens, logprobs and version spans are concatenated."""
        params = _params(sampling_params)
        first = await self.sample(prompt_token_ids, params, lora_name, num_samples, session_id=session_id)

        async def finish(seg: SampleOut) -> SampleOut:
            stitched = StitchedSample()
            stitched.add(seg)
            while stitched.finish_reason == "abort":
                if stitched.segments >= max_segments:
                    raise InferenceError("client", 500, f"sample still aborted after {max_segments} segments")
                next_params = continuation_params(params, len(stitched.token_ids), stitched.segments)
                if next_params is None:  # aborted exactly at its budget: it is complete
                    stitched.finish_reason = "length"
                    break
                (cont,) = await self.sample(prompt_token_ids, next_params, lora_name, 1,
                                            prefix_output_token_ids=stitched.token_ids, session_id=session_id)
                stitched.add(cont)
            return stitched.as_sample()

        return list(await asyncio.gather(*(finish(seg) for seg in first)))

    # ------------------------------------------------------------------ control (fanned out)
    async def pause_generation(self, lora_name: str | None = None, *, lease_s: float = 60.0) -> list[dict[str, Any]]:
        return await self._fan_out("/skyrl/v1/pause", {"lora_name": lora_name, "owner": self.owner, "lease_s": lease_s})

    async def resume_generation(self, lora_name: str | None = None) -> list[dict[str, Any]]:
        return await self._fan_out("/skyrl/v1/resume", {"lora_name": lora_name, "owner": self.owner})

    async def abort_lora_requests(self, lora_name: str) -> int:
        results = await self._fan_out("/skyrl/v1/abort_lora_requests", {"lora_name": lora_name})
        return sum(int(r["aborted"]) for r in results)

    async def load_lora_adapter(self, name: str, path: str, load_inplace: bool = True,
                                mode: SyncMode = "abort") -> list[LoadLoraResponse]:
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": load_inplace, "mode": mode}
        return [LoadLoraResponse.model_validate(r) for r in await self._fan_out("/skyrl/v1/load_lora_adapter", body)]

    async def unload_lora_adapter(self, name: str) -> None:
        await self._fan_out("/skyrl/v1/unload_lora_adapter", {"lora_name": name})

    async def update_lora(self, name: str, path: str, mode: SyncMode = "abort", *, create: bool = False
                          ) -> list[LoadLoraResponse]:
        """Sync one tenant on every server: only that tenant's requests stop, and only for a flip.
        ``create``: a server that does not have the LoRA yet loads it (the tenant's first sync)."""
        body = {"lora_name": name, "lora_path": str(path), "mode": mode, "create": create}
        return [LoadLoraResponse.model_validate(r) for r in await self._fan_out("/skyrl/v1/update_lora", body)]

    async def state(self) -> list[ServerState]:
        return [ServerState.model_validate(await self._get(u, "/skyrl/v1/state")) for u in self.urls]


def _params(sampling_params: SamplingParamsIn | dict[str, Any] | None) -> SamplingParamsIn:
    if sampling_params is None:
        return SamplingParamsIn()
    if isinstance(sampling_params, SamplingParamsIn):
        return sampling_params
    return SamplingParamsIn.model_validate(sampling_params)


def _decode(url: str, resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            err = body.get("error") if isinstance(body, dict) else None
            message = err.get("message") if isinstance(err, dict) else (body.get("detail") if isinstance(body, dict) else body)
        except ValueError:
            message = resp.text
        raise InferenceError(url, resp.status_code, str(message))
    return resp.json()
