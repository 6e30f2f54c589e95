"""The Tinker API against a fake trainer (the ``TrainerBackend`` interface in memory), driven by the
unmodified ``tinker`` SDK over loopback: the service's own logic (ownership, ordering by seq_id,
futures, checkpoints) in seconds, with no Ray and no vLLM. The same routes against the real trainer
actor and vLLM are ``test_api.py``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from skyrl_lora.api.server import ApiServer
from skyrl_lora.api.settings import ApiSettings
from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    SamplerWeights,
    SavedState,
    TenantInfo,
)

from .conftest import ALICE, BOB


class FakeTrainer:
    """Records what it is asked, in order; logprobs say how many steps a tenant has taken."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str]] = []
        self.steps: dict[str, int] = {}
        self.specs: dict[str, LoraSpec] = {}

    async def create_lora(self, tenant: str, spec: LoraSpec) -> TenantInfo:
        if tenant in self.specs:
            raise SkyrlError(409, f"tenant: '{tenant}' exists", "tenant")
        self.specs[tenant], self.steps[tenant] = spec, 0
        self.calls.append(("create_lora", tenant))
        return TenantInfo(tenant=tenant, spec=spec, step=0, tier="resident", nbytes=0, has_pending_grads=False)

    async def _fb(self, kind: str, tenant: str, data: Sequence[Datum]) -> ForwardBackwardOutput:
        await asyncio.sleep(0)
        self.calls.append((kind, tenant))
        outputs = [{"logprobs": [-float(self.steps[tenant])] * len(d.model_input)} for d in data]
        return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics={"loss:sum": float(len(data))})

    async def forward(self, tenant: str, data: Sequence[Datum], loss_fn: str,
                      loss_fn_config: dict[str, float] | None) -> ForwardBackwardOutput:
        return await self._fb("forward", tenant, data)

    async def forward_backward(self, tenant: str, data: Sequence[Datum], loss_fn: str,
                               loss_fn_config: dict[str, float] | None) -> ForwardBackwardOutput:
        return await self._fb(f"forward_backward:{len(data)}", tenant, data)

    async def optim_step(self, tenant: str, adam: AdamParams) -> OptimStepOutput:
        self.steps[tenant] += 1
        self.calls.append(("optim_step", tenant))
        return OptimStepOutput(metrics={"grad_norm:mean": 1.0}, step=self.steps[tenant])

    async def save_state(self, tenant: str, name: str) -> SavedState:
        path = self.root / tenant / f"{name}.state"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(self.steps[tenant]))
        return SavedState(tenant=tenant, path=str(path), step=self.steps[tenant], nbytes=path.stat().st_size)

    async def load_state(self, tenant: str, path: str, with_optimizer: bool) -> TenantInfo:
        self.steps[tenant] = int(Path(path).read_text())
        self.specs.setdefault(tenant, LoraSpec(rank=4, alpha=4))
        return TenantInfo(tenant=tenant, spec=self.specs[tenant], step=self.steps[tenant], tier="resident", nbytes=0,
                          has_pending_grads=False)

    async def save_weights_for_sampler(self, tenant: str, name: str) -> SamplerWeights:
        raise SkyrlError(501, "the fake trainer has no inference to sync into", None)

    async def adapter_files(self, tenant: str) -> dict[str, bytes]:
        return {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\0" * 8}

    async def delete_checkpoint(self, path: str) -> bool:
        Path(path).unlink(missing_ok=True)
        return True

    async def durable(self, path: str) -> None:
        return None

    async def metrics_text(self) -> str:
        return ""


@pytest.fixture(scope="module")
def fake_api(tiny, tmp_path_factory):
    from skyrl_lora.api.app import create_app
    from skyrl_lora.api.db import Database
    from skyrl_lora.api.service import TinkerService
    from skyrl_lora.inference.client import RemoteInferenceClient

    root = tmp_path_factory.mktemp("fake-api")
    settings = ApiSettings(base_model=str(tiny.base), data_dir=root / "api", api_keys={ALICE: "alice", BOB: "bob"},
                           long_poll_s=2.0)
    settings.data_dir.mkdir(parents=True)
    trainer = FakeTrainer(root / "trainer")
    db = Database(settings.db_url)
    # no inference server is ever contacted by these tests (nothing samples)
    service = TinkerService(settings, trainer, RemoteInferenceClient("http://127.0.0.1:9"), db)
    service.startup()
    server = ApiServer.of_app(settings, create_app(service), service).start()
    os.environ["TINKER_TELEMETRY"] = "0"
    yield server, trainer
    server.stop()
    db.close()


def test_training_requests_reach_the_trainer_in_seq_id_order(fake_api) -> None:
    import tinker
    from tinker import types

    server, trainer = fake_api
    sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=server.settings.served_name, rank=4).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    # submitted without waiting: the SDK sends them at once, the service runs them in seq_id order
    futures = []
    for _ in range(3):
        futures.append(tc.forward_backward([datum] * 2, "cross_entropy"))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-3)))
    for f in futures:
        f.result()
    tenant = trainer.calls[-1][1]
    mine = [kind for kind, t in trainer.calls if t == tenant]
    assert mine == ["create_lora"] + ["forward_backward:2", "optim_step"] * 3
    out = tc.forward([datum], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-3.0] * 3

    saved = tc.save_state("after-3").result().path
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == ["weights/after-3"]
    restored = sc.create_training_client_from_state(saved).result()
    assert restored.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist() == [-3.0] * 3
    with pytest.raises(tinker.NotFoundError):  # Bob does not see Alice's checkpoint
        tinker.RestClient(base_url=server.url, api_key=BOB).list_checkpoints(tc.model_id).result()


