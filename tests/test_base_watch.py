"""How a colocated trainer follows its server across restarts (``training/base_watch.py``): the
decisions alone, with the probe's answers given (the GPU test ``tests_cuda/test_shared_base_cuda.py``
kills a real server under a real colocated trainer)."""

from __future__ import annotations

import asyncio

import pytest

from skyrl_lora.errors import SkyrlError
from skyrl_lora.inference.protocol import ServerIncarnation
from skyrl_lora.training.base_watch import ServerDown, SharedBaseWatch


class Server:
    """What the probe answers next: an incarnation, a ServerDown, or a hang (a busy server)."""

    def __init__(self) -> None:
        self.answer: ServerIncarnation | Exception | None = ServerIncarnation(incarnation="run-1", started=True)
        self.calls: list[str] = []
        self.reshare_fails: Exception | None = None

    async def probe(self) -> ServerIncarnation:
        if self.answer is None:
            await asyncio.sleep(3600)
        if isinstance(self.answer, Exception):
            raise self.answer
        assert self.answer is not None
        return self.answer

    async def release(self) -> None:
        self.calls.append("release")

    async def reshare(self) -> str:
        self.calls.append("reshare")
        if self.reshare_fails is not None:
            raise self.reshare_fails
        assert isinstance(self.answer, ServerIncarnation)
        return self.answer.incarnation


def _watch(server: Server) -> SharedBaseWatch:
    return SharedBaseWatch("skyrl-server-0", "run-1", probe=server.probe, release=server.release,
                           reshare=server.reshare, poll_s=0.01, probe_timeout_s=0.05)


async def test_the_same_run_or_a_busy_server_changes_nothing() -> None:
    server = Server()
    watch = _watch(server)
    await watch.check()
    server.answer = None  # the probe times out: not evidence of a restart
    await watch.check()
    assert server.calls == [] and watch.ready and watch.incarnation == "run-1"
    await watch.wait_ready(0)  # returns at once


async def test_a_dead_server_releases_the_base_and_calls_wait_then_fail_naming_base_weights() -> None:
    server = Server()
    watch = _watch(server)
    server.answer = ServerDown("The actor died unexpectedly")
    await watch.check()
    await watch.check()  # released once, not per poll
    assert server.calls == ["release"] and not watch.ready and watch.incarnation is None
    with pytest.raises(SkyrlError) as waited:
        await watch.wait_ready(0.05)
    assert waited.value.status == 503 and waited.value.field == "base_weights"
    assert "skyrl-server-0" in waited.value.message


async def test_the_new_run_is_mapped_once_its_engine_is_up_and_waiting_calls_go_on() -> None:
    server = Server()
    watch = _watch(server)
    server.answer = ServerIncarnation(incarnation="run-2", started=False)  # restarted, vLLM still starting
    await watch.check()
    assert server.calls == ["release"] and not watch.ready
    waiting = asyncio.ensure_future(watch.wait_ready(30))
    server.answer = ServerIncarnation(incarnation="run-2", started=True)
    await watch.check()
    await asyncio.wait_for(waiting, 5)
    assert server.calls == ["release", "reshare"] and watch.ready and watch.incarnation == "run-2"
    assert watch.reshares == 1
    await watch.check()
    assert server.calls == ["release", "reshare"]


async def test_a_failed_reshare_is_tried_again_at_the_next_poll() -> None:
    server = Server()
    watch = _watch(server)
    server.answer = ServerIncarnation(incarnation="run-2", started=True)
    server.reshare_fails = RuntimeError("503: the server is not started")
    await watch.check()
    await watch.check()
    assert server.calls == ["release", "reshare", "reshare"] and not watch.ready
    server.reshare_fails = None
    await watch.check()
    assert watch.ready and watch.incarnation == "run-2" and watch.reshares == 1


async def test_the_watch_runs_until_cancelled() -> None:
    server = Server()
    watch = _watch(server)
    task = asyncio.ensure_future(watch.run())
    server.answer = ServerIncarnation(incarnation="run-3", started=True)
    deadline = asyncio.get_running_loop().time() + 10
    while watch.incarnation != "run-3":
        assert asyncio.get_running_loop().time() < deadline, server.calls
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.calls == ["release", "reshare"]
