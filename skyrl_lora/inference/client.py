"""RemoteInferenceClient: sampling, seamless continuation after aborts, and LoRA control over many servers.

The pause gate lives in the servers, so this client keeps no pause state of its own: any number of
clients, in any processes, see the same pause. HTTP connections belong to the event loop that made
them, so the client keeps one aiohttp session per running loop and works across many ``asyncio.run``
calls. aiohttp rather than httpx: under 32 concurrent samples httpx's connection-pool bookkeeping was
a fifth of the API service's CPU (profiled with py-spy); aiohttp's pool costs a fraction of that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.protocol import (
    GenerateRequest,
    GenerateResponse,
    LoadLoraResponse,
    SampleOut,
    SamplingParamsIn,
    ServerState,
    SlotPlanResponse,
    SyncMode,
)
from skyrl_lora.inference.server import SERVER_KEEP_ALIVE_S
from skyrl_lora.inference.stitching import StitchedSample, continuation_params
from skyrl_lora.inference.uploads import ADAPTER_FILES

logger = logging.getLogger(__name__)


class InferenceError(SkyrlError):
    """A server refused or failed a request: its URL, the HTTP status and the server's message and field."""

    def __init__(self, url: str, status: int, message: str, field_name: str | None = None) -> None:
        super().__init__(status, message, field_name)
        self.url = url

    def __str__(self) -> str:
        return f"{self.url}: HTTP {self.status}: {self.message}"

    def __reduce__(self) -> tuple[type[InferenceError], tuple[str, int, str, str | None]]:  # type: ignore[override]
        return (type(self), (self.url, self.status, self.message, self.field))


class ServerUnreachable(InferenceError, aiohttp.ClientConnectionError):
    """No answer from the server (refused, reset, closed): a 503. Still an aiohttp connection error, so
    the code that fails over or retries on those keeps doing so."""


class ServerTimeout(InferenceError, TimeoutError):
    """The server did not answer within the client's timeout: a 504 (and a ``TimeoutError``)."""


