"""Which calls a publication makes (pure client logic, against a recording HTTP stand-in): one server
that reads the version where it is gets one request (staging and flip together); several servers
get the two phases; each server's node is asked once and forgotten after a failed sync. Syncs against
real servers are in test_staging.py, test_multi_server.py and test_two_nodes.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from skyrl_lora.inference.client import FanOutError, RemoteInferenceClient

NODE = "node-a"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.refuse = False

    def app(self) -> web.Application:
        app = web.Application()
        reply = {"lora": {"name": "t", "version": 2, "path": "/p", "in_flight": 0, "paused_by": {}}}

        async def state(request: web.Request) -> web.Response:
            self.calls.append("state")
            return web.json_response({"node": NODE})

        async def post(request: web.Request) -> web.Response:
            route = request.match_info["route"]
            self.calls.append(route)
            if self.refuse:
                return web.json_response({"error": {"message": "lora_path: no", "field": "lora_path"}}, status=400)
            return web.json_response({"stage_id": "s1", "lora_name": "t", "staging_s": 0.0}
                                     if route == "stage_lora" else reply)

        app.router.add_get("/skyrl/v1/state", state)
        app.router.add_post("/skyrl/v1/{route}", post)
        return app


@pytest.fixture
async def servers() -> AsyncIterator[list[tuple[str, Recorder]]]:
    started = []
    for _ in range(2):
        rec = Recorder()
        runner = web.AppRunner(rec.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        started.append((runner, f"http://127.0.0.1:{port}", rec))
    yield [(url, rec) for _, url, rec in started]
    for runner, _, _ in started:
        await runner.cleanup()


async def test_one_server_on_the_node_gets_one_request_per_sync(servers) -> None:
    (url, rec), _ = servers
    client = RemoteInferenceClient(url)
    try:
        for _ in range(2):
            (reply,) = await client.update_lora("t", "/durable", load_from="/dev/shm/x", source_node=NODE)
            assert reply.lora.version == 2
        assert rec.calls == ["state", "update_lora", "update_lora"]  # the node asked once
        rec.calls.clear()
        await client.update_lora("t", "/durable")  # no shared-memory copy: the same one request
        assert rec.calls == ["update_lora"]
    finally:
        await client.aclose()


async def test_several_servers_get_both_phases_and_a_failed_sync_forgets_the_nodes(servers) -> None:
    (url_a, a), (url_b, b) = servers
    client = RemoteInferenceClient([url_a, url_b])
    try:
        await client.update_lora("t", "/durable", load_from="/dev/shm/x", source_node=NODE)
        assert a.calls == b.calls == ["state", "stage_lora", "commit_lora"]
        b.refuse = True
        with pytest.raises(FanOutError):
            await client.update_lora("t", "/durable", load_from="/dev/shm/x", source_node=NODE)
        assert a.calls[3:] == ["stage_lora", "discard_lora"] and b.calls[3:] == ["stage_lora"]
        b.refuse = False
        a.calls.clear()
        await client.update_lora("t", "/durable", load_from="/dev/shm/x", source_node=NODE)
        assert a.calls == ["state", "stage_lora", "commit_lora"]  # asked again after the failure
    finally:
        await client.aclose()
