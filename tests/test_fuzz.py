"""Issue 9: property-based fuzzing of every REST route of the API and of the inference server.

Bodies are malformed JSON, wrong types, huge or negative numbers, out-of-vocabulary token ids and
unknown ids, built by hypothesis around each route's real field names. Whatever arrives: never a
5xx, never a hang (every call has a deadline), and every 4xx says what was wrong and names the field.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ALICE, STATIC_TENANTS

pytestmark = [pytest.mark.vllm]

FIELDS = ["session_id", "model_id", "base_model", "lora_config", "rank", "seed", "path", "seq_id", "model_seq_id",
          "sampling_session_id", "sampling_session_seq_id", "prompt", "chunks", "tokens", "type", "sampling_params",
          "max_tokens", "temperature", "top_p", "top_k", "stop", "num_samples", "request_id", "adam_params",
          "learning_rate", "beta1", "eps", "weight_decay", "tags", "user_metadata", "model_path", "kind", "optimizer",
          "prompt_logprobs", "topk_prompt_logprobs", "topk_sample_logprobs", "tinker_path", "ttl_seconds",
          # the inference server's
          "prompt_token_ids", "prefix_output_token_ids", "lora_name", "lora_path", "num_samples", "owner", "lease_s",
          "load_inplace", "mode", "create", "logprobs", "ignore_eos", "stop_token_ids"]

numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12, 1e308]))
token_lists = st.lists(st.one_of(st.integers(min_value=-5, max_value=2**40), st.sampled_from([0, 1, 1023, 1024, 10**6])),
                       max_size=12)
leaf = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40), token_lists,
                 st.sampled_from(["tinker://nope/weights/x", "../../etc/passwd", "/", "meow-fz", "", "req-unknown"]))
values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                      max_leaves=12)
bodies = st.one_of(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8), values)
raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([b"{", b"{}", b"null", b"[1,2", b'{"a": NaN}', b"\xff\xfe"]))

FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

API_POSTS = ["create_session", "session_heartbeat", "create_model", "get_info", "forward_backward", "optim_step",
             "save_weights", "save_weights_for_sampler", "load_weights", "create_sampling_session", "asample",
             "retrieve_future", "cancel_future", "weights_info", "sessions/unknown-session/finish"]
API_GETS = ["sessions/x", "sessions", "samplers/x", "training_runs", "training_runs/x", "training_runs/x/checkpoints",
            "checkpoints", "get_server_capabilities"]


def _check(resp: httpx.Response, where: str) -> None:
    assert resp.status_code < 500, f"{where}: HTTP {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        body = resp.json()
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else err
        field = err.get("field") if isinstance(err, dict) else body.get("field")
        assert message, f"{where}: a rejection without a message: {resp.text[:300]}"
        # a 404 names the id it did not find; anything else names the field
        assert field or resp.status_code == 404 or ":" in str(message), f"{where}: no field named: {resp.text[:300]}"


@pytest.fixture(scope="module")
def api(api_env):
    with httpx.Client(base_url=api_env["server"].url + "/api/v1", headers={"X-API-Key": ALICE}, timeout=60) as http:
        yield http


@pytest.mark.parametrize("route", API_POSTS)
@FUZZ
@given(body=bodies)
def test_api_post_routes_never_500(api, route: str, body: Any) -> None:
    _check(api.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"}), route)


@pytest.mark.parametrize("route", ["create_model", "asample", "forward_backward", "retrieve_future"])
@FUZZ
@given(raw=raw_bodies, content_type=st.sampled_from(["application/json", "application/x-protobuf", "text/plain"]))
def test_api_malformed_bytes_never_500(api, route: str, raw: bytes, content_type: str) -> None:
    _check(api.post(route, content=raw, headers={"Content-Type": content_type}), route)


@pytest.mark.parametrize("route", API_GETS)
@FUZZ
@given(params=st.dictionaries(st.sampled_from(["limit", "offset", "training_run_id", "model_id"]),
                              st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=12)), max_size=3))
def test_api_get_routes_never_500(api, route: str, params: dict) -> None:
    _check(api.get(route, params=params), route)


@FUZZ
@given(key=st.one_of(st.text(max_size=30), st.sampled_from(["", "tml-", "tml-" + "x" * 500])))
def test_api_bad_keys_get_401_naming_the_header(api_env, key: str) -> None:
    headers = {"X-API-Key": key} if key.isascii() and key.isprintable() else {}
    r = httpx.post(api_env["server"].url + "/api/v1/create_session", json={}, headers=headers, timeout=30)
    assert r.status_code == 401 and "X-API-Key" in r.text


# ------------------------------------------------------------------------------ inference server
INFERENCE_POSTS = ["generate", "pause", "resume", "abort_lora_requests", "load_lora_adapter", "update_lora",
                   "unload_lora_adapter"]
# names the fuzzer must never touch: the session's tenants (other tests rely on them)
PROTECTED = set(STATIC_TENANTS)


def _safe_inference_body(route: str, body: Any) -> Any:
    """Keep the fuzz away from the shared server's real tenants and from engine-wide pauses."""
    if isinstance(body, dict):
        name = body.get("lora_name")
        if route in ("pause", "resume") and (name is None or not isinstance(name, str)):
            body = {**body, "lora_name": "fz-" + str(name)}
        elif isinstance(name, str) and name in PROTECTED:
            body = {**body, "lora_name": "fz-" + name}
        if route == "generate" and isinstance(body.get("sampling_params"), dict):
            sp = body["sampling_params"]
            if isinstance(sp.get("max_tokens"), int) and sp["max_tokens"] > 16:
                body = {**body, "sampling_params": {**sp, "max_tokens": 16}}
    return body


@pytest.fixture(scope="module")
def inference(vllm_server):
    with httpx.Client(base_url=vllm_server.url + "/skyrl/v1", timeout=60) as http:
        yield http
    with httpx.Client(base_url=vllm_server.url, timeout=60) as http:
        state = http.get("/skyrl/v1/state").json()
    assert not state["engine_paused_by"], "the fuzz left the engine paused"


@pytest.mark.parametrize("route", INFERENCE_POSTS)
@FUZZ
@given(body=bodies)
def test_inference_routes_never_500(inference, route: str, body: Any) -> None:
    body = _safe_inference_body(route, body)
    resp = inference.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
    _check(resp, route)
    if route == "pause" and resp.status_code == 200:  # give back what the fuzz took
        inference.post("resume", json={"lora_name": body["lora_name"], "owner": body.get("owner")})


@pytest.mark.parametrize("route", ["generate", "pause", "update_lora"])
@FUZZ
@given(raw=raw_bodies)
def test_inference_malformed_bytes_never_500(inference, route: str, raw: bytes) -> None:
    resp = inference.post(route, content=raw, headers={"Content-Type": "application/json"})
    _check(resp, route)
    if route == "pause" and resp.status_code == 200:  # b"{}" is a valid engine-wide pause: give it back
        inference.post("resume", json={"lora_name": None, "owner": "anonymous"})
