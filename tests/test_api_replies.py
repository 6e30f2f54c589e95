"""Every JSON route's reply, as the ``tinker`` SDK (0.38) reads it: each body parses as the SDK's own
response model, and carries exactly the keys it carried before the routes had typed response models,
in the same order, ``None`` fields as null. Over a fake trainer in process (httpx.ASGITransport): no
Ray, no vLLM, no sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from skyrl_lora.api.settings import ApiSettings
from skyrl_lora.training.protocol import SamplerWeights

from .conftest import ALICE
from .test_api_fake_trainer import FakeTrainer

CHECKPOINT_KEYS = ["checkpoint_id", "checkpoint_type", "time", "tinker_path", "size_bytes", "public", "user_metadata",
                   "expires_at"]
RUN_KEYS = ["training_run_id", "base_model", "model_owner", "is_lora", "corrupted", "lora_rank", "last_request_time",
            "last_checkpoint", "last_sampler_checkpoint", "user_metadata"]


class SamplerSavingTrainer(FakeTrainer):
    async def save_weights_for_sampler(self, tenant: str, name: str) -> SamplerWeights:
        path = self.root / tenant / f"{name}.sampler"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("adapter")
        return SamplerWeights(tenant=tenant, path=str(path), step=self.steps[tenant], synced=True)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    from skyrl_lora.api.app import create_app
    from skyrl_lora.api.db import Database
    from skyrl_lora.api.service import TinkerService
    from skyrl_lora.inference.client import RemoteInferenceClient

    settings = ApiSettings(base_model=str(tmp_path / "base"), model_name="tiny", data_dir=tmp_path / "api",
                           api_keys={ALICE: "alice"}, long_poll_s=2.0)
    settings.data_dir.mkdir(parents=True)
    inference = RemoteInferenceClient("http://127.0.0.1:9")  # nothing listens: healthz says degraded

    async def loaded(*_: object, **__: object) -> list[Any]:  # a snapshot sampler's adapter "loads"
        return []
    inference.load_lora_adapter = loaded  # type: ignore[method-assign]
    db = Database(settings.db_url)
    service = TinkerService(settings, SamplerSavingTrainer(tmp_path / "trainer"), inference, db)
    service.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)),
                                 base_url="http://test/api/v1", headers={"X-API-Key": ALICE}) as client:
        yield client
    await service.shutdown()
    db.close()


async def test_every_json_route_replies_in_the_sdk_shape(http: httpx.AsyncClient, tmp_path: Path) -> None:
    from tinker import types as T
    from tinker.types.shared import UntypedAPIFuture

    async def ok(method: str, path: str, body: Any = None, sdk: Any = None, keys: list[str] | None = None) -> Any:
        r = await http.request(method, path, json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", (path, r.text)
        reply = r.json()
        if sdk is not None:
            sdk.model_validate(reply)
        if keys is not None:
            assert list(reply) == keys, (path, reply)
        return reply

    async def done(future: dict[str, Any]) -> None:
        UntypedAPIFuture.model_validate(future)
        while "try_again" in str(reply := await ok("POST", "/retrieve_future", {"request_id": future["request_id"]})):
            pass
        assert "error" not in reply, reply

    assert await ok("GET", "/healthz") == {"status": "degraded", "inference_servers_up": 0, "inference_servers": 1}
    assert await ok("POST", "/client/config", {}, T.ClientConfigResponse) == {"pjwt_auth_enabled": False,
                                                                              "use_pyqwest_transport": False}
    assert await ok("POST", "/client/dynamic_config", {}, T.ClientDynamicConfigResponse) == {}
    assert await ok("GET", "/get_server_capabilities", sdk=T.GetServerCapabilitiesResponse) == {"supported_models": [
        {"model_name": "tiny", "trainable": True, "sampleable": True, "max_context_length": 2048}]}
    sid = (await ok("POST", "/create_session", {"type": "create_session"}, T.CreateSessionResponse,
                    ["session_id", "type"]))["session_id"]
    assert await ok("POST", "/session_heartbeat", {"session_id": sid}, T.SessionHeartbeatResponse) == {
        "type": "session_heartbeat"}
    future = await ok("POST", "/create_model", {"session_id": sid, "model_seq_id": 0, "base_model": "tiny",
                                                "lora_config": {"rank": 4}},
                      keys=["request_id", "model_id", "sample_sequence_ids"])
    await done(future)
    run = future["model_id"]
    assert await ok("POST", "/get_info", {"model_id": run}, T.GetInfoResponse) == {
        "model_id": run, "type": "get_info", "is_lora": True, "lora_rank": 4, "model_name": "tiny",
        "model_data": {"arch": "llama", "model_name": "tiny", "tokenizer_id": str(tmp_path / "base")}}
    await done(await ok("POST", "/save_weights", {"model_id": run, "path": "w1", "seq_id": 1}))
    await done(await ok("POST", "/save_weights_for_sampler", {"model_id": run, "path": "s1", "seq_id": 2}))
    await done(await ok("POST", "/save_weights_external", {"model_id": run, "path": "e1", "seq_id": 3}))
    base_sampler = (await ok("POST", "/create_sampling_session",
                             {"session_id": sid, "sampling_session_seq_id": 0, "base_model": "tiny"},
                             T.CreateSamplingSessionResponse, ["sampling_session_id", "type"]))["sampling_session_id"]
    assert await ok("GET", f"/samplers/{base_sampler}", sdk=T.GetSamplerResponse) == {
        "sampler_id": base_sampler, "base_model": "tiny", "model_path": None}
    await ok("POST", "/create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 1,
                                                  "model_path": f"tinker://{run}/sampler_weights/s1"})
    assert (await ok("GET", f"/samplers/{sid}:sample:1"))["model_path"] == f"tinker://{run}/sampler_weights/s1"
    assert await ok("GET", f"/sessions/{sid}", sdk=T.GetSessionResponse) == {
        "training_run_ids": [run], "sampler_ids": [base_sampler, f"{sid}:sample:1"]}
    assert await ok("GET", "/sessions", sdk=T.ListSessionsResponse) == {"sessions": [sid]}
    assert await ok("POST", "/telemetry", {"events": []}, T.TelemetryResponse) == {"status": "accepted"}
    assert await ok("POST", "/cancel_future", {"request_id": "r"}) == {}

    runs = await ok("GET", "/training_runs", sdk=T.TrainingRunsResponse, keys=["training_runs", "cursor"])
    assert runs["cursor"] == {"offset": 0, "limit": 20, "total_count": 1} and list(runs["training_runs"][0]) == RUN_KEYS
    one = await ok("GET", f"/training_runs/{run}", sdk=T.TrainingRun, keys=RUN_KEYS)
    assert list(one["last_checkpoint"]) == CHECKPOINT_KEYS and one["last_checkpoint"]["expires_at"] is None
    listed = await ok("GET", f"/training_runs/{run}/checkpoints", sdk=T.CheckpointsListResponse, keys=["checkpoints"])
    assert [c["checkpoint_id"] for c in listed["checkpoints"]] == ["weights/w1", "sampler_weights/s1",
                                                                   "external_weights/e1"]
    assert all(list(c) == CHECKPOINT_KEYS for c in listed["checkpoints"])
    assert await ok("GET", "/checkpoints", sdk=T.CheckpointsListResponse) == listed
    await ok("GET", f"/training_runs/{run}/checkpoints/external_weights/e1/external_weights_urls",
             sdk=T.ExternalWeightsUrlsResponse, keys=["urls", "expires"])
    assert await ok("PUT", f"/training_runs/{run}/checkpoints/weights/w1/ttl", {"ttl_seconds": 60}) == {}
    assert (await ok("GET", "/checkpoints"))["checkpoints"][0]["expires_at"].endswith("Z")
    assert await ok("POST", "/weights_info", {"tinker_path": f"tinker://{run}/weights/w1"}, T.WeightsInfoResponse) == {
        "base_model": "tiny", "is_lora": True, "lora_rank": 4, "train_mlp": True, "train_attn": True,
        "train_unembed": True}
    assert await ok("DELETE", f"/training_runs/{run}/checkpoints/weights/w1") == {}
    assert await ok("POST", f"/sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": None}) == {}

