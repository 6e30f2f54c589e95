"""`ray start --head`, `ray job submit` of the multi-tenant RL example, `ray stop`.

Named to run first: `ray stop` ends every Ray process on the machine, so this runs before the
session's shared cluster (``ray_local``) exists.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tiny):  # the fixtures are built before the job needs them
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    dash = _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(_free_port()), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--num-cpus", "4", "--disable-usage-stats"],
                   env=env, check=True, timeout=180, capture_output=True)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, timeout=120, capture_output=True)


def test_job_submit_runs_the_multi_tenant_rl_example(ray_head) -> None:
    env, address = ray_head
    runtime_env = '{"excludes": [".venv", ".stage", "artifacts", ".git", "bench/results", "*.png"]}'
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", runtime_env, "--", "python", "examples/rl_multi_tenant.py", "--steps", "2",
         "--group-size", "16", "--out-dir", "/tmp/skyrl_rl_example"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    for tenant in ("alice", "bob", "carol"):
        assert f"tenant {tenant} reward per step:" in out, out[-4000:]
