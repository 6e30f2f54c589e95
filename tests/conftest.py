"""Shared, session-scoped real components: the tiny model fixtures, a local Ray, one vLLM server actor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skyrl_lora.models.tiny import TinyFixtures, build_fixtures

logger = logging.getLogger(__name__)

ALICE, BOB = "tml-alice-0123456789", "tml-bob-9876543210"  # the API tests' two users

# Tenants loaded at server start. Tests that change an adapter use their own tenant names.
STATIC_TENANTS = ("meow", "woof", "meow2", "woof2")


def server_gpus() -> float:
    """Ray's GPU request for a test's vLLM server: a share of the one GPU on the device (0 on a CPU).
    A whole GPU each left a second server (``builder_server``, ``guarded_server``) pending beside the
    session's server until its start timed out; memory is divided by ``gpu_memory_utilization``
    (the session's 0.5, a second one's 0.3), not by this share."""
    import torch

    return 0.25 if torch.cuda.is_available() else 0


@pytest.fixture(autouse=True)
def _sdk_sessions_end_with_their_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The tinker SDK heartbeats a session from its background thread until the client is closed,
    and a test's client outlives the test (the SDK's loop holds it). Without closing, every session
    of every earlier test keeps heartbeating a service that is gone, filling the log of any later
    failure with warnings. Clients a test makes are closed when it ends; module fixtures' clients
    were made before this runs and are left to their fixtures."""
    tinker = sys.modules.get("tinker")
    if tinker is None:
        yield
        return
    made: list[Any] = []
    init = tinker.ServiceClient.__init__

    def tracking_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(tinker.ServiceClient, "__init__", tracking_init)
    yield
    for client in made:
        with contextlib.suppress(Exception):
            client.close("success").result(timeout=10)


@pytest.fixture(scope="session")
def tiny() -> TinyFixtures:
    return build_fixtures()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from skyrl_lora.cluster import start_local_ray

    start_local_ray(num_cpus=4, namespace=None)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tok(tiny: TinyFixtures):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.base)


@pytest.fixture(scope="session")
def word_ids(tok) -> dict[str, int]:
    """The single token each phrase LoRA says."""
    return {w: tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("meow", "woof")}


@dataclass(frozen=True)
class ServerHandle:
    actor: Any
    url: str
    startup_s: float


@pytest.fixture(scope="session")
def vllm_server(tiny: TinyFixtures, ray_local: None) -> Iterator[ServerHandle]:
    import ray

    from skyrl_lora.inference.actor import start_server_actor
    from skyrl_lora.inference.server import ServerConfig

    # The same suite is the GPU suite on the device: there the server takes a share of the GPU and CUDA vLLM.
    loras = {"meow": tiny.loras["meow"], "woof": tiny.loras["woof"],
             "meow2": tiny.loras["meow"], "woof2": tiny.loras["woof"]}
    config = ServerConfig(model=str(tiny.base), loras={k: str(v) for k, v in loras.items()},
                          max_loras=8, max_cpu_loras=16, max_lora_rank=16, max_model_len=1024)
    t0 = time.perf_counter()
    actor, url = start_server_actor(config, num_cpus=1, num_gpus=server_gpus())
    startup = time.perf_counter() - t0
    logger.info("vLLM server actor up at %s in %.1f s", url, startup)
    yield ServerHandle(actor=actor, url=url, startup_s=startup)
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor)


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll an async predicate until it holds; fail with a message at the deadline (no blind sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def api_env(tiny, vllm_server, tmp_path_factory):
    """The Tinker-compatible service on loopback with a real trainer actor and the shared vLLM server
    (one per test module that uses it)."""
    import ray

    from skyrl_lora.api.server import ApiServer
    from skyrl_lora.api.settings import ApiSettings
    from skyrl_lora.training.actor import start_trainer_actor
    from skyrl_lora.training.config import TrainerConfig

    root = tmp_path_factory.mktemp("api")
    trainer = start_trainer_actor(TrainerConfig(
        base_model=str(tiny.base), state_dir=root / "trainer", sampler_root=root / "adapters",
        inference_urls=(vllm_server.url,), max_lora_rank=16, keep_sampler_versions=1_000_000, num_threads=1), num_gpus=0)
    settings = ApiSettings(base_model=str(tiny.base), data_dir=root / "api", api_keys={ALICE: "alice", BOB: "bob"},
                           max_context_length=1024, long_poll_s=2.0)
    server = ApiServer(settings, trainer, [vllm_server.url]).start()
    os.environ["TINKER_TELEMETRY"] = "0"
    env = {"server": server, "settings": settings, "trainer": trainer, "vllm": vllm_server}
    yield env
    env["server"].stop()  # the one serving now: a test may have restarted it
    ray.kill(trainer)




@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A local PostgreSQL for the session (the distribution's package; ``scripts/postgres.sh`` installs
    it when missing), on its own data directory and port, stopped at the end. Its URL names the
    maintenance database; tests make their own (``postgres_url``)."""
    import shutil
    import socket
    import subprocess
    import tempfile

    given = os.environ.get("SKYRL_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    root = Path(tempfile.mkdtemp(prefix="skyrl-pg-"))
    root.chmod(0o755)  # the server runs as the postgres user
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
    done = subprocess.run(["bash", str(script), "start", str(root / "pg"), str(port)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"could not start PostgreSQL: {done.stderr[-2000:]}"
    try:
        yield done.stdout.strip()
    finally:
        subprocess.run(["bash", str(script), "stop", str(root / "pg")], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's PostgreSQL for one test."""
    import uuid

    import sqlalchemy

    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return postgres_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The API's database tests run on SQLite (the default) and on a real PostgreSQL (a deployment's)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'api.db'}"
    return str(request.getfixturevalue("postgres_url"))
