"""The staging channel between the server and vLLM's workers (``stage_channel``), on its own: real
Unix datagram sockets, the worker's command thread, and the server's reader on a running loop."""

from __future__ import annotations

import asyncio
import queue
import threading

import pytest

from skyrl_lora.inference.stage_channel import ServerStageChannel, StageCommand, WorkerStageChannel


def _command(lora_id: int = 7, path: str = "/adapters/v2") -> StageCommand:
    return StageCommand(lora_int_id=lora_id, lora_name=f"t::v{lora_id}", lora_path=path, source=path)


@pytest.fixture
async def server():
    channel = ServerStageChannel.open()
    assert channel is not None, "Linux has abstract Unix sockets"
    yield channel
    channel.close()


def _worker(server: ServerStageChannel, on_command=None) -> tuple[WorkerStageChannel, queue.Queue]:
    got: queue.Queue = queue.Queue()

    def record(command: StageCommand) -> None:
        got.put((command, threading.current_thread().name))

    worker = WorkerStageChannel(server.name, on_command or record)
    assert worker.name is not None
    return worker, got


async def test_a_command_reaches_the_workers_thread_and_its_notice_comes_back(server: ServerStageChannel) -> None:
    worker, got = _worker(server)
    server.start([worker.name])
    assert server.direct
    with server.expect(7) as expected:
        assert server.send(_command())
        command, thread = await asyncio.to_thread(got.get, timeout=10)
        assert command == _command() and thread == "skyrl-stage-commands"  # not the engine's thread
        assert expected.outcome("/adapters/v2", workers=1) is None
        worker.notify(7, "/adapters/v2", "ok")
        await asyncio.wait_for(expected.event.wait(), 10)
        assert expected.outcome("/adapters/v2", workers=1) == "ok"
        assert expected.outcome("/adapters/v1", workers=1) is None  # another version of the same id
    assert server.received == 1 and server.commands == 1


async def test_every_worker_must_report_and_one_failure_is_the_outcome(server: ServerStageChannel) -> None:
    (a, _), (b, _) = _worker(server), _worker(server)
    server.start([a.name, b.name])
    with server.expect(3) as expected:
        a.notify(3, "/p", "ok")
        await asyncio.wait_for(expected.event.wait(), 10)
        assert expected.outcome("/p", workers=2) is None  # b has not said
        expected.event.clear()
        b.notify(3, "/p", "ValueError: lora_B has NaN")
        await asyncio.wait_for(expected.event.wait(), 10)
        assert expected.outcome("/p", workers=2) == "ValueError: lora_B has NaN"


async def test_a_command_that_fails_to_start_is_reported_as_a_failure(server: ServerStageChannel) -> None:
    def refuse(command: StageCommand) -> None:
        raise RuntimeError("no staging pool")

    worker, _ = _worker(server, refuse)
    server.start([worker.name])
    with server.expect(7) as expected:
        server.send(_command())
        await asyncio.wait_for(expected.event.wait(), 10)
        assert expected.outcome("/adapters/v2", workers=1) == "RuntimeError: no staging pool"


async def test_foreign_datagrams_and_notices_nobody_waits_for_are_dropped(server: ServerStageChannel) -> None:
    worker, got = _worker(server)
    server.start([worker.name])
    worker._send._sock.sendto(b"not a notice", "\0" + server.name)
    worker.notify(99, "/p", "ok")  # nobody expects 99
    server._send._sock.sendto(b"{}", "\0" + worker.name)  # not a command: the worker's thread goes on
    with server.expect(5) as expected:
        server.send(_command(5, "/q"))
        await asyncio.to_thread(got.get, timeout=10)
        worker.notify(5, "/q", "ok")
        await asyncio.wait_for(expected.event.wait(), 10)
    assert server.received == 2  # 99 and 5; the foreign datagram is not counted
    assert server._expected == {}  # nothing kept once its waiters left


async def test_a_worker_without_a_socket_sends_commands_the_engines_way(server: ServerStageChannel) -> None:
    worker, _ = _worker(server)
    server.start([worker.name, None])
    assert not server.direct
    gone = ServerStageChannel.open()
    assert gone is not None
    gone.start(["skyrl-stage-commands-nobody"])
    try:
        assert gone.send(_command()) is False and gone.commands == 0  # the caller falls back to collective_rpc
    finally:
        gone.close()
