"""Workers tell the server when a staged version is ready, instead of being asked every few ms.

The server used to ask every worker for its staging status every 5 ms through ``collective_rpc``.
Each ask is a utility call that vLLM's engine core answers between two steps, on the loop every
tenant's tokens come from: with eight tenants syncing at once that was hundreds of calls a second,
each waiting for a step to end. Now a worker sends one datagram to a Unix socket of the server's
process when a staged version is ready or has failed, and the server asks once. The ask on a slow
timer stays for what a datagram cannot reach (a worker on another node of a tensor-parallel server)
and for a datagram lost to a full buffer; it costs time, never correctness, since the status the
server acts on always comes from the workers themselves.

Linux abstract-namespace sockets: no file to clean up, nothing left behind by a crashed server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def _abstract(name: str) -> str:
    return "\0" + name


class StageNotices:
    """The server's end: one datagram socket read by the event loop it was started on. A worker
    sends the engine ``lora_int_id`` it finished staging, as decimal ASCII."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self.name = name  # what workers send to (``send_notice``)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, tuple[asyncio.Event, int]] = {}  # lora id -> (event, waiters)
        self.received = 0  # notices read since start

    @classmethod
    def open(cls) -> StageNotices | None:
        """Bound and ready, or None where this platform has no abstract Unix sockets (staging then
        asks on a short timer, as before)."""
        name = f"skyrl-stage-{uuid.uuid4().hex}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(_abstract(name))
        except (AttributeError, OSError) as exc:
            logger.info("staging notices unavailable (%s); the server asks the workers on a timer", exc)
            return None
        sock.setblocking(False)
        return cls(sock, name)

    def start(self) -> None:
        """Read notices on the running loop (the one the controller's staging waits on)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._drain)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    @contextlib.contextmanager
    def expect(self, lora_id: int) -> Iterator[asyncio.Event]:
        """An event set when a worker reports ``lora_id``; taken before staging starts, so a notice
        that arrives before the first wait is not missed. Several stagings of one id share it."""
        event, count = self._waiting.get(lora_id, (None, 0))
        if event is None:
            event = asyncio.Event()
        self._waiting[lora_id] = (event, count + 1)
        try:
            yield event
        finally:
            event, count = self._waiting[lora_id]
            if count <= 1:
                del self._waiting[lora_id]
            else:
                self._waiting[lora_id] = (event, count - 1)

    def _drain(self) -> None:
        while True:
            try:
                data = self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                logger.debug("staging notice socket failed", exc_info=True)
                return
            try:
                lora_id = int(data)
            except ValueError:
                continue  # not ours: ignored
            self.received += 1
            waiting = self._waiting.get(lora_id)
            if waiting is not None:
                waiting[0].set()


class NoticeSender:
    """The worker's end: sends from its staging threads; failures are logged once and ignored (the
    server's timer still finds the version)."""

    def __init__(self, name: str) -> None:
        self._address = _abstract(name)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._warned = False

    def send(self, lora_id: int) -> None:
        try:
            with self._lock:
                self._sock.sendto(str(lora_id).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("staging notice to the server failed (%s); it finds the version on its timer", exc)