class FanOutError(SkyrlError):
    """Some servers of a fanned-out call failed; every failure is listed with its URL. Its status and
    field are the first failure's (a 502 when that one is not ours)."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        lines = "; ".join(f"{url}: {exc}" for url, exc in errors.items())
        first = next(iter(errors.values()), None)
        status = first.status if isinstance(first, SkyrlError) else 502
        field = first.field if isinstance(first, SkyrlError) else None
        super().__init__(status, f"{len(errors)} server(s) failed: {lines}", field)
        self.errors = errors

    def __reduce__(self) -> tuple[type[FanOutError], tuple[dict[str, BaseException]]]:  # type: ignore[override]
        return (type(self), (self.errors,))


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# Idle connections are dropped well before the server drops them (server.SERVER_KEEP_ALIVE_S), so a
# request never goes out on a socket the server is closing.
CLIENT_KEEP_ALIVE_S = SERVER_KEEP_ALIVE_S / 2
CONTROL_RETRY_DELAY_S = 0.2


class RemoteInferenceClient:
    def __init__(self, urls: Sequence[str] | str, *, timeout_s: float = 600.0, owner: str | None = None,
                 transport_retries: int = 3, down_cooloff_s: float = 2.0, token: str | None = None) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("urls: at least one server URL is needed")
        self.timeout_s = timeout_s
        # the deployment's bearer token for servers that require one, always handed in (``InferenceCluster.client``),
        # never read from the environment: a variable one process set would be a side channel to the next
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.owner = owner or default_owner()
        self.transport_retries = transport_retries
        self._outstanding: dict[str, int] = {u: 0 for u in self.urls}
        # A server that refused a connection is skipped for a cool-off, then tried again: a crashed
        # server that Ray restarts at the same address rejoins routing by itself.
        self.down_cooloff_s = down_cooloff_s
        self._down_until: dict[str, float] = {}
        self._nodes: dict[str, str | None] = {}  # each server's node, for publications (_nodes_of_servers)
        # loop -> (session, keeper): the keeper is an async generator whose ``finally`` closes the
        # session when the loop shuts its async generators down (``asyncio.run`` and pytest do).
        self._sessions: dict[asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, AsyncGenerator[None, None]]] = {}

    # ------------------------------------------------------------------ transport
    async def _http(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        entry = self._sessions.get(loop)
        if entry is not None and not entry[0].closed:
            return entry[0]
        for other in [lp for lp in self._sessions if lp.is_closed()]:  # loops that ended: forget them
            del self._sessions[other]
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=CLIENT_KEEP_ALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=10.0))
        keeper = _close_with_loop(session)
        await keeper.__anext__()
        self._sessions[loop] = (session, keeper)
        return session

    async def aclose(self) -> None:
        entry = self._sessions.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].close()
            await entry[1].aclose()

    async def _request(self, method: str, url: str, path: str, body: BaseModel | dict[str, Any] | None = None,
                       *, content: bytes | None = None) -> bytes:
        """One call; ``content``: a raw body (octet-stream) instead of JSON."""
        data = body.model_dump_json().encode() if isinstance(body, BaseModel) else (
            None if body is None else orjson.dumps(body))
        session = await self._http()
        headers = {"Content-Type": "application/json", **self._auth} if data is not None else self._auth
        if content is not None:
            data, headers = content, {"Content-Type": "application/octet-stream", **self._auth}
        # aiohttp's failures become this client's errors here, and only here
        try:
            async with session.request(method, url + path, data=data, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnreachable(url, 503, f"{path}: no answer ({exc!r})") from exc
        except TimeoutError as exc:
            raise ServerTimeout(url, 504, f"{path}: no answer within {self.timeout_s:.0f} s") from exc
        except aiohttp.ClientError as exc:
            raise InferenceError(url, 502, f"{path}: {exc!r}") from exc
        if status >= 400:
            raise InferenceError(url, status, *_error_parts(raw))
        return raw

    async def _post(self, url: str, path: str, body: BaseModel | dict[str, Any] | None = None) -> Any:
        return orjson.loads(await self._request("POST", url, path, body))

    async def _get(self, url: str, path: str) -> Any:
        return orjson.loads(await self._request("GET", url, path))

    async def _post_retrying(self, url: str, path: str, body: BaseModel | dict[str, Any] | None) -> Any:
        """A control call (idempotent) tried a second time after a transient connection error: a
        socket the server closed while idle, or a server restarting at its address."""
        try:
            return await self._post(url, path, body)
        except aiohttp.ClientConnectionError as exc:
            logger.info("%s%s: %r; trying once more", url, path, exc)
            await asyncio.sleep(CONTROL_RETRY_DELAY_S)
            return await self._post(url, path, body)

    async def _each(self, call: Callable[[str], Awaitable[Any]], urls: Sequence[str] | None = None
                    ) -> tuple[list[Any], dict[str, BaseException]]:
        """``call(url)`` on every server (or ``urls``) at once: (every result, in server order; the
        failures by URL)."""
        urls = self.urls if urls is None else urls
        results = await asyncio.gather(*(call(u) for u in urls), return_exceptions=True)
        return results, {u: r for u, r in zip(urls, results) if isinstance(r, BaseException)}

    async def _fan_out(self, path: str, body: BaseModel | dict[str, Any] | None) -> list[Any]:
        results, errors = await self._each(lambda u: self._post_retrying(u, path, body))
        if errors:
            raise FanOutError(errors)
        return results

    def pick_server(self, session_id: str | None = None) -> str:
        """Least outstanding work; a session sticks to one server (its prefix cache) unless that
        server carries clearly more than the least loaded one."""
        now = time.monotonic()
        up = [u for u in self.urls if self._down_until.get(u, 0.0) <= now] or self.urls
        least = min(up, key=lambda u: self._outstanding.get(u, 0))
        if session_id is None:
            return least
        home = self.urls[zlib.crc32(session_id.encode()) % len(self.urls)]
        if home in up and self._outstanding.get(home, 0) <= self._outstanding.get(least, 0) + 4:
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
                raw = await self._request("POST", target, "/skyrl/v1/generate", request)
                self._down_until.pop(target, None)
                return GenerateResponse.model_validate_json(raw).samples
            except aiohttp.ClientConnectionError as exc:  # server gone: the caller's tokens so far are safe with us
                last_exc = exc
                self._down_until[target] = time.monotonic() + self.down_cooloff_s
                logger.warning("server %s unreachable (%s); trying another", target, exc)
            except InferenceError as exc:
                if exc.status != 503:
                    raise
                last_exc = exc  # its engine died; it restarts: the same as unreachable until then
                self._down_until[target] = time.monotonic() + self.down_cooloff_s
                logger.warning("server %s cannot serve (%s); trying another", target, exc.message)
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

    async def upload_adapter(self, url: str, upload_id: str, directory: str | Path) -> None:
        """Send an adapter directory's files to one server (one on another node than ``directory``)."""
        for filename in ADAPTER_FILES:
            data = await asyncio.to_thread((Path(directory) / filename).read_bytes)
            await self._request("PUT", url, f"/skyrl/v1/uploads/{upload_id}/{filename}", content=data)

    async def _sources(self, name: str, load_from: str, source_node: str) -> dict[str, dict[str, Any]]:
        """Per server, where it reads a new version from: ``load_from`` on the sender's node, else the
        files sent to it (an upload, in that server's node memory)."""
        nodes = await self._nodes_of_servers()
        remote = [u for u in self.urls if nodes[u] != source_node]
        upload_id = f"{name}-{uuid.uuid4().hex[:16]}"
        if remote:
            sent = await asyncio.gather(*(self.upload_adapter(u, upload_id, load_from) for u in remote),
                                        return_exceptions=True)
            failed = {u: r for u, r in zip(remote, sent) if isinstance(r, BaseException)}
            if failed:
                raise FanOutError(failed)
        return {u: ({"upload_id": upload_id, "load_from": None} if u in remote else {}) for u in self.urls}

    async def _nodes_of_servers(self) -> dict[str, str | None]:
        """Each server's node (``/skyrl/v1/state``), asked once and kept: a URL names one host. A failed
        sync forgets them (``update_lora``), in case a server came back elsewhere under its name."""
        missing = [u for u in self.urls if u not in self._nodes]
        if missing:
            states, errors = await self._each(lambda u: self._get(u, "/skyrl/v1/state"), missing)
            if errors:
                raise FanOutError(errors)
            self._nodes.update({u: st.get("node") for u, st in zip(missing, states)})
        return {u: self._nodes[u] for u in self.urls}

    async def update_lora(self, name: str, path: str, mode: SyncMode = "abort", *, create: bool = False,
                          load_from: str | None = None, off_loop: bool | None = None,
                          source_node: str | None = None) -> list[LoadLoraResponse]:
        """Sync one tenant on every server, all or nothing: the version is first staged (checked and
        loaded beside the serving one, off each engine's step loop) everywhere; only when every server
        staged it does any server flip. If one refuses, the others drop what they staged and keep
        serving the old version (FanOutError names each server's reason). Only that tenant's requests
        stop, and only for the flip. ``create``: a server without the LoRA loads it (a first sync).
        ``load_from``: read the weights from there now (shared memory on the servers' node) while
        ``path`` is where they are kept for good (a restarted server reloads from it).
        ``source_node``: the node ``load_from`` is on (``skyrl_lora.node_identity``); servers on other
        nodes get the files sent instead and keep the version in their own node's memory."""
        body = {"lora_name": name, "lora_path": str(path), "mode": mode, "create": create, "load_from": load_from,
                "off_loop": off_loop}
        try:
            return await self._update(name, body, load_from, source_node)
        except FanOutError:
            self._nodes.clear()
            raise

    async def _update(self, name: str, body: dict[str, Any], load_from: str | None,
                      source_node: str | None) -> list[LoadLoraResponse]:
        per_server: dict[str, dict[str, Any]] = {u: {} for u in self.urls}
        if load_from is not None and source_node is not None:
            per_server = await self._sources(name, load_from, source_node)
        if len(self.urls) == 1 and not per_server[self.urls[0]]:
            # one server reading the version where it is: all or nothing needs no second phase, so
            # staging and the flip go in one request (a round trip less on every sync)
            (reply,), errors = await self._each(lambda u: self._post(u, "/skyrl/v1/update_lora", body))
            if errors:
                raise FanOutError(errors)
            return [LoadLoraResponse.model_validate(reply)]
        staged, errors = await self._each(
            lambda u: self._post(u, "/skyrl/v1/stage_lora", {**body, **per_server[u]}))
        stage_ids = {u: r["stage_id"] for u, r in zip(self.urls, staged) if u not in errors}
        if errors:
            await asyncio.gather(*(self._post_retrying(u, "/skyrl/v1/discard_lora", {"stage_id": sid})
                                   for u, sid in stage_ids.items()), return_exceptions=True)
            raise FanOutError(errors)
        results, errors = await self._each(lambda u: self._post(u, "/skyrl/v1/commit_lora", {"stage_id": stage_ids[u]}))
        if errors:
            raise FanOutError(errors)
        return [LoadLoraResponse.model_validate(r) for r in results]

    async def healthy(self, timeout_s: float = 2.0) -> list[bool]:
        """Whether each server's engine answers (vLLM's /health is 503 once its engine has died)."""
        async def one(url: str) -> bool:
            try:
                session = await self._http()
                async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                    return resp.status == 200
            except (TimeoutError, aiohttp.ClientError):
                return False
        return list(await asyncio.gather(*(one(u) for u in self.urls)))

    async def state(self) -> list[ServerState]:
        return [ServerState.model_validate(await self._get(u, "/skyrl/v1/state")) for u in self.urls]

    async def slot_plans(self) -> list[SlotPlanResponse]:
        """Each server's slot layout (``slot_image``), in the order of ``urls``."""
        replies, errors = await self._each(lambda u: self._get(u, "/skyrl/v1/slot_plan"))
        if errors:
            raise FanOutError(errors)
        return [SlotPlanResponse.model_validate(r) for r in replies]


def _params(sampling_params: SamplingParamsIn | dict[str, Any] | None) -> SamplingParamsIn:
    if sampling_params is None:
        return SamplingParamsIn()
    if isinstance(sampling_params, SamplingParamsIn):
        return sampling_params
    return SamplingParamsIn.model_validate(sampling_params)


def _error_parts(raw: bytes) -> tuple[str, str | None]:
    """(message, field) of an error reply: ours (``skyrl_lora.errors.ErrorBody``) and vLLM's share
    ``{"error": {"message", ...}}``; otherwise FastAPI's ``detail``, or the text."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace"), None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            field = err.get("field")
            return str(err.get("message")), field if isinstance(field, str) else None
        return str(body.get("detail", err if err is not None else body)), None
    return str(body), None


async def _close_with_loop(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await session.close()
