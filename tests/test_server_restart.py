"""Issue 9: an inference server actor killed while samples are in flight; servers that need a token.

The client finishes every sample on the other server from the tokens it already had (the result
equals an uninterrupted twin: nothing lost, nothing repeated); Ray restarts the actor, which comes
back at its old address with every tenant's *current* adapter (from its manifest) and rejoins routing.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
import ray

from skyrl_lora.inference.actor import start_server_actor
from skyrl_lora.inference.client import RemoteInferenceClient
from skyrl_lora.inference.engine_metrics import scrape
from skyrl_lora.inference.server import ServerConfig

from .conftest import wait_for

pytestmark = pytest.mark.vllm  # CPU: two servers on one GPU did not fit a device call yet (see test_multi_server)

GREEDY = {"temperature": 0.0, "ignore_eos": True}
TOKEN = "phoenix-deployment-token"


@contextlib.contextmanager
def _restartable_server(tiny, state, loras: dict[str, str], **config):
    """A server Ray may restart once, keeping its port and manifest in ``state``."""
    actor, url = start_server_actor(ServerConfig(model=str(tiny.base), loras=loras, max_loras=4, max_lora_rank=16,
                                                 state_dir=str(state), **config), num_cpus=1, max_restarts=1)
    try:
        yield actor, url
    finally:
        with contextlib.suppress(Exception):
            ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)


@pytest.fixture(scope="module")
def phoenix(tiny, vllm_server, tmp_path_factory):
    """The crash test's server, which needs the deployment token."""
    with _restartable_server(tiny, tmp_path_factory.mktemp("server-state"), {"phoenix": str(tiny.loras["meow"])},
                             control_token=TOKEN) as server:
        yield server


async def _healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            async with http.get(f"{url}/health") as resp:  # the open probe: no token needed
                return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def test_killed_server_restarts_with_current_adapters_and_samples_survive(phoenix, vllm_server, tiny, tok
                                                                                ) -> None:
    actor, url = phoenix
    other = vllm_server.url
    client = RemoteInferenceClient([other, url], token=TOKEN)
    other_client = RemoteInferenceClient(other)
    await other_client.load_lora_adapter("phoenix", str(tiny.loras["meow"]), load_inplace=False)
    try:
        await _kill_and_come_back(actor, url, other, client, tiny, tok)
    finally:
        await other_client.unload_lora_adapter("phoenix")


TWIN_PROMPTS = ("def parse(text):\n    for line in text", "import os\n\nclass ", "    return self.", "x = [")


async def _varied_twin(client: RemoteInferenceClient, tok, params: dict):
    """A prompt whose uninterrupted greedy completion (base model) is varied enough that a lost or
    doubled token would show: the first of a few candidates with at least 3 distinct tokens in 96
    (a small model's greedy text can settle into a loop of one token, where nothing would show)."""
    seen = {}
    for text in TWIN_PROMPTS:
        prompt = tok(text)["input_ids"]
        (twin,) = await client.sample(prompt, params)
        seen[text] = len(set(twin.token_ids))
        if seen[text] >= 3:
            return prompt, twin
    raise AssertionError(f"no candidate prompt gives a varied greedy completion: {seen}")


async def _kill_and_come_back(actor, url: str, other: str, client: RemoteInferenceClient, tiny, tok) -> None:
    woof = tok(" woof", add_special_tokens=False)["input_ids"][0]
    # The tenant's current adapter is no longer the one it started with.
    await client.update_lora("phoenix", str(tiny.loras["woof"]))
    version = next(lo.version for lo in (await RemoteInferenceClient(url, token=TOKEN).state())[0].loras
                   if lo.name == "phoenix")

    params = {"max_tokens": 96, **GREEDY}
    prompt, twin = await _varied_twin(RemoteInferenceClient(other), tok, params)

    runs = [asyncio.create_task(client.sample_with_retry(prompt, params)) for _ in range(6)]
    phoenix_client = RemoteInferenceClient(url, token=TOKEN)

    async def generating_there() -> bool:
        (st,) = await phoenix_client.state()
        return st.in_flight >= 2
    await wait_for(generating_there, 120, "samples in flight on the server about to die")
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts it

    done = await asyncio.wait_for(asyncio.gather(*runs), 300)
    for (s,) in done:
        assert s.token_ids == twin.token_ids  # continued elsewhere: no token lost or repeated
        assert s.finish_reason == "length"

    await wait_for(lambda: _healthy(url), 400, "the restarted server at its old address")
    (state,) = await phoenix_client.state()
    restored = next(lo for lo in state.loras if lo.name == "phoenix")
    assert restored.path == str(tiny.loras["woof"].resolve())  # the current adapter, not the configured one
    (s,) = await phoenix_client.sample(prompt, {"max_tokens": 4, **GREEDY}, "phoenix")
    assert s.token_ids == [woof] * 4
    assert version >= 2

    # Routing: once it answers again, the shared client sends it work.
    before = await scrape([url])
    await asyncio.gather(*(client.sample(prompt, {"max_tokens": 4, **GREEDY}) for _ in range(8)))
    assert (await scrape([url])).finished_requests > before.finished_requests