def test_a_trainer_error_reaches_the_client_with_its_status(fake_api) -> None:
    import tinker

    server, _ = fake_api
    tc = tinker.ServiceClient(base_url=server.url, api_key=ALICE).create_lora_training_client(
        base_model=server.settings.served_name, rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match="no inference"):
        tc.save_weights_for_sampler("x").result()


def _serve_service(settings: ApiSettings, trainer: FakeTrainer):
    from skyrl_lora.api.app import create_app
    from skyrl_lora.api.db import Database
    from skyrl_lora.api.service import TinkerService
    from skyrl_lora.inference.client import RemoteInferenceClient

    db = Database(settings.db_url)
    service = TinkerService(settings, trainer, RemoteInferenceClient("http://127.0.0.1:9"), db)
    service.startup()
    return ApiServer.of_app(settings, create_app(service), service).start(), db


def test_a_restart_on_postgresql_keeps_sessions_checkpoints_and_finished_futures(tiny, tmp_path, postgres_url) -> None:
    """The database a deployment would use: the API on PostgreSQL, stopped and started again."""
    import httpx
    import tinker
    from tinker import types

    settings = ApiSettings(base_model=str(tiny.base), data_dir=tmp_path / "api", database_url=postgres_url,
                           api_keys={ALICE: "alice"}, long_poll_s=2.0)
    settings.data_dir.mkdir(parents=True)
    trainer = FakeTrainer(tmp_path / "trainer")
    server, db = _serve_service(settings, trainer)
    try:
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model=settings.served_name, rank=4).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        saved = tc.save_state("on-pg").result().path
        with httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": ALICE}) as http:
            sessions = http.get("/api/v1/sessions").json()["sessions"]
            finished = http.post("/api/v1/optim_step", json={"model_id": tc.model_id,
                                                            "adam_params": {"learning_rate": 0.0}}).json()["request_id"]
            first = http.post("/api/v1/retrieve_future", json={"request_id": finished}).json()
    finally:
        server.stop()
        db.close()
    again, db = _serve_service(settings, trainer)
    try:
        with httpx.Client(base_url=again.url, timeout=60, headers={"X-API-Key": ALICE}) as http:
            assert http.get("/api/v1/sessions").json()["sessions"] == sessions
            assert http.post("/api/v1/retrieve_future", json={"request_id": finished}).json() == first
            listed = http.get(f"/api/v1/training_runs/{tc.model_id}/checkpoints").json()["checkpoints"]
            assert [c["tinker_path"] for c in listed] == [saved]
    finally:
        again.stop()
        db.close()
