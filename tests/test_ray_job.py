"""`ray start --head`, `ray job submit` of the multi-tenant RL example, then that cluster stopped.

The cluster is started and stopped on its own (tests/local_ray.py), so this test runs in any order
beside the session's shared cluster.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from .local_ray import BIN, LocalRayCluster, local_ray_cluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ray_head(tiny):  # the fixtures are in the cache before the job needs them
    with local_ray_cluster([{"ip": "127.0.0.1", "num_cpus": 4}], dashboard=True) as cluster:
        yield cluster


def test_job_submit_runs_the_multi_tenant_rl_example(ray_head: LocalRayCluster) -> None:
    env, address = ray_head.env, ray_head.dashboard_url
    runtime_env = '{"excludes": [".venv", ".stage", "artifacts", ".git", "bench/results", "*.png"]}'
    deadline = time.monotonic() + 120
    while True:  # a fresh head's job agent registers a little after the node is up
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", runtime_env, "--", "python", "examples/rl_multi_tenant.py", "--steps", "2",
             "--group-size", "16", "--out-dir", "/tmp/skyrl_rl_example"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        out = job.stdout + job.stderr
        if "No available agent to submit job" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    for tenant in ("alice", "bob", "carol"):
        assert f"tenant {tenant} reward per step:" in out, out[-4000:]