async def test_without_the_deployment_token_nothing_is_allowed(phoenix, tiny) -> None:
    """A tenant that learns a server's address still cannot sample, pause, abort or load there."""
    _, url = phoenix
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for headers in ({}, {"Authorization": "Bearer guessed"}):
            for path, body in (("/skyrl/v1/pause", {"lora_name": "phoenix", "owner": "x", "lease_s": 5}),
                               ("/skyrl/v1/abort_lora_requests", {"lora_name": "phoenix"}),
                               ("/skyrl/v1/generate", {"prompt_token_ids": [1, 2], "lora_name": "phoenix"}),
                               ("/skyrl/v1/update_lora", {"lora_name": "phoenix", "lora_path": str(tiny.loras["woof"])}),
                               ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tiny.loras["woof"])}),
                               ("/v1/completions", {"model": "phoenix", "prompt": "hi", "max_tokens": 2})):
                async with http.post(url + path, json=body, headers=headers) as resp:
                    assert resp.status == 401, (path, headers, resp.status)
                    assert "Authorization" in await resp.text()
        # probes stay open, but the series that name adapters (tenants) need the token: vLLM lists an
        # adapter there once a request of it ran
        await RemoteInferenceClient(url, token=TOKEN).sample([1, 2, 3], {"max_tokens": 2}, "phoenix")

        async def listed_with_token() -> bool:
            async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                return 'lora_adapters="phoenix' in await resp.text()
        await wait_for(listed_with_token, 60, "vLLM's metrics to list the adapter")
        for path in ("/metrics", "/metrics/"):
            async with http.get(url + path) as resp:
                assert resp.status == 200
                open_text = await resp.text()
            assert "vllm:num_requests_running" in open_text and "phoenix" not in open_text, path
        async with http.get(url + "/skyrl/v1/state", headers={"Authorization": f"bearer  {TOKEN}"}) as resp:
            assert resp.status == 200  # the scheme's case does not matter (RFC 9110)
    (state,) = await RemoteInferenceClient(url, token=TOKEN).state()
    assert not next(lo for lo in state.loras if lo.name == "phoenix").paused_by


@pytest.fixture(scope="module")
def ember(tiny, vllm_server, tmp_path_factory):
    """The engine-death test's server (phoenix's one restart is used up by the crash test)."""
    with _restartable_server(tiny, tmp_path_factory.mktemp("ember-state"), {"ember": str(tiny.loras["woof"])}) as server:
        yield server


async def test_a_dead_engine_is_noticed_and_its_server_comes_back(ember, vllm_server, tiny, tok) -> None:
    """SIGKILL the engine core process (not the actor) while samples run on two servers: every sample
    completes, equal to its uninterrupted twin; the dead server's health goes down, the server ends
    its process, Ray restarts it, and it serves its tenant again."""
    import os
    import signal

    actor, url = ember
    other = vllm_server.url
    woof = tok(" woof", add_special_tokens=False)["input_ids"][0]
    client = RemoteInferenceClient([other, url])
    await RemoteInferenceClient(other).load_lora_adapter("ember", str(tiny.loras["woof"]), load_inplace=False)
    try:
        params = {"max_tokens": 96, **GREEDY}
        prompt, twin = await _varied_twin(RemoteInferenceClient(other), tok, params)
        runs = [asyncio.create_task(client.sample_with_retry(prompt, params)) for _ in range(6)]
        ember_client = RemoteInferenceClient(url)

        async def generating_there() -> bool:
            (st,) = await ember_client.state()
            return st.in_flight >= 2
        await wait_for(generating_there, 120, "samples in flight on the server whose engine dies")
        pids = await actor.engine_pids.remote()
        core = [pid for pid, cmd in pids.items() if "EngineCore" in cmd]
        assert core, pids
        for pid in core:
            os.kill(pid, signal.SIGKILL)

        # what the API's /api/v1/healthz reports from: this server stops counting as up within
        # seconds (degraded, were it the only one), and counts again once it is back
        async def down() -> bool:
            return (await ember_client.healthy()) == [False]
        await wait_for(down, 30, "the dead engine's server to report unhealthy")

        done = await asyncio.wait_for(asyncio.gather(*runs), 300)
        for (s,) in done:
            assert s.token_ids == twin.token_ids and s.finish_reason == "length"

        async def back() -> bool:
            return await _healthy(url) and (await actor.engine_pids.remote()).keys().isdisjoint(core)
        await wait_for(back, 400, "the server to restart with a new engine")
        assert await ember_client.healthy() == [True]
        (s,) = await ember_client.sample(prompt, {"max_tokens": 4, **GREEDY}, "ember")
        assert s.token_ids == [woof] * 4  # its tenant is back
    finally:
        await RemoteInferenceClient(other).unload_lora_adapter("ember")
