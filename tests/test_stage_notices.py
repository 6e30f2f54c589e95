"""The notice socket between vLLM's workers and the server (``stage_notices``), on its own: a real
Unix datagram socket read by a running event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from skyrl_lora.inference.stage_notices import NoticeSender, StageNotices


@pytest.fixture
async def notices():
    opened = StageNotices.open()
    assert opened is not None, "Linux has abstract Unix sockets"
    opened.start()
    yield opened
    opened.close()


async def test_a_notice_from_another_thread_wakes_its_waiter_only(notices: StageNotices) -> None:
    sender = NoticeSender(notices.name)
    with notices.expect(7) as seven, notices.expect(8) as eight:
        threading.Thread(target=sender.send, args=(7,)).start()  # as a staging thread sends it
        await asyncio.wait_for(seven.wait(), 10)
        assert not eight.is_set()
    assert notices.received == 1


async def test_notices_nobody_waits_for_and_foreign_datagrams_are_dropped(notices: StageNotices) -> None:
    sender = NoticeSender(notices.name)
    sender.send(3)  # nobody waits for 3
    sender._sock.sendto(b"not an id", "\0" + notices.name)
    with notices.expect(4) as four:
        sender.send(4)
        await asyncio.wait_for(four.wait(), 10)
    assert notices.received == 2  # 3 and 4; the foreign datagram is not counted
    assert notices._waiting == {}  # nothing kept once its waiters left


async def test_two_stagings_of_one_id_share_the_event_until_both_leave(notices: StageNotices) -> None:
    with notices.expect(5) as first:
        with notices.expect(5) as second:
            assert first is second
        assert 5 in notices._waiting  # the first still waits
        NoticeSender(notices.name).send(5)
        await asyncio.wait_for(first.wait(), 10)
    assert 5 not in notices._waiting


def test_a_sender_to_a_closed_server_does_not_raise() -> None:
    sender = NoticeSender("skyrl-stage-nobody-listens")
    sender.send(1)  # logged once, never raised: the server's timer still finds the version
    sender.send(2)
