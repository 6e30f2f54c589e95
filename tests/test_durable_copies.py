"""DurableCopies (pure logic): a published version's durable copy is written after the call returns,
one tenant's copies in order, a reader waits for its path, and a failed copy is a 500 naming it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.durable_copies import DurableCopies


async def test_a_reader_waits_for_the_copy_and_one_tenants_copies_keep_their_order(tmp_path: Path) -> None:
    copies = DurableCopies()
    release = threading.Event()
    order: list[str] = []

    def write(name: str, gate: threading.Event | None) -> Path:
        if gate is not None and not gate.wait(timeout=30):
            raise TimeoutError("never released")
        (tmp_path / name).write_text(name)
        order.append(name)
        return tmp_path / name

    first = copies.start("a", tmp_path / "v1", lambda: write("v1", release))
    second = copies.start("a", tmp_path / "v2", lambda: write("v2", None))
    other = copies.start("b", tmp_path / "w1", lambda: write("w1", None))
    await asyncio.wait_for(copies.wait(tmp_path / "w1"), 30)  # another tenant does not wait for a's
    assert (tmp_path / "w1").is_file() and not first.done() and not second.done()
    assert copies.pending == 2
    waiter = asyncio.ensure_future(copies.wait(tmp_path / "v2"))
    await asyncio.sleep(0)
    assert not waiter.done()
    release.set()
    await asyncio.wait_for(waiter, 30)
    assert order == ["w1", "v1", "v2"] and (tmp_path / "v2").read_text() == "v2"
    assert other.done() and copies.pending == 0
    await asyncio.wait_for(copies.wait(tmp_path / "never-started"), 5)  # nothing pending: at once


async def test_a_failed_copy_is_an_error_naming_the_path_until_forgotten(tmp_path: Path) -> None:
    copies = DurableCopies()

    def fail() -> Path:
        raise OSError(28, "No space left on device")

    copies.start("a", tmp_path / "v1", fail)
    await asyncio.wait_for(copies.wait_tenant("a"), 30)
    with pytest.raises(SkyrlError) as info:
        await copies.wait(tmp_path / "v1")
    assert info.value.status == 500 and info.value.field == "path" and "v1" in info.value.message
    assert "No space left" in info.value.message
    # the next copy of that tenant still runs
    copies.start("a", tmp_path / "v2", lambda: tmp_path / "v2")
    await asyncio.wait_for(copies.wait(tmp_path / "v2"), 30)
    copies.forget(tmp_path / "v1")
    await copies.wait(tmp_path / "v1")
    await asyncio.wait_for(copies.drain(), 5)
