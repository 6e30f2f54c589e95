"""Staging talks to vLLM's workers directly, so the engine's step loop sees only the flip.

Issue 16 asks that the engine do only the last step of a sync. Through ``collective_rpc`` every
message to a worker is a utility call that vLLM's engine core answers between two steps, on the loop
all tenants' tokens come from: staging was one call to start and then one every 5 ms to ask whether
it was done. Eight tenants syncing at once made that hundreds of calls a second, each also waiting for
a step to end. Now:

* the server sends a ``StageCommand`` datagram straight to each worker's command socket, read by a
  thread of the worker that hands the job to its staging pool;
* each worker sends a ``StageNotice`` datagram back to the server's socket when the version is
  staged or has failed, with the outcome.

So a sync touches the engine's loop once, for the flip. Anything the datagrams cannot do stays on
``collective_rpc``: a worker that could not open a socket (another platform) is sent its command that
way, and a server that hears nothing for ``backstop_s`` asks the workers, as before (a worker on
another node of a tensor-parallel server, a datagram dropped by a full buffer). Linux abstract-namespace
sockets: no file to clean up, nothing left behind by a crashed process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError

logger = logging.getLogger(__name__)
MAX_DATAGRAM = 1 << 16
NOT_STAGED = "not staged"  # a worker's status for a version it has no staging of


class StageCommand(BaseModel):
    """Server -> worker: load ``source`` as engine adapter ``lora_int_id`` (see ``skyrl_stage_lora``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    lora_int_id: int
    lora_name: str
    lora_path: str
    source: str
    arm: bool = False  # an in-place version: flipped in before the worker's next step once staged


class StageNotice(BaseModel):
    """Worker -> server: the staging of ``lora_path`` as ``lora_int_id`` ended; ``status`` is "ok" or
    the error, as ``skyrl_stage_status`` words it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    lora_int_id: int
    lora_path: str
    worker: str
    status: str


def _abstract(name: str) -> str:
    return "\0" + name


def _bound_socket(prefix: str) -> tuple[socket.socket, str] | None:
    name = f"{prefix}-{uuid.uuid4().hex}"
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(_abstract(name))
    except (AttributeError, OSError) as exc:
        logger.info("no staging socket (%s): staging goes through the engine's collective_rpc", exc)
        return None
    return sock, name


class _Send:
    """One unconnected datagram socket, shared by threads; a failure is logged once, then quietly
    left to the other side's fallback."""

    def __init__(self, what: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._what = what
        self._warned = False

    def __call__(self, address: str, message: BaseModel) -> bool:
        try:
            with self._lock:
                self._sock.sendto(message.model_dump_json().encode(), _abstract(address))
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("%s failed (%s); falling back to collective_rpc", self._what, exc)
            return False

    def close(self) -> None:
        self._sock.close()


class Expected:
    """What the server waits for while one version stages: a notice from each worker."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.notices: list[StageNotice] = []
        self.waiters = 0

    def outcome(self, lora_path: str, workers: int) -> str | None:
        """None until every worker reported ``lora_path``; then "ok", or the first failure."""
        mine = {n.worker: n.status for n in self.notices if n.lora_path == lora_path}
        failed = [s for s in mine.values() if s != "ok"]
        if failed:
            return failed[0]
        return "ok" if len(mine) >= workers else None


class ServerStageChannel:
    """The server's end: its notice socket, read by the event loop it was started on, and the sender
    of commands to the workers' sockets."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self.name = name  # where workers send notices
        self.workers: list[str | None] = []  # each worker's command socket (None: that worker has none)
        self._send = _Send("a staging command to a worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expected: dict[int, Expected] = {}
        self.received = 0  # notices read since start
        self.commands = 0  # commands sent straight to workers since start

    @classmethod
    def open(cls) -> ServerStageChannel | None:
        """Bound and ready, or None where this platform has no abstract Unix sockets."""
        bound = _bound_socket("skyrl-stage-notices")
        if bound is None:
            return None
        bound[0].setblocking(False)
        return cls(*bound)

    def start(self, workers: list[str | None]) -> None:
        """Read notices on the running loop; ``workers``: what ``skyrl_configure_staging`` returned."""
        self.workers = list(workers)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._drain)

    @property
    def direct(self) -> bool:
        """Every worker takes commands on its socket (else commands go through collective_rpc)."""
        return bool(self.workers) and all(w is not None for w in self.workers)

    def send(self, command: StageCommand) -> bool:
        """To every worker; False if any send failed (the caller then uses collective_rpc, which
        replaces a job the datagram may have started: the same version, staged once more)."""
        ok = all(self._send(w, command) for w in self.workers if w is not None)
        self.commands += ok
        return ok

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._send.close()

    @contextlib.contextmanager
    def expect(self, lora_id: int) -> Iterator[Expected]:
        """Taken before the command is sent, so a notice that arrives at once is kept. Stagings of
        one id at once (in place, one tenant) share it; each looks for its own path."""
        expected = self._expected.setdefault(lora_id, Expected())
        expected.waiters += 1
        try:
            yield expected
        finally:
            expected.waiters -= 1
            if expected.waiters == 0:
                self._expected.pop(lora_id, None)

    def _drain(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                logger.debug("staging notice socket failed", exc_info=True)
                return
            try:
                notice = StageNotice.model_validate_json(data)
            except ValidationError:
                continue  # not ours: ignored
            self.received += 1
            expected = self._expected.get(notice.lora_int_id)
            if expected is not None:
                expected.notices.append(notice)
                expected.event.set()


class WorkerStageChannel:
    """A worker's end: a thread that reads commands and hands them to ``on_command``, and the sender
    of notices to the server."""

    def __init__(self, server: str, on_command: Callable[[StageCommand], None]) -> None:
        self.server = server
        self.worker = uuid.uuid4().hex[:12]  # names this worker in its notices
        self._send = _Send("a staging notice to the server")
        self._on_command = on_command
        self.name: str | None = None
        bound = _bound_socket("skyrl-stage-commands")
        if bound is not None:
            self._sock, self.name = bound
            threading.Thread(target=self._serve, name="skyrl-stage-commands", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except OSError:
                logger.warning("the staging command socket failed; commands come through collective_rpc")
                return
            try:
                command = StageCommand.model_validate_json(data)
            except ValidationError:
                logger.warning("ignored a datagram that is not a staging command")
                continue
            try:
                self._on_command(command)
            except Exception as exc:  # reported like a failed staging, so the server does not wait
                logger.exception("staging %s failed to start", command.lora_path)
                self.notify(command.lora_int_id, command.lora_path, f"{type(exc).__name__}: {exc}")

    def notify(self, lora_int_id: int, lora_path: str, status: str) -> None:
        self._send(self.server, StageNotice(lora_int_id=lora_int_id, lora_path=lora_path, worker=self.worker,
                                            status=status))
